"""report.json, report.md and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery_edge.io import atomic_path, write_json_atomic, write_text_atomic

SURGERY_LABELS = {"none": "", "surgery": " w/ Surgery", "surgeryv2": " w/ SurgeryV2"}


def gap_closed(rows: list[dict], base: str = "task_arithmetic") -> dict[str, float]:
    """Fraction of the gap between ``base`` and the experts that each surgery closes."""
    avg = {(r["method"], r["surgery"]): r["avg"] for r in rows}
    ind, b = avg.get(("individual", "none")), avg.get((base, "none"))
    if ind is None or b is None or ind == b:
        return {}
    return {
        s: (avg[(base, s)] - b) / (ind - b) for s in ("surgery", "surgeryv2") if (base, s) in avg
    }


def markdown(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    lines = [
        f"# surgery-edge report: {report['suite']} suite, {report['arch']}",
        "",
        "Top-1 accuracy (%) on the test split.",
        "",
        "| method | " + " | ".join(tasks) + " | avg |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for r in report["results"]:
        name = r["method"] + SURGERY_LABELS.get(r["surgery"], f" w/ {r['surgery']}")
        cells = " | ".join(f"{r['per_task'][t]:.1f}" for t in tasks)
        lines.append(f"| {name} | {cells} | {r['avg']:.1f} |")
    gap = report.get("gap_closed")
    if gap:
        lines += [
            "",
            "Gap to the experts closed, with task arithmetic as the base: "
            + ", ".join(f"{s} {100 * v:.0f}%" for s, v in gap.items())
            + ".",
        ]
    bias = report.get("representation_bias")
    if bias:
        sites = list(next(iter(next(iter(bias.values())).values())))
        lines += [
            "",
            "Representation bias (mean L1 distance to the experts' representations, "
            "test split, mean over tasks).",
            "",
            "| merge | surgery | " + " | ".join(sites) + " |",
            "|---" * (len(sites) + 2) + "|",
        ]
        for merge, by_s in bias.items():
            for s, vals in by_s.items():
                lines.append(
                    f"| {merge} | {s} | " + " | ".join(f"{vals[k]:.4f}" for k in sites) + " |"
                )
    if report.get("timings_s"):
        lines += [
            "",
            "Timings (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items())
            + ".",
        ]
    for key in ("notes", "plots"):
        if report.get(key):
            lines += ["", f"{key.capitalize()}:"] + [f"- {n}" for n in report[key]]
    return "\n".join(lines) + "\n"


def _save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_accuracy(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, rows = report["tasks"], report["results"]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(tasks)), 4.2))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        label = r["method"] + SURGERY_LABELS.get(r["surgery"], "")
        ax.bar(
            np.arange(len(tasks)) + i * width,
            [r["per_task"][t] for t in tasks],
            width,
            label=f"{label} ({r['avg']:.1f})",
        )
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=20)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=6, ncol=3, loc="lower left")
    ax.set_title("Accuracy per task and method")
    _save_fig(fig, path)
    plt.close(fig)
    return path


def plot_bias(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bias = report["representation_bias"]
    merges = list(bias)
    fig, axes = plt.subplots(
        1, len(merges), figsize=(3.2 * len(merges), 3.2), sharey=True, squeeze=False
    )
    for ax, merge in zip(axes[0], merges):
        for s, vals in bias[merge].items():
            ax.plot(list(vals), list(vals.values()), marker="o", label=s)
        ax.set_title(merge, fontsize=9)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    axes[0][0].set_ylabel("L1 distance to experts")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Representation bias per layer, before and after surgery")
    _save_fig(fig, path)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, report: dict) -> dict[str, Path]:
    """Write report.json, report.md and the PNG plots into ``out_dir``."""
    out = Path(out_dir)
    paths = {}
    report = dict(report)
    report["gap_closed"] = gap_closed(report["results"])
    plots = [plot_accuracy(report, out / "accuracy.png")]
    if report.get("representation_bias"):
        plots.append(plot_bias(report, out / "bias.png"))
    report["plots"] = [p.name for p in plots]
    paths["json"] = write_json_atomic(out / "report.json", report)
    paths["md"] = write_text_atomic(out / "report.md", markdown(report))
    return paths

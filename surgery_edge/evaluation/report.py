"""report.json, report.md and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.io import atomic_path, write_json_atomic, write_text_atomic
from surgery_edge.surgery.methods import NONE, SURGERY_METHODS


def row_name(method: str, surgery: str) -> str:
    """``task_arithmetic w/ SurgeryV2``; the merge alone for ``none``."""
    if surgery == NONE:
        return method
    known = SURGERY_METHODS.get(surgery)
    return f"{method} w/ {known.label if known else surgery}"


def gap_closed(rows: list[dict], base: str = "task_arithmetic") -> dict[str, float]:
    """Fraction of the gap between ``base`` and the experts that each surgery closes."""
    avg = {(r["method"], r["surgery"]): r["avg"] for r in rows}
    ind, b = avg.get(("individual", "none")), avg.get((base, "none"))
    if ind is None or b is None or ind == b:
        return {}
    return {s: (avg[(base, s)] - b) / (ind - b) for s in SURGERY_METHODS if (base, s) in avg}


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
        name = row_name(r["method"], r["surgery"])
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
    ref = report.get("reference")
    if ref:
        lines += [
            "",
            f"Published figures beside this run's, as measured / published (%): {ref['name']} "
            f"({ref['source']}). A dash: no such row on that side.",
            "",
            "| method | " + " | ".join(tasks) + " | avg |",
            "|---" * (len(tasks) + 2) + "|",
        ]
        for r in ref["rows"]:
            cells = [
                _pair(r["per_task"][t]["measured"], r["per_task"][t]["published"]) for t in tasks
            ]
            cells.append(_pair(r["measured_avg"], r["published_avg"]))
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += engines_table(report.get("engines") or {})
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


def engines_table(summary: dict[str, Any]) -> list[str]:
    """The "Exported engines" table: per artefact its precision, size, accuracy through the
    runtime and its change against the PyTorch model, ONNX Runtime CPU latency, and parity."""
    engines, single = summary.get("engines"), summary.get("single_expert")
    if not engines or not single or "bytes" not in single:
        return []
    lines = [
        "",
        "Exported engines (task arithmetic base; the single expert is "
        f"{single['task']}'s). Accuracy is the engine's, through the runtime from the stored "
        f"test images ({summary.get('test_images', '?')}); the change is against the PyTorch "
        "model it was exported from, in points (worst task in brackets). Latency: ONNX Runtime "
        "on the CPU, per call; parity: against PyTorch on the same images.",
        "",
        "| engine | artefact | bytes | x one expert | accuracy (%) | change (pt) "
        "| ms @1 | ms @8 | max abs logit diff | argmax agreement (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, eng in engines.items():
        for art, d in eng.items():
            if not isinstance(d, dict) or not ("bytes" in d or "error" in d):
                continue  # the engine's own fields (method, mode, source)
            if "error" in d:
                lines.append(f"| {name} | {art} | failed: {d['error'][:80]} | | | | | | | |")
                continue
            p, e = d.get("parity", {}), d.get("evaluation", {})
            delta, latency = e.get("delta", {}), e.get("latency", {})
            change = f"{delta['avg']:+.2f} ({delta['worst_task']:+.1f})" if "avg" in delta else ""
            accuracy = f"{e['avg']:.2f}" if "avg" in e else ""
            ms = [
                f"{latency[k]['median_ms']:.3f}" if k in latency else ""
                for k in ("batch_1", "batch_8")
            ]
            lines.append(
                f"| {name} | {art} | {d['bytes']} | {d['bytes'] / single['bytes']:.2f} | "
                f"{accuracy} | {change} | {ms[0]} | {ms[1]} | "
                f"{p.get('max_abs_diff', float('nan')):.2e} | "
                f"{p.get('argmax_agreement', float('nan')):.2f} |"
            )
    return lines


def _pair(measured: float | None, published: float | None) -> str:
    def fmt(v):
        return "–" if v is None else f"{v:.1f}"

    return f"{fmt(measured)} / {fmt(published)}"


def _save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib  # deferred: a second to import, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred with matplotlib, after choosing the backend

    return plt


def plot_accuracy(report: dict, path: Path) -> Path:
    """One panel per merge method: merged / w/ Surgery / w/ SurgeryV2 per task, experts marked."""
    plt = pyplot()

    tasks, rows = report["tasks"], report["results"]
    by = {(r["method"], r["surgery"]): r for r in rows}
    merges = [
        m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("individual", "pretrained")
    ]
    variants = [s for s in (NONE, *SURGERY_METHODS) if any((m, s) in by for m in merges)]
    fig, axes = plt.subplots(
        len(merges),
        1,
        figsize=(max(7, 1.1 * len(tasks)), 2.1 * len(merges)),
        sharex=True,
        squeeze=False,
    )
    x, width = np.arange(len(tasks)), 0.8 / max(1, len(variants))
    experts = by.get(("individual", "none"))
    for ax, merge in zip(axes[:, 0], merges):
        for i, s in enumerate(variants):
            r = by.get((merge, s))
            if r is not None:
                ax.bar(
                    x + (i - (len(variants) - 1) / 2) * width,
                    [r["per_task"][t] for t in tasks],
                    width,
                    label=f"{row_name('merged', s)} ({r['avg']:.1f})",
                )
        if experts:
            ax.scatter(
                x,
                [experts["per_task"][t] for t in tasks],
                marker="_",
                s=300,
                c="k",
                label=f"experts ({experts['avg']:.1f})",
                zorder=3,
            )
        ax.set_ylim(0, 118)
        ax.set_yticks([0, 25, 50, 75, 100])
        ax.set_ylabel(merge, fontsize=8)
        ax.legend(fontsize=6, ncol=4, loc="upper left", frameon=False)
    axes[-1, 0].set_xticks(x, tasks, rotation=20)
    fig.suptitle("Test accuracy (%) per task: each merge, before and after surgery")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return path


def plot_bias(report: dict, path: Path) -> Path:
    plt = pyplot()

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

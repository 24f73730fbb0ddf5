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
            f"Published figures beside this run's, as measured / published (%): {ref['name']}. "
            "A dash: no such row or cell on that side (some sources print only an average). "
            "The number after each method names its source, listed below the table.",
            "",
            "| method | " + " | ".join(tasks) + " | avg |",
            "|---" * (len(tasks) + 2) + "|",
        ]
        sources: list[str] = []
        for r in ref["rows"]:
            source = r.get("source") or ref["source"]
            if source not in sources:
                sources.append(source)
            cells = [
                _pair(r["per_task"][t]["measured"], r["per_task"][t]["published"]) for t in tasks
            ]
            cells.append(_pair(r["measured_avg"], r["published_avg"]))
            label = f"{r['label']} [{sources.index(source) + 1}]"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Sources:"] + [f"{i}. {s}." for i, s in enumerate(sources, 1)]
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


def _variant(surgery: str) -> str:
    """``merged`` for no surgery, else ``w/ <label>`` (the legend's names)."""
    known = SURGERY_METHODS.get(surgery)
    return "merged" if surgery == NONE else f"w/ {known.label if known else surgery}"


def plot_accuracy(report: dict, path: Path) -> Path:
    """One panel per merge method: merged / w/ Surgery / w/ SurgeryV2 per task, experts marked.

    Every panel is titled with its merge and its y axis is the accuracy in %; one legend for the
    whole figure sits below the panels (the averages are in each panel's title), so no bar is
    hidden behind it.
    """
    plt = pyplot()

    tasks, rows = report["tasks"], report["results"]
    by = {(r["method"], r["surgery"]): r for r in rows}
    merges = [
        m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("individual", "pretrained")
    ]
    variants = [s for s in (NONE, *SURGERY_METHODS) if any((m, s) in by for m in merges)]
    labels = {s: _variant(s) for s in variants}
    colours = dict(zip(variants, ("tab:gray", "tab:orange", "tab:green", "tab:blue")))
    fig, axes = plt.subplots(
        len(merges),
        1,
        figsize=(max(8, 1.2 * len(tasks)), 2.3 * len(merges) + 1.0),
        sharex=True,
        squeeze=False,
    )
    x, width = np.arange(len(tasks)), 0.8 / max(1, len(variants))
    experts = by.get(("individual", NONE))
    for ax, merge in zip(axes[:, 0], merges):
        averages = []
        for i, s in enumerate(variants):
            r = by.get((merge, s))
            if r is None:
                continue
            ax.bar(
                x + (i - (len(variants) - 1) / 2) * width,
                [r["per_task"][t] for t in tasks],
                width,
                color=colours[s],
                label=labels[s],
            )
            averages.append(f"{labels[s]} {r['avg']:.1f}")
        if experts:
            ax.scatter(
                x,
                [experts["per_task"][t] for t in tasks],
                marker="_",
                s=400,
                linewidths=2,
                c="k",
                label="experts (one model per task)",
                zorder=3,
            )
            averages.append(f"experts {experts['avg']:.1f}")
        ax.set_title(f"{merge}: average " + ", ".join(averages), fontsize=9, loc="left")
        ax.set_ylim(0, 105)
        ax.set_yticks([0, 25, 50, 75, 100])
        ax.set_ylabel("accuracy (%)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(x, tasks, rotation=20, fontsize=9)
    axes[-1, 0].set_xlabel("task (test split)", fontsize=9)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    fig.suptitle("Test accuracy per task: each merge, before and after surgery", fontsize=11)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    _save_fig(fig, path)
    plt.close(fig)
    return path


def _coinciding(a: dict[str, float], b: dict[str, float]) -> list[str]:
    """The sites where two bias curves are equal (to plotting precision)."""
    return [site for site in a if site in b and abs(a[site] - b[site]) <= 1e-6 * (1 + abs(a[site]))]


def plot_bias(report: dict, path: Path) -> Path:
    """Representation bias per site, one panel per merge. A curve that lies on the merged one
    (V1 corrects only the final feature, so it equals the merge at every block) is said so in
    the caption, and the merged curve is drawn wide underneath so that both stay visible."""
    plt = pyplot()

    bias = report["representation_bias"]
    merges = list(bias)
    palette = iter(("tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:red"))
    colours: dict[str, str] = {}
    fig, axes = plt.subplots(
        1, len(merges), figsize=(3.3 * len(merges), 4.2), sharey=True, squeeze=False
    )
    notes: dict[str, set[str]] = {}
    for ax, merge in zip(axes[0], merges):
        curves = bias[merge]
        base = curves.get(NONE)
        for s, vals in curves.items():
            sites, values = list(vals), list(vals.values())
            if s == NONE:
                ax.plot(sites, values, color="tab:gray", linewidth=5, alpha=0.45, marker="o",
                        markersize=9, label=_variant(s), zorder=1)  # fmt: skip
                continue
            colour = colours.setdefault(s, next(palette, "k"))
            ax.plot(sites, values, color=colour, linestyle="--", marker="s", markersize=5,
                    label=_variant(s), zorder=2)  # fmt: skip
            same = _coinciding(vals, base) if base is not None else []
            if same:
                notes.setdefault(s, set()).add(
                    same[0] if len(same) == 1 else f"{same[0]} to {same[-1]}"
                )
        ax.set_title(merge, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.set_xlabel("site (block output, final feature)", fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("mean L1 distance to the experts", fontsize=9)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    caption = []
    for s, where in notes.items():
        method = SURGERY_METHODS.get(s)
        why = "" if method is None or method.every_block else " (it corrects only the final site)"
        caption.append(
            f"{_variant(s)} equals merged at {' / '.join(sorted(where))}{why}: "
            "its dashed curve lies on the wide grey one there."
        )
    if caption:
        fig.text(0.5, 0.09, "\n".join(caption), ha="center", fontsize=8, style="italic")
    fig.suptitle(
        "Representation bias per site, before and after surgery (lower is closer to the experts)",
        fontsize=11,
    )
    bottom = (0.45 + 0.2 * len(caption) + 0.1) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))
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

"""The benchmarks' plots: the engine benchmark's latency and weights, and the axis helpers and
writer the task-scaling and sweep plots share (:mod:`~surgery_edge.bench.replot` draws a
record's plots again from its JSON).

Each plot is a function that returns a matplotlib figure (tests read its axes, labels and lines)
and a writer that saves it; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery_edge.bench.choices import CONFIGS, MODES, PATHS
from surgery_edge.bench.ratios import COUNTERPART
from surgery_edge.bench.workloads import RANDOM_WEIGHTS_NOTE, EngineResult
from surgery_edge.evaluation.report import pyplot
from surgery_edge.io import atomic_path

# one colour per configuration, in every engine plot
COLOURS = dict(
    zip(
        CONFIGS,
        (
            "tab:red",
            "tab:orange",
            "tab:pink",
            "tab:purple",
            "tab:brown",
            "tab:gray",
            "tab:blue",
            "tab:green",
        ),
        strict=True,  # a configuration without a colour is a KeyError in the latency plot
    )
)
# the runtimes the latency plot has a panel for: each path, its fused twin in its panel
RUNTIMES = tuple(p for p in PATHS if p not in COUNTERPART)
ONE_EXPERT_ANALYTIC = "one_expert"  # derived["weight_bytes"]: encoder + head, from the shapes


def save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically) and close it."""
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def plain_ticks(axis: Any, values: Sequence[float]) -> None:
    """Ticks at exactly ``values``, labelled as plain numbers (500, not 2^9), no minor ticks."""
    axis.set_ticks(list(values), [f"{v:g}" for v in values])
    axis.set_minor_locator(_matplotlib_ticker().NullLocator())


def plain_scale(ax: Any, values: Sequence[float], axis: str = "y", log_from: float = 4.0) -> None:
    """``ax``'s ``axis`` ("x" or "y") on a log scale with ticks at 1, 2, 5 x 10^k labelled as
    plain numbers when ``values`` span more than ``log_from`` times, else on a linear scale
    without offset or exponent (values a few percent apart stay readable)."""
    ticker = _matplotlib_ticker()
    low, high = min(values), max(values)
    target = ax.yaxis if axis == "y" else ax.xaxis
    if low > 0 and high / low > log_from:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        target.set_major_locator(ticker.LogLocator(base=10, subs=(1, 2, 5)))
        target.set_minor_locator(ticker.NullLocator())
    target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def _matplotlib_ticker():
    pyplot()  # the Agg backend first
    from matplotlib import ticker  # deferred with pyplot

    return ticker


# --- the engine benchmark --------------------------------------------------------------------


def latency_figure(results: Sequence[EngineResult], arch: str, label: str) -> Any:
    """Median latency against batch: a row of panels per mode, a column per runtime.

    A panel holds one line per configuration on that runtime's path (colour: configuration,
    the same in every panel), and the fused (Triton) twin of an engine dashed beside its eager
    or CUDA-graph line: what a reader compares, the engines against the baselines on one
    runtime, is side by side; every panel shares both axes, so runtimes compare too.
    """
    plt = pyplot()
    ok = [r for r in results if r.status == "ok"]
    modes = [m for m in MODES if any(r.mode == m for r in ok)]
    runtimes = [p for p in RUNTIMES if any(COUNTERPART.get(r.path, r.path) == p for r in ok)]
    batches = sorted({r.batch for r in ok})
    fig, axes = plt.subplots(
        len(modes),
        len(runtimes),
        figsize=(1.0 + 3.3 * len(runtimes), 1.6 + 2.9 * len(modes)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    shown, fused_shown = [], False
    for row, mode in zip(axes, modes):
        for ax, runtime in zip(row, runtimes):
            here, fused = _latency_panel(ax, ok, mode, runtime, batches)
            shown += [c for c in here if c not in shown]
            fused_shown |= fused
        row[0].set_ylabel(f"{mode}: median ms per call", fontsize=8)
    ms = [r.median_ms for r in ok]
    plain_scale(axes[0][0], ms, log_from=1.0)  # the y axis is shared by every panel
    for ax in axes[-1]:
        ax.set_xlabel("batch (images per call)", fontsize=8)
    inch = 1 / fig.get_figheight()  # figure coordinates per inch of height
    legend_rows = _latency_legend(fig, shown, fused_shown, inch)
    fig.suptitle(
        f"{arch}: median latency per call against batch\n{label} ({RANDOM_WEIGHTS_NOTE})",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, (0.75 + 0.2 * legend_rows) * inch, 1, 1))  # room for the legend
    return fig


def _latency_panel(
    ax: Any, ok: Sequence[EngineResult], mode: str, runtime: str, batches: Sequence[int]
) -> tuple[list[str], bool]:
    """One panel of the latency plot: a line per configuration measured in ``mode`` on
    ``runtime``'s path, its fused twin dashed, and which configurations are not there;
    returns the configurations drawn (each once, in order) and whether a fused twin was."""
    here, fused_here = [], False
    for config in CONFIGS:
        for path in (runtime, *(p for p, base in COUNTERPART.items() if base == runtime)):
            line = sorted(
                (r.batch, r.median_ms)
                for r in ok
                if (r.config, r.mode, r.path) == (config, mode, path)
            )
            if not line:
                continue
            fused = path != runtime
            ax.plot(
                *zip(*line),
                color=COLOURS[config],
                linestyle="--" if fused else "-",
                marker="s" if fused else "o",
                markersize=4,
                label=f"{config} ({path})",
            )
            here += [config] if config not in here else []  # its twin too: once
            fused_here |= fused
    ax.set_title(f"{mode}, {runtime}", fontsize=9)
    absent = [c for c in CONFIGS if c not in here]
    if absent and here:
        ax.text(0.02, 0.98, "not here: " + ", ".join(absent), transform=ax.transAxes,
                fontsize=6.5, va="top", color="0.3")  # fmt: skip
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xscale("log")
    plain_ticks(ax.xaxis, batches)
    if not here:
        ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center")
    return here, fused_here


def _latency_legend(fig: Any, shown: Sequence[str], fused_shown: bool, inch: float) -> int:
    """The latency plot's legend under its panels (a colour per configuration drawn, the fused
    twin's dashes) and the note on what "not here" means, placed ``inch`` (figure coordinates
    per inch of height) apart; returns the legend's rows."""
    from matplotlib.lines import Line2D  # deferred with pyplot

    handles = [Line2D([], [], color=COLOURS[c], marker="o", label=c) for c in shown]
    if fused_shown:
        handles.append(
            Line2D([], [], color="k", linestyle="--", marker="s", label="fused (Triton) twin")
        )
    fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.2 * inch),
        ncol=min(4, len(handles)),
        fontsize=8,
        frameon=False,
        title="configuration (colour, the same in every panel)",
        title_fontsize=8,
    )
    fig.text(
        0.5,
        0.06 * inch,
        "not here: configurations that run in the other mode only, have no engine on that "
        "path, or were not measured there (the Markdown report says which)",
        ha="center",
        fontsize=7,
        color="0.3",
    )
    return -(-len(handles) // 4)


def weight_names(weights: dict[str, int]) -> dict[str, str]:
    """The bars of the weights plot, ``{key in weights: label}``, each label once.

    ``derived["weight_bytes"]`` holds the analytic size of one expert (``one_expert``) beside
    every configuration's measured one, ``one-expert`` among them: where both are there and
    equal, one bar says it; where they differ, the analytic one is labelled as such.
    """
    names = {c: c for c in CONFIGS if c in weights}
    analytic = weights.get(ONE_EXPERT_ANALYTIC)
    if analytic is not None and weights.get("one-expert") != analytic:
        names = {ONE_EXPERT_ANALYTIC: "one expert (analytic)", **names}
    return names


def weights_figure(weights: dict[str, int], arch: str, dtype: str) -> Any:
    """The weights each configuration holds, in MiB, as horizontal bars (the names never
    overlap), each with its ratio to one expert."""
    plt = pyplot()
    names = weight_names(weights)
    one = weights.get(ONE_EXPERT_ANALYTIC) or weights.get("one-expert")
    keys = list(names)[::-1]  # the first at the top
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(keys) + 1.3))
    mib = [weights[k] / 2**20 for k in keys]
    bars = ax.barh([names[k] for k in keys], mib, color=[COLOURS.get(k, "tab:olive") for k in keys])
    for bar, k in zip(bars, keys):
        ax.annotate(
            f" {weights[k] / 2**20:.1f} MiB, {weights[k] / one:.2f}x one expert",
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            va="center",
            fontsize=8,
        )
    ax.set_xlim(0, 1.45 * max(mib))  # room for the annotations
    ax.set_xlabel(f"weights held in memory (MiB, {dtype})")
    ax.set_title(f"{arch}: weights held, against one expert", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def write_plots(
    results: Sequence[EngineResult], derived: dict[str, Any], out: Path, arch: str, label: str
) -> list[Path]:
    """``<out>/engine-<arch>-latency.png`` and ``-weights.png``; returns their paths."""
    latency = save(latency_figure(results, arch, label), out / f"engine-{arch}-latency.png")
    weights = weights_figure(derived["weight_bytes"], arch, results[0].dtype)
    return [latency, save(weights, out / f"engine-{arch}-weights.png")]


def engine_results(record: dict[str, Any]) -> list[EngineResult]:
    """The rows of an ``engine-<arch>.json`` record (fields it does not know are left out)."""
    known = set(EngineResult.__dataclass_fields__)
    return [EngineResult(**{k: v for k, v in r.items() if k in known}) for r in record["results"]]

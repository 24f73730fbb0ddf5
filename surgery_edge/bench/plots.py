"""The engine benchmark's plots: latency against batch size, and the weight memory held."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery_edge.bench.workloads import (
    ALL_TASKS,
    CONFIG_MODES,
    CONFIGS,
    MODES,
    RANDOM_WEIGHTS_NOTE,
    EngineResult,
)
from surgery_edge.evaluation.report import pyplot


def write_plots(
    results: Sequence[EngineResult], derived: dict[str, Any], out: Path, arch: str, label: str
) -> list[Path]:
    """``<out>/engine-<arch>-latency.png`` and ``-weights.png`` (matplotlib, Agg backend).

    The latency plot's legends sit below the panels (colour: configuration; line and marker:
    path), and a panel says which configurations it lacks and why (V1, the stacked experts and
    one expert run all-tasks only).
    """
    plt = pyplot()
    from matplotlib.lines import Line2D  # deferred with pyplot

    ok = [r for r in results if r.status == "ok"]
    palette = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:gray", "tab:blue")
    colours = dict(zip(CONFIGS, (*palette, "tab:green")))
    # path -> (line style, marker)
    styles = {
        "eager": ("-", "o"),
        "fused": ("--", "s"),
        "compile": (":", "^"),
        "cuda-graph": ("-.", "D"),
        "fused+cuda-graph": ((0, (3, 1, 1, 1)), "P"),
        "onnxruntime": ((0, (5, 2)), "x"),
        "tensorrt": ((0, (1, 1)), "*"),
    }
    batches = sorted({r.batch for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), sharey=True)
    shown_configs: list[str] = []
    shown_paths: list[str] = []
    for ax, mode in zip(axes, MODES):
        for config in CONFIGS:
            for path, (linestyle, marker) in styles.items():
                rows = sorted(
                    (r for r in ok if (r.config, r.mode, r.path) == (config, mode, path)),
                    key=lambda r: r.batch,
                )
                if rows:
                    ax.plot(
                        [r.batch for r in rows],
                        [r.median_ms for r in rows],
                        marker=marker,
                        color=colours[config],
                        linestyle=linestyle,
                    )
                    shown_configs += [config] if config not in shown_configs else []
                    shown_paths += [path] if path not in shown_paths else []
        ax.set(xscale="log", yscale="log", xlabel="batch (images per call)", title=mode)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        absent = [c for c in CONFIGS if mode not in CONFIG_MODES[c] and c in shown_configs]
        if absent:
            ax.text(
                0.02,
                0.98,
                f"not in {mode}: {', '.join(absent)}\n(they run {ALL_TASKS} only)",
                transform=ax.transAxes,
                fontsize=7,
                va="top",
            )
    axes[0].set_ylabel("median latency per call (ms)")
    config_handles = [Line2D([], [], color=colours[c], linewidth=3, label=c) for c in shown_configs]
    path_handles = [
        Line2D([], [], color="k", linestyle=styles[p][0], marker=styles[p][1], label=p)
        for p in shown_paths
    ]
    legend = fig.legend(
        handles=config_handles,
        title="configuration (colour)",
        loc="lower left",
        bbox_to_anchor=(0.06, 0.0),
        ncol=min(4, len(config_handles)),
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    fig.add_artist(legend)
    fig.legend(
        handles=path_handles,
        title="path (line and marker)",
        loc="lower right",
        bbox_to_anchor=(0.98, 0.0),
        ncol=min(3, len(path_handles)),
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    fig.suptitle(f"{arch}: {label} ({RANDOM_WEIGHTS_NOTE})", fontsize=9)
    rows_below = -(-len(config_handles) // 4)
    fig.tight_layout(rect=(0, (0.45 + 0.22 * rows_below) / fig.get_figheight(), 1, 1))
    latency = out / f"engine-{arch}-latency.png"
    fig.savefig(latency, dpi=120)
    plt.close(fig)

    weights = derived["weight_bytes"]
    names = ["one_expert", *[c for c in CONFIGS if c in weights]]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    values = [weights[n] / 2**20 for n in names]
    bars = ax.bar(names, values, color=["tab:olive", *[colours[n] for n in names[1:]]])
    for bar, n in zip(bars, names):
        ax.annotate(
            f"{weights[n] / weights['one_expert']:.2f}x",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(
        ylabel="weight memory (MiB)",
        title=f"{arch}: weights held in memory ({results[0].dtype}; ratio vs one expert)",
    )
    fig.tight_layout()
    weights_png = out / f"engine-{arch}-weights.png"
    fig.savefig(weights_png, dpi=120)
    plt.close(fig)
    return [latency, weights_png]

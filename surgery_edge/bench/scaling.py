"""Cost as tasks grow: engine size, latency and throughput for T = 1, 2, 4, 8, 14, 20 tasks.

    python benchmarks/bench_scaling.py --arch tiny-vit-32 --out benchmarks/results/cpu

For every T, four ONNX engines are exported and timed with ONNX Runtime on one batch of
``--batch`` images (routed: task ids cycling over the T tasks): the merged backbone with its T
heads (all tasks, and routed), Surgery (V1) answering all tasks, and SurgeryV2 routed. They are
set against T separate experts: T one-task engines, whose size is the sum of theirs and whose
time is T calls of one (all tasks: each expert on the whole batch; routed: each on its own
images). Random weights: cost only, no accuracy. The goals the record checks at the largest T:
V1 all tasks within 1.1x the merged backbone, V2 routed within 1.05x. ``--no-experts`` leaves the
experts out (at ViT-B width, T one-task engines are most of the export and timing time).

Writes ``scaling-<arch>.json``, ``.md`` and ``.png`` into ``--out``, with the command and the
machine's ``/proc/loadavg`` before and after (CPU timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery_edge.bench.env import environment
from surgery_edge.bench.flops import task_classes
from surgery_edge.bench.plots import plain_scale, plain_ticks, save
from surgery_edge.bench.proc import loadavg_text
from surgery_edge.bench.report import command_line, fmt, table, write_record_set
from surgery_edge.bench.timing import TIMER, Contestant, interleaved
from surgery_edge.engine_format import EngineMode
from surgery_edge.evaluation.report import pyplot
from surgery_edge.export.onnx import export_onnx
from surgery_edge.models import ClassificationHead, build_encoder, get_arch
from surgery_edge.runtime.backends import OnnxBackend
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.methods import SURGERY, SURGERY_V2, engine_name, method_engines
from surgery_edge.surgery.model import MultiTaskModel

TASK_COUNTS = (1, 2, 4, 8, 14, 20)
GOALS = {"v1_all_tasks": 1.10, "v2_routed": 1.05}  # x the merged backbone, same mode, largest T
ALL_TASKS, ROUTED = EngineMode.ALL_TASKS, EngineMode.ROUTED
# the names (from the method registry) of the engines compared: each surgery method's engine
# and the merged backbone alone in the same mode
MERGED_ALL, MERGED_ROUTED = engine_name(None, ALL_TASKS), engine_name(None, ROUTED)
V1, V2 = engine_name(SURGERY), engine_name(SURGERY_V2)
# engine name -> (adapter method or None, mode)
ENGINES = {
    MERGED_ALL: (None, ALL_TASKS),
    V1: method_engines()[V1],
    MERGED_ROUTED: (None, ROUTED),
    V2: method_engines()[V2],
}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The task-scaling benchmark's options."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-vit-32")
    p.add_argument("--tasks", default=",".join(map(str, TASK_COUNTS)), help="T values, e.g. 1,8")
    p.add_argument("--batch", type=int, default=32, help="images per call")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds over the engines")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=4.0,
        help="time per engine over all rounds (each round: a torch.utils.benchmark block)",
    )
    p.add_argument(
        "--no-experts",
        dest="experts",
        action="store_false",
        help="time the merged and surgery engines only (not T separate experts)",
    )
    p.add_argument("--out", type=Path, help="folder for the JSON, Markdown and plot")
    return p


class _Timer:
    """Exports engines and times them in interleaved rounds (load drift on a shared machine then
    affects every engine of a comparison alike); one-expert engines are kept by class count."""

    def __init__(self, args: argparse.Namespace, folder: Path):
        self.args, self.folder, self.cpu = args, folder, torch.device("cpu")
        self.arch = get_arch(args.arch)
        torch.manual_seed(0)
        self.encoder = build_encoder(self.arch).eval()
        size = self.arch.image_size
        rng = np.random.default_rng(0)
        self.images = rng.standard_normal((args.batch, 3, size, size)).astype(np.float32)
        self._experts: dict[int, tuple[OnnxBackend, int]] = {}
        self._n = 0

    def engine(self, model: MultiTaskModel, mode: EngineMode) -> tuple[OnnxBackend, int]:
        self._n += 1
        path = export_onnx(model, self.folder / f"engine{self._n}.onnx", mode, check=False)
        return OnnxBackend(path, device="cpu", threads=self.args.threads), path.stat().st_size

    def expert(self, classes: int) -> tuple[OnnxBackend, int]:
        """The one-task engine of an expert with ``classes`` classes, and its bytes."""
        if classes not in self._experts:
            head = ClassificationHead(torch.randn(classes, self.arch.embed_dim))
            model = MultiTaskModel(self.encoder, [head], ["t0"])
            self._experts[classes] = self.engine(model, "routed")
        return self._experts[classes]

    def medians(self, calls: dict[Any, Any]) -> dict[Any, float]:
        """Median ms of every call over ``--rounds`` interleaved rounds (the library's
        :func:`~surgery_edge.bench.timing.interleaved`), each round at least
        ``--max-seconds / --rounds`` per call."""
        a = self.args
        for fn in calls.values():  # warm: the first call of an ONNX Runtime session is slow
            for _ in range(max(1, a.warmup)):
                fn()
        threads = torch.get_num_threads()
        contestants = [Contestant(key, fn, threads) for key, fn in calls.items()]
        done, failed = interleaved(contestants, self.cpu, a.rounds, a.max_seconds / a.rounds)
        if failed:
            key, error = next(iter(failed.items()))
            raise RuntimeError(f"timing {key} failed: {error}") from error
        return {key: done[key].median for key in calls}


def measure_tasks(timer: _Timer, T: int) -> dict[str, Any]:
    """Every engine of ``T`` tasks, and T separate experts."""
    arch, args = timer.arch, timer.args
    classes = task_classes(arch, T)
    tasks = [f"task{t}" for t in range(T)]
    heads = [ClassificationHead(torch.randn(c, arch.embed_dim)) for c in classes]
    ids = np.arange(args.batch, dtype=np.int64) % T
    images = timer.images
    calls, sizes = {}, {}
    for name, (method, mode) in ENGINES.items():
        bank = None if method is None else AdapterBank(tasks, arch, method, args.rank)
        backend, sizes[name] = timer.engine(MultiTaskModel(timer.encoder, heads, tasks, bank), mode)
        feed = ids if mode is ROUTED else None
        calls[name] = lambda b=backend, f=feed: b.run(images, f)
    # T experts: each on the whole batch (all tasks) or on its own images (routed)
    shares = [int((ids == t).sum()) for t in range(T)]
    if args.experts:
        for c, n in {(c, args.batch) for c in classes} | set(zip(classes, shares)):
            backend = timer.expert(c)[0]
            if n:
                calls[(c, n)] = lambda b=backend, n=n: b.run(images[:n], np.zeros(n, np.int64))
    ms = timer.medians(calls)
    row: dict[str, Any] = {"tasks": T, "classes": classes, "engines": {}}
    for name in ENGINES:
        row["engines"][name] = _entry(ms[name], sizes[name], args.batch)
    e = row["engines"]
    row["ratios"] = {
        "v1_all_tasks": _ratio(e[V1], e[MERGED_ALL]),
        "v2_routed": _ratio(e[V2], e[MERGED_ROUTED]),
    }
    if args.experts:
        expert_bytes = sum(timer.expert(c)[1] for c in classes)
        all_ms = sum(ms[(c, args.batch)] for c in classes)
        routed_ms = sum(ms[(c, n)] for c, n in zip(classes, shares) if n)
        e["experts-all-tasks"] = _entry(all_ms, expert_bytes, args.batch)
        e["experts-routed"] = _entry(routed_ms, expert_bytes, args.batch)
        row["ratios"]["experts_all_tasks"] = _ratio(e["experts-all-tasks"], e[MERGED_ALL])
        row["ratios"]["experts_routed"] = _ratio(e["experts-routed"], e[MERGED_ROUTED])
    return row


def _entry(ms: float, size: int, batch: int) -> dict[str, float]:
    return {
        "median_ms": round(ms, 4),
        "images_per_s": round(batch / (ms / 1e3), 1),
        "engine_bytes": int(size),
    }


def _ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {
        "latency": round(a["median_ms"] / b["median_ms"], 4),
        "engine_bytes": round(a["engine_bytes"] / b["engine_bytes"], 4),
    }


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Parse ``argv``, measure every T, write the record, the report and the plot."""
    args = build_parser(prog).parse_args(argv)
    counts = sorted({int(t) for t in args.tasks.split(",")})
    if not counts or counts[0] < 1 or args.batch < max(counts):
        raise SystemExit(f"--tasks must be positive and at most --batch ({args.batch})")
    if args.rounds < 1 or args.max_seconds <= 0:
        raise SystemExit("--rounds must be at least 1 and --max-seconds above 0")
    torch.set_num_threads(max(1, args.threads))
    load_before, start = loadavg_text(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        timer = _Timer(args, Path(tmp))
        rows = [measure_tasks(timer, T) for T in counts]
    largest = rows[-1]
    goals = {
        name: {
            "tasks": largest["tasks"],
            "limit": limit,
            "latency": largest["ratios"][name]["latency"],
            "met": largest["ratios"][name]["latency"] <= limit,
        }
        for name, limit in GOALS.items()
    }
    env = environment("cpu")
    record = {
        "benchmark": "task-scaling",
        "arch": timer.arch.name,
        "batch": args.batch,
        "rank": args.rank,
        "onnxruntime_threads": args.threads,
        "weights": "random (cost only)",
        "experts": args.experts,
        "timer": f"{TIMER}, median per call over {args.rounds} interleaved rounds",
        "command": command_line(argv, prog or f"{__name__}.main"),
        "loadavg_before": load_before,
        "loadavg_after": loadavg_text(),
        "seconds": round(time.perf_counter() - start, 1),
        "environment": env,
        "goals": goals,
        "results": rows,
    }
    if args.out is not None:
        write_record_set(args.out, f"scaling-{timer.arch.name}", record, markdown(record), plot)
    return record


def markdown(record: dict[str, Any]) -> list[str]:
    """The record as a Markdown report."""
    rows = record["results"]
    names = list(rows[0]["engines"])
    lines = [
        f"# Task scaling: {record['arch']}, batch {record['batch']}, rank {record['rank']}",
        "",
        f"`{record['command']}`",
        "",
        f"CPU: {record['environment'].get('device_name', '?')}; ONNX Runtime with "
        f"{record['onnxruntime_threads']} thread(s); {record['timer']}; /proc/loadavg "
        f"before `{record['loadavg_before']}`, after `{record['loadavg_after']}` (shared "
        "machine: timings are noisy). Random weights.",
        "",
        "## Median latency per call (ms)",
        "",
    ]
    if not record.get("experts", True):
        lines += ["Separate experts not timed (`--no-experts`).", ""]
    lines += table(
        ["T", *names],
        [
            [str(r["tasks"]), *(fmt(r["engines"][n]["median_ms"], ".3f") for n in names)]
            for r in rows
        ],
    )
    lines += ["", "## Engine size (MB)", ""]
    lines += table(
        ["T", *names],
        [
            [str(r["tasks"]), *(fmt(r["engines"][n]["engine_bytes"] / 1e6, ".2f") for n in names)]
            for r in rows
        ],
    )
    lines += ["", "## Throughput (images per second)", ""]
    lines += table(
        ["T", *names],
        [
            [str(r["tasks"]), *(fmt(r["engines"][n]["images_per_s"], ".0f") for n in names)]
            for r in rows
        ],
    )
    lines += ["", "## Against the merged backbone (latency x, size x)", ""]
    ratio_names = list(rows[0]["ratios"])
    lines += table(
        ["T", *ratio_names],
        [
            [
                str(r["tasks"]),
                *(
                    f"{fmt(r['ratios'][n]['latency'], '.3f')} / "
                    f"{fmt(r['ratios'][n]['engine_bytes'], '.3f')}"
                    for n in ratio_names
                ),
            ]
            for r in rows
        ],
    )
    lines += ["", "## Goals (latency at the largest T)", ""]
    for name, goal in record["goals"].items():
        verdict = "met" if goal["met"] else "NOT met"
        lines.append(
            f"- {name}: {goal['latency']:.3f}x at T = {goal['tasks']} (goal <= {goal['limit']}x): "
            f"{verdict}"
        )
    return lines


STYLES = {  # engine -> (colour, line style): routed dashed, experts red
    MERGED_ALL: ("tab:gray", "-"),
    V1: ("tab:blue", "-"),
    MERGED_ROUTED: ("tab:gray", "--"),
    V2: ("tab:green", "--"),
    "experts-all-tasks": ("tab:red", "-"),
    "experts-routed": ("tab:red", "--"),
}
# a goal's ratio -> (its engine's line, a label)
GOAL_LINES = {
    "v1_all_tasks": (V1, "V1 all tasks / merged all tasks"),
    "v2_routed": (V2, "V2 routed / merged routed"),
}


def figure(record: dict[str, Any]) -> Any:
    """Three panels against T: latency per call (ms), engine size (MB), and the goals' ratio,
    each engine's latency over the merged backbone's in the same mode, on a linear axis with
    each goal's limit drawn (the ratio a log axis of milliseconds cannot show)."""
    plt = pyplot()
    rows = record["results"]
    tasks = [r["tasks"] for r in rows]
    names = list(rows[0]["engines"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    for ax, key, label, scale in (
        (axes[0], "median_ms", "median latency per call (ms)", 1.0),
        (axes[1], "engine_bytes", "engine size (MB)", 1e-6),
    ):
        values = []
        for name in names:
            colour, line = STYLES[name]
            ys = [r["engines"][name][key] * scale for r in rows]
            ax.plot(tasks, ys, line, color=colour, marker="o", ms=3, label=name)
            values += ys
        ax.set_xlabel("tasks T")
        ax.set_ylabel(label)
        plain_scale(ax, values)
        plain_ticks(ax.xaxis, tasks)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    ax, shown = axes[2], [1.0]
    for name, (engine, label) in GOAL_LINES.items():
        colour, line = STYLES[engine]
        ratios = [r["ratios"][name]["latency"] for r in rows]
        ax.plot(tasks, ratios, line, color=colour, marker="o", ms=3, label=label)
        goal = record["goals"][name]
        ax.axhline(goal["limit"], color=colour, linestyle=":", linewidth=1)
        ax.annotate(f"limit {goal['limit']:g}x", (tasks[-1], goal["limit"]), xytext=(0, 2),
                    textcoords="offset points", ha="right", fontsize=7, color=colour)  # fmt: skip
        shown += [*ratios, goal["limit"]]
        ax.annotate(
            f"{goal['latency']:.3f}x ({'met' if goal['met'] else 'NOT met'}: "
            f"goal <= {goal['limit']:g}x)",
            (goal["tasks"], goal["latency"]),
            xytext=(-6, 6 if name == "v1_all_tasks" else -12),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color=colour,
        )
    ax.axhline(1.0, color="k", linewidth=0.6)
    low, high = min(shown), max(shown)
    ax.set_ylim(low - 0.08 * (high - low), high + 0.35 * (high - low))  # the legend above all
    ax.set_xlabel("tasks T")
    ax.set_ylabel("latency / merged backbone's, same mode (x)")
    ax.set_title("the goals: dotted lines are the limits", fontsize=9)
    plain_ticks(ax.xaxis, tasks)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    last = rows[-1]
    sizes = {name: last["ratios"][name]["engine_bytes"] for name in GOAL_LINES}
    axes[1].set_title(
        f"at T = {tasks[-1]}: V1 {sizes['v1_all_tasks']:.2f}x, V2 {sizes['v2_routed']:.2f}x"
        + (
            f", experts {last['ratios']['experts_all_tasks']['engine_bytes']:.1f}x"
            if "experts_all_tasks" in last["ratios"]
            else ""
        )
        + " the merged engine's size",
        fontsize=8,
    )
    if "experts_all_tasks" in last["ratios"]:
        e = last["ratios"]
        axes[0].set_title(
            f"at T = {tasks[-1]}: separate experts {e['experts_all_tasks']['latency']:.1f}x "
            f"(all tasks), {e['experts_routed']['latency']:.2f}x (routed) the merged latency",
            fontsize=8,
        )
    fig.suptitle(
        f"Cost as tasks grow: {record['arch']}, batch {record['batch']} (CPU, ONNX Runtime, "
        f"{record['onnxruntime_threads']} thread)"
    )
    fig.tight_layout()
    return fig


def plot(record: dict[str, Any], path: Path) -> Path:
    """``path``: the record's :func:`figure` as a PNG."""
    return save(figure(record), path)


__all__ = ["ENGINES", "GOALS", "TASK_COUNTS", "build_parser", "figure", "main", "markdown", "plot"]

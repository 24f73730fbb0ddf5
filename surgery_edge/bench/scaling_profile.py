"""Where the routed SurgeryV2 engine's extra time goes as tasks grow: ONNX Runtime's own
profile, per operator type, for the merged backbone and SurgeryV2 (both routed) at T = 1 and at
the largest T, and the whole-call ratio over many interleaved rounds with its spread.

    python benchmarks/bench_scaling_profile.py --arch tiny-vit-32 --out benchmarks/results/cpu

The task-scaling record (:mod:`surgery_edge.bench.scaling`) gives V2 routed / merged routed at
each T; this one says which operators make the difference. The kernel times of every operator
type are summed per call (ONNX Runtime's profiler, one intra-op thread, after a warm-up), so the
decomposition is exact for the profiled calls:

- ``adapter`` = V2 - merged at the same T, per operator type: the gathers of each row's adapter
  weights (GatherND), the adapters' matrix products (MatMul), ReLU, the subtraction;
- ``with T`` = (V2 at T_max - V2 at T = 1) - (merged at T_max - merged at 1): what grows with
  the number of tasks beyond what the merged engine's own head gather adds.

The whole-call ratio is timed without the profiler, in ``--rounds`` interleaved rounds (each
round: every engine ``--calls`` times, median), so that load drift hits both engines alike;
the record gives its median over rounds and the spread (interquartile range / median).
Random weights: cost only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from surgery_edge.bench.env import environment
from surgery_edge.bench.flops import task_classes
from surgery_edge.bench.report import command_line, fmt, table, write_record_set
from surgery_edge.export.onnx import export_onnx
from surgery_edge.models import ClassificationHead, build_encoder, get_arch
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.methods import MERGED, SURGERY_V2
from surgery_edge.surgery.model import MultiTaskModel

ENGINES = {MERGED: None, SURGERY_V2: SURGERY_V2}  # name -> adapter method (routed mode)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-vit-32")
    p.add_argument("--tasks", type=int, default=20, help="the largest T (set against T = 1)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--profiled-calls", type=int, default=100, help="calls under the profiler")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds of whole calls")
    p.add_argument("--calls", type=int, default=5, help="calls per engine per round")
    p.add_argument("--out", type=Path, help="folder for scaling-profile-<arch>.json and .md")
    return p


def profile_ops(paths: dict[str, Path], feeds: dict[str, dict], calls: int, folder: Path) -> dict:
    """Run every engine of ``paths`` ``calls`` times under ONNX Runtime's profiler, the engines
    interleaved call by call (load drift hits all alike), after 10 warm-up calls each; per
    engine, the median call (µs) and the kernel µs per call of each operator type."""
    sessions = {}
    for name, path in paths.items():
        options = _options()
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / f"profile-{name}")
        sessions[name] = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    for _ in range(10 + calls):
        for name, session in sessions.items():
            session.run(None, feeds[name])
    out = {}
    for name, session in sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
        runs = sorted(runs, key=lambda e: e["ts"])[10:]
        ops: Counter[str] = Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                if e["ts"] >= runs[0]["ts"]:
                    ops[e["args"]["op_name"]] += e["dur"]
        out[name] = {
            "call_us": float(np.median([r["dur"] for r in runs])),
            "kernel_us": sum(ops.values()) / len(runs),
            "ops_us": {op: us / len(runs) for op, us in sorted(ops.items())},
        }
    return out


def _options():
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return options


def decompose(profiles: dict[str, dict], largest: int) -> dict[str, dict[str, float]]:
    """Per operator type: the adapter's cost at T = 1 and at ``largest`` (V2 - merged), and the
    part that grows with T ((V2_T - V2_1) - (merged_T - merged_1)), µs per call."""

    def ops(name: str, T: int) -> dict[str, float]:
        return profiles[f"{name}-T{T}"]["ops_us"]

    kinds = sorted({op for p in profiles.values() for op in p["ops_us"]})
    out: dict[str, dict[str, float]] = {}
    for op in kinds:
        v1, vT = ops(SURGERY_V2, 1).get(op, 0.0), ops(SURGERY_V2, largest).get(op, 0.0)
        m1, mT = ops(MERGED, 1).get(op, 0.0), ops(MERGED, largest).get(op, 0.0)
        out[op] = {"adapter_T1": v1 - m1, "adapter_T": vT - mT, "with_T": (vT - v1) - (mT - m1)}
    return out


def interleaved_ratios(
    sessions: dict[str, Any], feeds: dict[str, dict], largest: int, rounds: int, calls: int
) -> dict[str, Any]:
    """SurgeryV2 / merged whole-call time at T = 1 and ``largest``: per round every engine
    ``calls`` times (median; the order reversed every other round), the ratio per round, then
    its median and spread over the rounds."""
    names = list(sessions)
    for name in names:  # warm
        for _ in range(5):
            sessions[name].run(None, feeds[name])
    per_round: dict[int, list[float]] = {1: [], largest: []}
    for r in range(rounds):
        medians = {}
        for name in names if r % 2 == 0 else names[::-1]:
            times = []
            for _ in range(calls):
                t = time.perf_counter()
                sessions[name].run(None, feeds[name])
                times.append(time.perf_counter() - t)
            medians[name] = float(np.median(times))
        for T in per_round:
            per_round[T].append(medians[f"{SURGERY_V2}-T{T}"] / medians[f"{MERGED}-T{T}"])
    out = {}
    for T, ratios in per_round.items():
        q1, med, q3 = np.percentile(ratios, [25, 50, 75])
        # the median's own uncertainty: a 95% bootstrap interval over the rounds
        draws = np.random.default_rng(0).choice(ratios, size=(2000, len(ratios)))
        lo, hi = np.percentile(np.median(draws, axis=1), [2.5, 97.5])
        out[f"T{T}"] = {
            "median": round(float(med), 4),
            "iqr": [round(float(q1), 4), round(float(q3), 4)],
            "spread": round(float((q3 - q1) / med), 4),
            "median_ci95": [round(float(lo), 4), round(float(hi), 4)],
            "median_ci95_width": round(float((hi - lo) / med), 4),
            "rounds": rounds,
            "calls_per_round": calls,
        }
    return out


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Parse ``argv``, profile and time the four engines, write the record."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not 1 < args.tasks <= args.batch:
        parser.error(f"--tasks {args.tasks}: give 2 to --batch ({args.batch}) tasks")
    if min(args.rounds, args.calls, args.profiled_calls) < 1:
        parser.error("--rounds, --calls and --profiled-calls must be at least 1")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    arch = get_arch(args.arch)
    encoder = build_encoder(arch).eval()
    size = arch.image_size
    images = np.random.default_rng(0).standard_normal((args.batch, 3, size, size), np.float32)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths, feeds = {}, {}
        for T in (1, args.tasks):
            tasks = [f"task{t}" for t in range(T)]
            classes = task_classes(arch, T)
            heads = [ClassificationHead(torch.randn(c, arch.embed_dim)) for c in classes]
            for name, method in ENGINES.items():
                bank = None if method is None else AdapterBank(tasks, arch, method, args.rank)
                model = MultiTaskModel(encoder, heads, tasks, bank)
                key = f"{name}-T{T}"
                paths[key] = export_onnx(model, Path(tmp) / f"{key}.onnx", "routed", check=False)
                ids = np.arange(args.batch, dtype=np.int64) % T
                feeds[key] = {"images": images, "task_ids": ids}
        profiles = profile_ops(paths, feeds, args.profiled_calls, Path(tmp))
        sessions = {
            key: ort.InferenceSession(str(p), _options(), providers=["CPUExecutionProvider"])
            for key, p in paths.items()
        }
        ratios = interleaved_ratios(sessions, feeds, args.tasks, args.rounds, args.calls)
    parts = decompose(profiles, args.tasks)
    base = profiles[f"{MERGED}-T{args.tasks}"]["kernel_us"]
    shares = {  # % of the merged engine's kernel time at the largest T
        "adapter_pct": round(100 * sum(p["adapter_T"] for p in parts.values()) / base, 2),
        "with_T_pct": round(100 * sum(p["with_T"] for p in parts.values()) / base, 2),
        "by_operator_pct": {
            op: {k: round(100 * v / base, 2) for k, v in p.items()} for op, p in parts.items()
        },
    }
    record = {
        "benchmark": "task-scaling-profile",
        "arch": arch.name,
        "batch": args.batch,
        "rank": args.rank,
        "tasks": args.tasks,
        "onnxruntime_threads": 1,
        "weights": "random (cost only)",
        "command": command_line(argv, prog or f"{__name__}.main"),
        "seconds": round(time.perf_counter() - started, 1),
        "environment": environment("cpu"),
        "ratio_v2_over_merged": ratios,
        "profiles": profiles,
        "decomposition_us": parts,
        "shares_of_merged_kernel_time": shares,
    }
    if args.out is not None:
        write_record_set(args.out, f"scaling-profile-{arch.name}", record, markdown(record))
    return record


def markdown(record: dict[str, Any]) -> list[str]:
    """The record as a Markdown report."""
    T = record["tasks"]
    prof = record["profiles"]
    parts = record["decomposition_us"]
    merged_T = sum(prof[f"{MERGED}-T{T}"]["ops_us"].values())
    lines = [
        f"# Routed SurgeryV2 vs the merged backbone as tasks grow: {record['arch']}, batch "
        f"{record['batch']}, rank {record['rank']}, T = 1 and {T}",
        "",
        f"`{record['command']}`",
        "",
        "CPU timings, ONNX Runtime with 1 thread; random weights (cost only).",
        "",
        "## Whole call, V2 routed / merged routed (interleaved rounds, no profiler)",
        "",
    ]
    lines += table(
        [
            "T",
            "median ratio",
            "95% interval of the median",
            "interquartile range",
            "spread (IQR / median)",
            "rounds x calls",
        ],
        [
            [
                key.removeprefix("T"),
                fmt(r["median"], ".4f"),
                f"{r['median_ci95'][0]:.4f} - {r['median_ci95'][1]:.4f} "
                f"({100 * r['median_ci95_width']:.2f}%)",
                f"{r['iqr'][0]:.4f} - {r['iqr'][1]:.4f}",
                f"{100 * r['spread']:.2f}%",
                f"{r['rounds']} x {r['calls_per_round']}",
            ]
            for key, r in record["ratio_v2_over_merged"].items()
        ],
    )
    lines += [
        "",
        "## Kernel time per call by operator type (µs, profiler)",
        "",
        f"`adapter` = V2 - merged at the same T; `with T` = (V2 at {T} - V2 at 1) - (merged at "
        f"{T} - merged at 1); percentages of the merged engine's kernel time at T = {T} "
        f"({merged_T:,.0f} µs).",
        "",
    ]
    names = [f"{name}-T{t}" for t in (1, T) for name in (MERGED, SURGERY_V2)]
    ranked = sorted(parts, key=lambda op: -abs(parts[op]["adapter_T"]))
    rows = []
    for op in ranked:
        cells = [fmt(prof[n]["ops_us"].get(op), ",.0f") for n in names]
        p = parts[op]
        rows.append(
            [
                op,
                *cells,
                f"{p['adapter_T']:,.0f} ({100 * p['adapter_T'] / merged_T:+.2f}%)",
                f"{p['with_T']:,.0f} ({100 * p['with_T'] / merged_T:+.2f}%)",
            ]
        )
    total = {n: sum(prof[n]["ops_us"].values()) for n in names}
    adapter = sum(p["adapter_T"] for p in parts.values())
    grows = sum(p["with_T"] for p in parts.values())
    rows.append(
        [
            "**all**",
            *(f"{total[n]:,.0f}" for n in names),
            f"{adapter:,.0f} ({100 * adapter / merged_T:+.2f}%)",
            f"{grows:,.0f} ({100 * grows / merged_T:+.2f}%)",
        ]
    )
    lines += table(["operator", *names, "adapter", "with T"], rows)
    return lines

"""The fused surgery-correction + LayerNorm kernel against PyTorch.

On CUDA, for ViT-B/32 and ViT-L/14 block shapes (routed: one task id per image), it times

* ``fused``: ``surgery_edge.kernels.surgery_correct_layernorm`` (one Triton launch);
* ``torch``: the unfused PyTorch sequence (gather the weights, two ``bmm``, ReLU, subtract,
  LayerNorm; ``surgery_correct_layernorm_ref``);
* ``torch.compile``: that sequence under ``torch.compile(fullgraph=True)``, compiled per shape;

with ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed before every call so that
``x`` comes from HBM, the median and quartiles over the calls of ``--rep-ms`` after ``--warmup-ms``
of warm-up). It reports the time, the effective bandwidth (bytes = read ``x`` + write ``x_corr``
+ write ``y`` + the adapter weights of the tasks in the batch + the LayerNorm parameters), its
fraction of the peak HBM bandwidth (``--peak-bw``; by default the datasheet's for the GPU's
name, or a measured copy for a GPU not in the table: the record says which), and the fused
kernel's speedup over both baselines. The shapes the targets are set at (``TARGET_SHAPES``:
ViT-L/14, batch 64) are timed first, so that a budget cut drops the others.

``--cpu-smoke`` runs tiny shapes on the CPU (``torch`` vs ``torch.compile``, and the fused
kernel under the Triton interpreter when ``TRITON_INTERPRET=1``; ``torch.utils.benchmark``
wall-clock timings, labelled as such) to check the benchmark where there is no GPU.

Usage::

    python benchmarks/bench_kernels.py                      # CUDA sweep, fp16
    python benchmarks/bench_kernels.py --dtype bf16 --out benchmarks/results/h200/kernels-bf16.json
    python benchmarks/bench_kernels.py --cpu-smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from surgery_edge import kernels
from surgery_edge.bench.env import environment
from surgery_edge.bench.report import command_line, table, write_record
from surgery_edge.bench.roofline import device_peaks

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESULTS_DIR = Path("benchmarks/results")
TARGET_SHAPES = (("ViT-L/14", 64),)  # (model, batch): the fused kernel's targets are set here


@dataclass(frozen=True)
class Shape:
    """One benchmarked problem: a ViT's block shape at one batch size."""

    model: str
    batch: int
    tokens: int  # N
    width: int  # d
    rank: int  # r
    num_tasks: int  # T


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how to time it."""

    shapes: tuple[Shape, ...]
    dtype: str
    device: str
    warmup_ms: float
    rep_ms: float
    peak_bw: float | None  # bytes/s, for the fraction of peak (None on the CPU smoke run)
    interpreted: bool = False  # CPU smoke: the fused kernel under the Triton interpreter
    peak_source: str | None = None  # where peak_bw came from (datasheet, measured, given)


@dataclass(frozen=True)
class Timing:
    """The median time of one implementation on one shape."""

    impl: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    gbps: float
    peak_fraction: float | None


@dataclass(frozen=True)
class ShapeResult:
    """Every implementation's timing on one shape, and the fused kernel's speedups."""

    shape: Shape
    bytes_moved: int
    max_abs_err_vs_torch: float  # of the fused (or compiled, on CPU) outputs
    timings: tuple[Timing, ...]
    speedup_vs_torch: float | None  # fused over torch
    speedup_vs_compile: float | None  # fused over torch.compile


def sweep_shapes(batches: tuple[int, ...]) -> tuple[Shape, ...]:
    """ViT-B/32 (N=50, d=768, r=16) and ViT-L/14 (N=257, d=1024, r=4 and 16), T = 8 tasks;
    the ``TARGET_SHAPES`` first, then the rest by model and batch."""
    models = [("ViT-B/32", 50, 768, 16), ("ViT-L/14", 257, 1024, 4), ("ViT-L/14", 257, 1024, 16)]
    shapes = [
        Shape(model, batch, tokens, width, rank, num_tasks=8)
        for model, tokens, width, rank in models
        for batch in batches
    ]
    first = [s for s in shapes if (s.model, s.batch) in TARGET_SHAPES]
    return tuple(first + [s for s in shapes if s not in first])


def smoke_shapes(batches: tuple[int, ...] = (1, 4)) -> tuple[Shape, ...]:
    """Tiny shapes for ``--cpu-smoke``."""
    return tuple(Shape("tiny", b, 50, 128, 4, 3) for b in batches)


def time_ms(fn: Callable[[], object], config: BenchConfig) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of one call in ms: ``do_bench`` on CUDA (L2
    flushed before each call), ``torch.utils.benchmark`` blocks on the CPU."""
    if config.device == "cuda":
        import triton.testing  # deferred: Triton is imported only to time on a GPU

        q1, median, q3 = triton.testing.do_bench(
            fn, warmup=config.warmup_ms, rep=config.rep_ms, quantiles=[0.25, 0.5, 0.75]
        )
        return median, q1, q3
    from torch.utils.benchmark import Timer  # deferred: only the CPU smoke run needs it

    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=config.rep_ms / 1e3)
    times = [t * 1e3 for t in m.times]
    return m.median * 1e3, float(np.percentile(times, 25)), float(np.percentile(times, 75))


def make_inputs(shape: Shape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """(x, task_ids, down, up, ln_weight, ln_bias) for a routed batch cycling through the tasks."""
    gen = torch.Generator(device=device).manual_seed(0)
    n, d, r, t = shape.tokens, shape.width, shape.rank, shape.num_tasks

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*size, generator=gen, device=device)).to(dtype)

    x = randn(shape.batch, n, d)
    task_ids = torch.arange(shape.batch, device=device) % t
    down, up = randn(t, r, d, scale=d**-0.5), randn(t, d, r, scale=0.5 * r**-0.5)
    return x, task_ids, down, up, 1 + randn(d, scale=0.1), randn(d, scale=0.1)


def bytes_moved(inputs: tuple[torch.Tensor, ...]) -> int:
    """Compulsory traffic: read x, write x_corr and y, read the used tasks' weights and LN."""
    x, task_ids, down, up, ln_weight, ln_bias = inputs
    used = task_ids.unique().numel()
    weights = used * (down[0].nbytes + up[0].nbytes) + ln_weight.nbytes + ln_bias.nbytes
    return 3 * x.nbytes + weights


def bench_shape(shape: Shape, config: BenchConfig) -> ShapeResult:
    """Time every implementation on one shape, after checking their outputs agree."""
    inputs = make_inputs(shape, DTYPES[config.dtype], config.device)
    reference = kernels.surgery_correct_layernorm_ref
    torch.compiler.reset()  # a fresh compile cache per shape: no recompile limit, no dynamic shapes
    impls: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
        "torch": reference,
        "torch.compile": torch.compile(reference, fullgraph=True, dynamic=False),
    }
    if config.device == "cuda" or config.interpreted:
        impls = {"fused": kernels.surgery_correct_layernorm, **impls}
    checked = "fused" if "fused" in impls else "torch.compile"
    expected = reference(*inputs)
    max_err = max(
        (got.float() - want.float()).abs().max().item()
        for got, want in zip(impls[checked](*inputs), expected, strict=True)
    )

    moved = bytes_moved(inputs)
    timings = []
    for name, impl in impls.items():
        ms, q1, q3 = time_ms(lambda impl=impl: impl(*inputs), config)
        gbps = moved / (ms * 1e-3) / 1e9
        fraction = None if config.peak_bw is None else gbps * 1e9 / config.peak_bw
        timings.append(Timing(name, ms, q1, q3, gbps, fraction))
    ms = {timing.impl: timing.median_ms for timing in timings}
    fused = ms.get("fused")
    return ShapeResult(
        shape=shape,
        bytes_moved=moved,
        max_abs_err_vs_torch=max_err,
        timings=tuple(timings),
        speedup_vs_torch=None if fused is None else ms["torch"] / fused,
        speedup_vs_compile=None if fused is None else ms["torch.compile"] / fused,
    )


def markdown_table(results: list[ShapeResult], device_label: str) -> str:
    """One row per shape: each implementation's time, then bandwidth and speedups."""
    impls = [timing.impl for timing in results[0].timings]
    main = impls[0]  # fused on CUDA, torch on the CPU smoke run
    header = ["model", "B", "N", "d", "r"] + [f"{name} (ms)" for name in impls] + [f"{main} GB/s"]
    if results[0].timings[0].peak_fraction is not None:
        header.append(f"{main} % of peak BW")
    if results[0].speedup_vs_torch is not None:
        header += ["speedup vs torch", "speedup vs torch.compile"]
    header.append(f"{'fused' if 'fused' in impls else 'torch.compile'} max abs err")
    rows = []
    for result in results:
        s = result.shape
        first = result.timings[0]
        row = [s.model, str(s.batch), str(s.tokens), str(s.width), str(s.rank)]
        row += [f"{timing.median_ms:.4f}" for timing in result.timings]
        row.append(f"{first.gbps:.1f}")
        if first.peak_fraction is not None:
            row.append(f"{100 * first.peak_fraction:.1f}")
        if result.speedup_vs_torch is not None:
            row += [f"{result.speedup_vs_torch:.2f}x", f"{result.speedup_vs_compile:.2f}x"]
        row.append(f"{result.max_abs_err_vs_torch:.2e}")
        rows.append(row)
    return "\n".join([f"Timings on {device_label}", "", *table(header, rows)])


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The kernel benchmark's options."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench's warm-up")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's timed span")
    parser.add_argument(
        "--peak-bw",
        type=float,
        help="peak HBM bandwidth, bytes/s (default: the datasheet's for the GPU's name, e.g. "
        "3.35e12 for an H100 SXM, 4.8e12 for an H200; measured for a GPU not in the table)",
    )
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="stop starting new shapes after this many seconds (they are listed as skipped)",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes at --batches on the CPU: torch vs torch.compile, and the fused kernel "
        "under TRITON_INTERPRET=1 (checks the benchmark; the timings mean nothing)",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> list[ShapeResult]:
    """Parse ``argv``, time every shape, write the JSON record and print the table."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        torch.set_num_threads(1)  # spinning OpenMP threads on a busy machine distort timings
        interpreted = kernels.can_launch("cpu")
        config = BenchConfig(
            smoke_shapes(tuple(args.batches)), "fp32", "cpu", 0, 50, None, interpreted
        )
        label = "CPU, 1 thread (smoke run: wall-clock timings, not representative of a GPU)"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or pass --cpu-smoke to check the script")
        if kernels.triton_interpreter_enabled():
            parser.error("TRITON_INTERPRET is set: unset it to time compiled kernels")
        shapes = sweep_shapes(tuple(args.batches))
        peaks = device_peaks("cuda", bw=args.peak_bw)
        config = BenchConfig(
            shapes,
            args.dtype,
            "cuda",
            args.warmup_ms,
            args.rep_ms,
            peaks.hbm_bytes_per_s,
            peak_source=peaks.source,
        )
        label = (
            f"{torch.cuda.get_device_name()} ({args.dtype}, triton do_bench, L2 flushed); "
            f"% of peak BW: of {peaks.describe('bw')}"
        )

    env = environment(config.device)
    out = args.out
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
        out = RESULTS_DIR / f"bench_kernels-{slug}-{config.dtype}.json"
    command = command_line(argv, prog or f"{__name__}.main")
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    results: list[ShapeResult] = []
    skipped: list[Shape] = []
    for shape in config.shapes:
        if deadline is not None and time.perf_counter() > deadline:
            skipped.append(shape)
            continue
        results.append(bench_shape(shape, config))
        print(f"done: {shape}", file=sys.stderr, flush=True)
        _write(out, env, label, command, config, results, skipped, complete=False)
    _write(out, env, label, command, config, results, skipped, complete=True)
    if results:
        print(markdown_table(results, label))
    print(f"\nresults written to {out}")
    return results


def _write(
    out: Path,
    env: dict,
    label: str,
    command: str,
    config: BenchConfig,
    results: list[ShapeResult],
    skipped: list[Shape],
    complete: bool,
) -> None:
    """The JSON record, rewritten after every shape so that an interrupted sweep keeps its
    measurements; it holds the Markdown table too."""
    record = {
        **env,
        "label": label,
        "complete": complete,
        "command": command,
        "config": asdict(config),
        "results": [asdict(result) for result in results],
        "skipped_shapes": [asdict(s) for s in skipped],
        "markdown": markdown_table(results, label) if results else "",
    }
    write_record(out, record)

"""The fused surgery-correction + LayerNorm kernel against PyTorch.

On CUDA, for ViT-B/32 and ViT-L/14 block shapes (routed: one task id per image), it times

* ``fused``: ``surgery_edge.kernels.surgery_correct_layernorm`` (one Triton launch);
* ``torch``: the unfused PyTorch sequence (gather the weights, two ``bmm``, ReLU, subtract,
  LayerNorm; ``surgery_correct_layernorm_ref``);
* ``torch.compile``: that sequence under ``torch.compile(fullgraph=True)``, compiled per shape;

with CUDA events around each call, after warm-up, taking the median over many calls, and with
the L2 cache flushed before every call so that ``x`` comes from HBM. It reports the time, the
effective bandwidth (bytes = read ``x`` + write ``x_corr`` + write ``y`` + the adapter weights of
the tasks in the batch + the LayerNorm parameters), its fraction of the peak HBM bandwidth
(``--peak-bw``, H100 SXM by default), and the fused kernel's speedup over both baselines.

``--cpu-smoke`` runs tiny shapes on the CPU (``torch`` vs ``torch.compile`` only, wall-clock
timings, labelled as such) to check the benchmark where there is no GPU.

Usage::

    python benchmarks/bench_kernels.py                      # CUDA sweep, fp16
    python benchmarks/bench_kernels.py --dtype bf16 --out benchmarks/results/h100-bf16.json
    python benchmarks/bench_kernels.py --cpu-smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from surgery_edge import kernels
from surgery_edge.bench.env import environment
from surgery_edge.bench.report import command_line, table, write_record
from surgery_edge.bench.timing import measure

H100_SXM_BW = 3.35e12  # bytes/s
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESULTS_DIR = Path("benchmarks/results")


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
    warmup: int
    iters: int
    peak_bw: float | None  # bytes/s, for the fraction of peak (None on the CPU smoke run)


@dataclass(frozen=True)
class Timing:
    """The median time of one implementation on one shape."""

    impl: str
    median_ms: float
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
    """ViT-B/32 (N=50, d=768, r=16) and ViT-L/14 (N=257, d=1024, r=4 and 16), T = 8 tasks."""
    models = [("ViT-B/32", 50, 768, 16), ("ViT-L/14", 257, 1024, 4), ("ViT-L/14", 257, 1024, 16)]
    return tuple(
        Shape(model, batch, tokens, width, rank, num_tasks=8)
        for model, tokens, width, rank in models
        for batch in batches
    )


def smoke_shapes() -> tuple[Shape, ...]:
    """Tiny shapes for ``--cpu-smoke``."""
    return (Shape("tiny", 1, 50, 128, 4, 3), Shape("tiny", 4, 50, 128, 4, 3))


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
    if config.device == "cuda":
        impls = {"fused": kernels.surgery_correct_layernorm, **impls}
    checked = "fused" if "fused" in impls else "torch.compile"
    expected = reference(*inputs)
    max_err = max(
        (got.float() - want.float()).abs().max().item()
        for got, want in zip(impls[checked](*inputs), expected, strict=True)
    )

    device = torch.device(config.device)
    moved = bytes_moved(inputs)
    timings = []
    for name, impl in impls.items():
        samples = measure(
            lambda impl=impl: impl(*inputs), device, config.warmup, config.iters, flush_l2=True
        )
        ms = samples.median
        gbps = moved / (ms * 1e-3) / 1e9
        fraction = None if config.peak_bw is None else gbps * 1e9 / config.peak_bw
        timings.append(Timing(name, ms, gbps, fraction))
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
        header.append(f"{main} % peak")
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
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument(
        "--peak-bw", type=float, default=H100_SXM_BW, help="peak HBM bandwidth, bytes/s"
    )
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes on the CPU, torch vs torch.compile only (checks the benchmark)",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> list[ShapeResult]:
    """Parse ``argv``, time every shape, write the JSON record and print the table."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        torch.set_num_threads(1)  # spinning OpenMP threads on a busy machine distort timings
        config = BenchConfig(smoke_shapes(), "fp32", "cpu", warmup=3, iters=20, peak_bw=None)
        label = "CPU, 1 thread (smoke run: wall-clock timings, not representative of a GPU)"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or pass --cpu-smoke to check the script")
        if kernels.triton_interpreter_enabled():
            parser.error("TRITON_INTERPRET is set: unset it to time compiled kernels")
        shapes = sweep_shapes(tuple(args.batches))
        config = BenchConfig(shapes, args.dtype, "cuda", args.warmup, args.iters, args.peak_bw)
        label = f"{torch.cuda.get_device_name()} ({args.dtype}, CUDA events, L2 flushed)"

    results = []
    for shape in config.shapes:
        results.append(bench_shape(shape, config))
        print(f"done: {shape}", file=sys.stderr)

    env = environment(config.device)
    out = args.out
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
        out = RESULTS_DIR / f"bench_kernels-{slug}-{config.dtype}.json"
    record = {
        **env,
        "label": label,
        "command": command_line(argv, prog or f"{__name__}.main"),
        "config": asdict(config),
        "results": [asdict(result) for result in results],
    }
    write_record(out, record)
    print(markdown_table(results, label))
    print(f"\nresults written to {out}")
    return results

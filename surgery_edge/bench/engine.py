"""The multi-task engine against eight separate experts: latency, throughput, memory, TFLOP/s.

Every configuration (:mod:`surgery_edge.bench.workloads`: ``experts``, ``merged``, ``surgery``,
``surgeryv2``) answers every task it is asked about, for every image, through the paths that
apply on the device:

* ``eager``: the PyTorch reference path;
* ``fused``: the Triton path (``MultiTaskModel.fused``; engines only, CUDA only: never timed
  under the Triton CPU interpreter);
* ``compile``: ``torch.compile`` (mode default; one compiled function per workload, shared by
  the batch sizes, so PyTorch's automatic dynamic shapes apply; for the experts one compiled
  encoder forward that all eight share); a failure is recorded, not fatal;
* ``cuda-graph`` / ``fused+cuda-graph``: the eager / fused path captured once per batch size in a
  ``torch.cuda.CUDAGraph`` and replayed (CUDA only);
* ``onnxruntime``: ``surgery_edge.export.onnx.export_onnx(model, path, mode, fp16)`` opened by the
  runtime's ``OnnxBackend`` (engines and the merged model; marked unavailable when onnxruntime,
  or its CUDA execution provider on a GPU, is missing).

Figures per (config, mode, path, batch): median and p90 latency (CUDA events after warm-up on
the GPU, ``time.perf_counter`` on the CPU), throughput in task-answers per second (B x T per
call for all-tasks, B for routed), peak GPU memory (``torch.cuda.max_memory_allocated`` after a
reset; it includes the resident weights), the weight bytes the configuration holds (eight
experts = 8 x (encoder + head); engine = one encoder + adapters + stacked heads), achieved
TFLOP/s (FLOPs counted analytically: :mod:`surgery_edge.bench.flops`) and its fraction of the
device's dense peak (``--peak-tflops``; null on the CPU), and the largest absolute difference
from the eager output. fp16 on the GPU, fp32 on the CPU.

Usage::

    surgery-edge bench --quick --out /tmp/bench            # a smoke run, ~30 s on a CPU
    python benchmarks/bench_engine.py --device cpu --archs tiny-vit-32 --batches 1 8 32 \\
        --out benchmarks/results/cpu
    python benchmarks/bench_engine.py --archs ViT-B-32 --out benchmarks/results/h100   # CUDA

Outputs, per architecture, under ``--out``: ``engine-<arch>.json`` (device, versions, the exact
command, every result, derived ratios), ``engine-<arch>.md`` (the table, also printed),
``engine-<arch>-latency.png`` (latency vs batch per configuration) and
``engine-<arch>-weights.png`` (weight memory).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

from surgery_edge.bench.flops import module_bytes, task_classes, workload_flops
from surgery_edge.bench.report import command_line, write_outputs
from surgery_edge.bench.runners import Workload, max_abs_err, unavailable_reason
from surgery_edge.bench.timing import measure, sync
from surgery_edge.bench.workloads import (
    CONFIG_MODES,
    CONFIGS,
    DTYPES,
    H100_SXM_FP16_TFLOPS,
    MODES,
    PATHS,
    EngineBenchConfig,
    EngineResult,
    Inputs,
    Parts,
    applicable,
    build,
    plan_paths,
)
from surgery_edge.models import get_arch

# Defaults that depend on where the benchmark runs: (on CUDA, on the CPU, with --quick).
DEFAULTS = {
    "archs": (["tiny-vit-32", "ViT-B-32", "ViT-L-14"], ["tiny-vit-32"], ["micro-vit-16"]),
    "batches": ([1, 8, 32, 64, 128], [1, 8, 32], [1, 4]),
    "paths": (list(PATHS), list(PATHS), ["eager", "onnxruntime"]),
    "warmup": (10, 3, 1),
    "iters": (100, 20, 3),
    "min_iters": (5, 5, 1),
    "max_seconds": (2.0, 2.0, 0.5),
}


def run_engine_bench(
    config: EngineBenchConfig,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> list[EngineResult]:
    """Run every (architecture, configuration, mode, path, batch) of ``config``.

    Args:
        config: what to run and how to time it.
        log: called with one line per measurement (and per failure).
        verbose: also log the traceback of a path that fails.

    Returns:
        One :class:`EngineResult` per planned combination, including the paths that were
        unavailable here or failed (with the reason), in a stable order.
    """
    log = log or (lambda msg: None)
    device = torch.device(config.device)
    paths = plan_paths(config.paths)
    unavailable = {p: unavailable_reason(p, device) for p in paths}
    results: list[EngineResult] = []
    # past its recompile limit dynamo would silently run eager code: make that a recorded failure
    dynamo = torch._dynamo.config
    strict = hasattr(dynamo, "fail_on_recompile_limit_hit")
    with dynamo.patch(fail_on_recompile_limit_hit=True) if strict else contextlib.nullcontext():
        for arch_name in config.archs:
            results += _bench_arch(config, arch_name, paths, unavailable, log, verbose)
    return results


def _bench_arch(
    config: EngineBenchConfig,
    arch_name: str,
    paths: list[str],
    unavailable: dict[str, str | None],
    log: Callable[[str], None],
    verbose: bool,
) -> list[EngineResult]:
    """Every configuration of one architecture, each built, timed and freed in turn."""
    device, dtype = torch.device(config.device), DTYPES[config.resolved_dtype()]
    results: list[EngineResult] = []
    arch = get_arch(arch_name)
    parts = Parts.random(arch, config.num_tasks, config.seed)
    for name in config.configs:
        rank = config.resolved_rank(arch_name, name)
        model = build(parts, name, rank, device, dtype)
        log(f"{arch_name} {name}: {module_bytes(model) / 2**20:.1f} MiB of weights")
        for mode in (m for m in CONFIG_MODES[name] if m in config.modes):
            with tempfile.TemporaryDirectory() as tmp:
                work = Workload(arch, model, name, mode, rank, device, Path(tmp))
                for path in (p for p in paths if applicable(p, name)):
                    for batch in config.batches:
                        results.append(
                            _bench_one(config, work, path, batch, unavailable[path], log, verbose)
                        )
        del model
        gc.collect()
        torch.compiler.reset()  # frees the compiled graphs that hold the model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _short(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _bench_one(
    cfg: EngineBenchConfig,
    work: Workload,
    path: str,
    batch: int,
    unavailable: str | None,
    log: Callable[[str], None],
    verbose: bool,
) -> EngineResult:
    """Time one path of one workload at one batch size (or record why it could not run)."""
    device, model, arch = work.device, work.model, work.arch
    x = Inputs.make(arch, batch, cfg.num_tasks, device, DTYPES[cfg.resolved_dtype()])
    answers = batch * cfg.num_tasks if work.mode == "all-tasks" else batch
    classes = task_classes(arch, cfg.num_tasks)
    flops = workload_flops(arch, work.config, work.mode, x.task_ids.tolist(), classes, work.rank)
    result = partial(
        EngineResult,
        arch=arch.name,
        config=work.config,
        mode=work.mode,
        path=path,
        batch=batch,
        dtype=cfg.resolved_dtype(),
        rank=None if work.config in ("experts", "merged") else work.rank,
        answers_per_call=answers,
        flops_per_call=flops,
        weight_bytes=module_bytes(model),
    )
    not_run = partial(
        result,
        timer=None,
        iters=0,
        median_ms=None,
        p90_ms=None,
        answers_per_s=None,
        tflops=None,
        peak_fraction=None,
        peak_mem_bytes=None,
        setup_s=None,
        max_abs_err_vs_eager=None,
    )
    if unavailable is not None:
        return not_run(status="unavailable", reason=unavailable)
    if path in work.sticky_error:
        return not_run(status="failed", reason=work.sticky_error[path])
    try:
        with torch.inference_mode():
            reference = work.call()(x)
            start = time.perf_counter()
            fn = work.prepare(path, x)
            output = fn()
            sync(device)
            setup = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            samples = measure(
                fn,
                device,
                cfg.warmup,
                cfg.iters,
                min_iters=cfg.min_iters,
                max_seconds=cfg.max_seconds,
                wall_clock=path == "onnxruntime",
            )
            peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    except Exception as e:  # a path that fails is recorded; the others still run
        reason = _short(e)
        if path == "compile":
            reason = work.sticky_error[path] = f"torch.compile failed: {reason}"
        if path == "onnxruntime" and work.onnx is None:
            reason = work.sticky_error[path] = f"ONNX export or session failed: {reason}"
        log(f"  {work.config} {work.mode} {path} B={batch}: failed: {reason}")
        if verbose:
            log(traceback.format_exc())
        return not_run(status="failed", reason=reason)
    finally:
        if getattr(model, "fused", False):
            model.fused = False  # back to the reference path
    median = samples.median
    tflops = flops / (median * 1e-3) / 1e12
    peak = cfg.peak_tflops if device.type == "cuda" else None
    log(
        f"  {work.config:9s} {work.mode:9s} {path:16s} B={batch:<4d} {median:9.3f} ms "
        f"{answers / (median * 1e-3):12.1f} answers/s"
    )
    return result(
        status="ok",
        reason=None,
        timer=samples.timer,
        iters=len(samples.ms),
        median_ms=median,
        p90_ms=samples.p90,
        answers_per_s=answers / (median * 1e-3),
        tflops=tflops,
        peak_fraction=None if peak is None else tflops / peak,
        peak_mem_bytes=peak_mem,
        setup_s=None if path == "eager" else setup,
        max_abs_err_vs_eager=None if path == "eager" else max_abs_err(output, reference),
    )


# --- command line ----------------------------------------------------------------------------


def _device(text: str) -> str:
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}: use cpu, cuda or cuda:N"
        ) from None
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _default_help(name: str) -> str:
    cuda, cpu, quick = (" ".join(map(str, v)) if isinstance(v, list) else v for v in DEFAULTS[name])
    where = cuda if cuda == cpu else f"{cuda} on CUDA, {cpu} on the CPU"
    return f"default: {where}, {quick} with --quick"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The engine benchmark's options (shared by ``benchmarks/bench_engine.py`` and
    ``surgery-edge bench``)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: micro-vit-16, batches 1 and 4, eager and ONNX Runtime, a few calls "
        "each, JSON and Markdown but no plots (about half a minute on a 2-core CPU); the "
        "options given explicitly still apply",
    )
    p.add_argument("--device", type=_device, help="default: cuda when available, else cpu")
    p.add_argument("--archs", nargs="+", help=_default_help("archs"))
    p.add_argument("--batches", type=_positive, nargs="+", help=_default_help("batches"))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--paths", nargs="+", choices=PATHS, help=_default_help("paths"))
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--tasks", type=_positive, default=8)
    p.add_argument("--rank", type=_positive, default=16)
    p.add_argument(
        "--rank-v2",
        type=_positive,
        help="SurgeryV2 rank (default: 4 for ViT-L as in the paper, else --rank)",
    )
    p.add_argument("--warmup", type=int, help=_default_help("warmup"))
    p.add_argument("--iters", type=_positive, help=_default_help("iters"))
    p.add_argument("--min-iters", type=_positive, help=_default_help("min_iters"))
    p.add_argument(
        "--max-seconds",
        type=float,
        help="time budget per measurement, fewer iterations for slow calls; "
        + _default_help("max_seconds"),
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_SXM_FP16_TFLOPS,
        help="dense fp16 peak of the GPU (default: 989 = H100 SXM)",
    )
    p.add_argument("--overhead-batch", type=_positive, default=64)
    p.add_argument("--threads", type=_positive, help="torch CPU threads")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/engine"),
        help="folder for the JSON, Markdown and plots (default: benchmarks/results/engine)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of an earlier engine-<arch>.json in --out that this run does not "
        "measure (split a sweep over several commands)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed paths")
    return p


def config_from_args(args: argparse.Namespace) -> EngineBenchConfig:
    """The benchmark configuration the parsed options ask for, defaults resolved."""
    cuda = torch.device(args.device).type == "cuda"
    column = 2 if args.quick else 0 if cuda else 1

    def given(name: str):
        value = getattr(args, name)
        return DEFAULTS[name][column] if value is None else value

    return EngineBenchConfig(
        archs=tuple(given("archs")),
        batches=tuple(given("batches")),
        configs=tuple(args.configs),
        modes=tuple(args.modes),
        paths=tuple(given("paths")),
        device=args.device,
        dtype=args.dtype or ("fp16" if cuda else "fp32"),
        num_tasks=args.tasks,
        rank=args.rank,
        rank_v2=args.rank_v2,
        warmup=given("warmup"),
        iters=given("iters"),
        min_iters=given("min_iters"),
        max_seconds=given("max_seconds"),
        peak_tflops=args.peak_tflops if cuda else None,
        overhead_batch=args.overhead_batch,
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> list[EngineResult]:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the benchmark, write its JSON, Markdown
    and plots under ``--out``. ``prog`` names the command in the usage and the record."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    results = run_engine_bench(
        config, log=lambda msg: print(msg, file=sys.stderr, flush=True), verbose=args.verbose
    )
    command = command_line(argv, prog or f"{__name__}.main")
    plots = not (args.no_plots or args.quick)
    written = write_outputs(config, results, args.out, command, plots, args.merge)
    print("written: " + ", ".join(str(p) for p in written))
    return results

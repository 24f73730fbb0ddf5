"""The multi-task engine against eight experts: latency, throughput, ceilings, memory.

Every configuration (:mod:`surgery_edge.bench.workloads`: the engines ``merged``, ``surgery``,
``surgeryv2``; the baselines ``experts``, ``experts-one-graph`` (ONNX Runtime and TensorRT),
``experts-concurrent``, ``experts-vmap``; and ``one-expert``) answers every task it is asked
about, for every image, through each path that applies on the device; the baselines run on the
same paths as the engines:

* ``eager``: PyTorch;
* ``fused``: the Triton path (``MultiTaskModel.fused``; engines only, CUDA only);
* ``compile``: ``torch.compile`` (mode default; one compiled function per workload, shared by the
  batch sizes; for the experts one compiled encoder that all eight share);
* ``cuda-graph`` / ``fused+cuda-graph``: captured once per batch size and replayed (CUDA only);
* ``onnxruntime``: ``export_onnx`` opened by the runtime's ``OnnxBackend`` (the experts as eight
  one-task engines);
* ``tensorrt``: ``build_engine`` from that ONNX (where TensorRT is installed).

A path that fails is recorded, not fatal. Each (mode, batch) is a group: its contestants are
built, checked against eager, then timed in interleaved rounds (``--rounds``) of
``torch.utils.benchmark`` blocks (:mod:`surgery_edge.bench.timing`); a row holds the median and
the quartiles over rounds. The results are rewritten after every group, so an interrupted run
keeps what it measured; ``--budget-s`` stops starting groups once spent. Peak memory is measured
afterwards, one process per (configuration, mode, path) (:mod:`surgery_edge.bench.memory`).
Ratios are same-runtime or best-vs-best only, each beside its ceiling
(:mod:`surgery_edge.bench.ratios`). fp16 on the GPU, fp32 on the CPU.

Usage (the command line is :mod:`surgery_edge.cli.bench`; lists are repeated options)::

    surgery-edge bench --quick --out /tmp/bench     # a smoke run (README: its duration)
    python benchmarks/bench_engine.py --device cpu --arch tiny-vit-32 --threads 2 \\
        --out benchmarks/results/cpu
    surgery-edge bench --arch ViT-B-32 --batch 1 --batch 8 --out benchmarks/results/h200

Outputs, per architecture, under ``--out``: ``engine-<arch>.json`` (device, versions, threads,
load, caches, measured device rates, the exact command, every result, derived ratios),
``engine-<arch>.md`` (the tables, also printed) and, at the end, ``engine-<arch>-latency.png``
and ``engine-<arch>-weights.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from surgery_edge.bench.choices import ENGINES, ONE_GRAPH
from surgery_edge.bench.engine_config import COMPILE_ORDER, group_order
from surgery_edge.bench.engine_memory import attach_records, memory_specs
from surgery_edge.bench.env import load_average, machine_is_loaded
from surgery_edge.bench.flops import module_bytes, task_classes, workload_bytes, workload_flops
from surgery_edge.bench.memory import run_children
from surgery_edge.bench.report import Previous, write_outputs
from surgery_edge.bench.roofline import measure_rates
from surgery_edge.bench.runners import EXPERT_CONFIGS, ArchBench, Workload, max_abs_err
from surgery_edge.bench.runners import unavailable_reason as path_unavailable
from surgery_edge.bench.timing import Contestant, Samples, interleaved, sync
from surgery_edge.bench.workloads import (
    DTYPES,
    EngineBenchConfig,
    EngineResult,
    Inputs,
    Parts,
    answers_per_call,
    applicable,
    build_all,
    config_modes,
    plan_paths,
)
from surgery_edge.models import get_arch

Log = Callable[[str], None]
# the experts' outputs computed otherwise: checked against the sequential experts'
SAME_AS_EXPERTS = ("experts-concurrent", "experts-vmap", ONE_GRAPH)


def run_engine_bench(
    config: EngineBenchConfig,
    log: Log | None = None,
    verbose: bool = False,
    on_group: Callable[[list[EngineResult]], None] | None = None,
) -> list[EngineResult]:
    """Run every (architecture, configuration, mode, path, batch) of ``config``.

    The groups run in the order the targets need them (:func:`group_order`). With a budget
    (``config.budget_s``), the ``compile`` path runs after the others, in groups of its own,
    with ``config.compile_share`` of each architecture's time kept for it; a compile that would
    not fit in what is left is recorded as "compile: not measured (budget)". A SIGTERM (the GPU
    run's step reached the end of its slot) records the group in progress, each contestant with
    why it was not measured, hands the rows to ``on_group`` and raises :class:`Stopped`.

    Args:
        config: what to run and how to time it.
        log: called with one line per measurement (and per failure, and warnings).
        verbose: also log the traceback of a path that fails.
        on_group: called with every result so far after each group (to write them).

    Returns:
        One :class:`EngineResult` per planned combination, including the paths that were
        unavailable here, failed (with the reason) or skipped by the budget, in a stable order.
    """
    log = log or (lambda msg: None)
    device = torch.device(config.device)
    saved_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    paths = plan_paths(config.paths)
    unavailable = {p: path_unavailable(p, device, config.time_interpreter) for p in paths}
    results: list[EngineResult] = []
    deadline = None if config.budget_s is None else time.perf_counter() + config.budget_s
    # past its recompile limit dynamo would silently run eager code: make that a recorded failure
    dynamo = torch._dynamo.config
    strict = hasattr(dynamo, "fail_on_recompile_limit_hit")
    try:
        with (
            _stop_on_sigterm(),
            dynamo.patch(fail_on_recompile_limit_hit=True) if strict else contextlib.nullcontext(),
        ):
            for arch_name in config.archs:
                run = _ArchRun(config, arch_name, paths, unavailable, log, verbose, deadline)
                run.bench_all(results, on_group or (lambda rows: None))
    finally:
        torch.set_num_threads(saved_threads)
    return results


class Stopped(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM): its groups so far are handed over first."""


# set by the SIGTERM handler, for the rare exception that replaces Stopped on its way up (a
# CUDA graph capture ended by it fails with an error of its own, which a path records)
_STOP = threading.Event()


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn a SIGTERM into :class:`Stopped` (once: a second one is ignored while the rows are
    written). Only the main thread can take signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _STOP.set()
        raise Stopped

    _STOP.clear()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class _Group:
    """One group's contestants (every configuration of one mode at one batch size) as they are
    prepared and timed: their rows so far, those ready to time, the one being prepared."""

    planned: list[tuple[Workload, str]]  # (workload, path) in the order they are prepared
    mode: str
    batch: int
    x: Inputs
    rows: dict[tuple[str, str], EngineResult] = field(default_factory=dict)
    contestants: list[Contestant] = field(default_factory=list)
    # (config, path) -> (workload, setup seconds, max abs error against eager)
    ready: dict[tuple[str, str], tuple] = field(default_factory=dict)
    current: tuple[Workload, str, float] | None = None  # being prepared since (perf_counter)

    def ordered(self) -> list[EngineResult]:
        """Every contestant's row, in the planned order."""
        return [self.rows[(w.config, p)] for w, p in self.planned]


class _ArchRun:
    """The groups of one architecture: its models built once, timed group by group."""

    def __init__(
        self,
        config: EngineBenchConfig,
        arch_name: str,
        paths: list[str],
        unavailable: dict[str, str | None],
        log: Log,
        verbose: bool,
        deadline: float | None,
    ):
        self.config, self.paths, self.unavailable = config, paths, unavailable
        self.log, self.verbose, self.deadline = log, verbose, deadline
        self.arch = get_arch(arch_name)
        self.device, self.dtype = torch.device(config.device), DTYPES[config.resolved_dtype()]
        self.threads = torch.get_num_threads()
        self.classes = task_classes(self.arch, config.num_tasks)
        # seconds each compiled function took to compile (and run once), and the shapes it has
        # run at: what the next compile is expected to cost
        self.compile_seconds: dict[object, float] = {}
        self.compiled_at: set[tuple[object, str, int]] = set()

    def over_budget(self, deadline: float | None = None) -> bool:
        deadline = self.deadline if deadline is None else deadline
        return deadline is not None and time.perf_counter() > deadline

    def phases(self) -> list[tuple[list[str], float | None]]:
        """(paths, deadline) per phase: one phase of every path; or, with a budget and the
        compile path, the other paths until ``1 - compile_share`` of the time left, then compile
        until the end."""
        if self.deadline is None or "compile" not in self.paths or len(self.paths) == 1:
            return [(self.paths, self.deadline)]
        now = time.perf_counter()
        fast_until = now + (1 - self.config.compile_share) * max(0.0, self.deadline - now)
        return [
            ([p for p in self.paths if p != "compile"], fast_until),
            (["compile"], self.deadline),
        ]

    def bench_all(self, results: list[EngineResult], on_group: Callable) -> None:
        cfg, arch = self.config, self.arch
        parts = Parts.random(arch, cfg.num_tasks, cfg.seed)
        ranks = {c: cfg.resolved_rank(arch.name, c) for c in cfg.configs}
        models = build_all(parts, cfg.configs, ranks, self.device, self.dtype)
        for name, model in models.items():
            self.log(f"{arch.name} {name}: {module_bytes(model) / 2**20:.1f} MiB of weights")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            bench = ArchBench(
                arch,
                parts.tasks,
                self.device,
                self.dtype,
                folder,
                self.threads,
                max(cfg.batches),
                cfg.compile_backend,
            )
            works = [
                Workload(bench, models[c], c, m, ranks[c])
                for c in cfg.configs
                for m in config_modes(c)
                if m in cfg.modes
            ]
            try:
                for paths, deadline in self.phases():
                    for batch, mode in group_order(cfg.batches, cfg.modes, cfg.overhead_batch):
                        group = [w for w in works if w.mode == mode]
                        if not group:
                            continue
                        rows, stopped = self.bench_group(group, batch, paths, deadline)
                        results += rows
                        on_group(results)
                        if stopped:
                            raise Stopped
                self.attach_memory(results, works, bench)
                on_group(results)
            finally:
                bench.close()
        del models, works
        gc.collect()
        torch.compiler.reset()  # frees the compiled graphs that hold the models
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- one group: every contestant of one mode at one batch size ----------------------------

    def row(self, work: Workload, path: str, batch: int, x: Inputs, **fields) -> EngineResult:
        cfg, arch = self.config, self.arch
        ids = x.task_ids.tolist()
        weights = module_bytes(work.model)
        elt = self.dtype.itemsize
        answers = answers_per_call(work.config, work.mode, batch, cfg.num_tasks)
        flops = workload_flops(arch, work.config, work.mode, ids, self.classes, work.rank)
        base = dict(
            arch=arch.name,
            config=work.config,
            mode=work.mode,
            path=path,
            batch=batch,
            dtype=cfg.resolved_dtype(),
            rank=work.rank if work.config in ENGINES else None,
            answers_per_call=answers,
            flops_per_call=flops,
            bytes_per_call=workload_bytes(
                arch, work.config, work.mode, ids, self.classes, weights, elt
            ),
            weight_bytes=weights,
            threads=work.threads,
            workers=work.workers,
            timer=None,
            rounds=0,
            calls_per_block=0,
            median_ms=None,
            q1_ms=None,
            q3_ms=None,
            answers_per_s=None,
            tflops=None,
            peak_fraction=None,
            load_avg_1m=None,
            setup_s=None,
            max_abs_err_vs_eager=None,
            reason=None,
        )
        return EngineResult(**{**base, **fields})

    def bench_group(
        self, works: list[Workload], batch: int, paths: Sequence[str], deadline: float | None
    ) -> tuple[list[EngineResult], bool]:
        """Build and check the group's contestants on ``paths`` one by one while ``deadline``
        allows, then time those that are ready, interleaved. A contestant not prepared in time
        is recorded as skipped, with why; the others are still timed. Returns the rows and
        whether a SIGTERM stopped the group (then nothing was timed)."""
        cfg, mode = self.config, works[0].mode
        x = Inputs.make(self.arch, batch, cfg.num_tasks, self.device, self.dtype)
        planned = [(w, p) for w in works for p in paths if applicable(p, w.config)]
        if paths == ["compile"]:
            planned.sort(key=lambda wp: COMPILE_ORDER.index(wp[0].config))
        if self.over_budget(deadline):
            rows = [
                self.row(w, p, batch, x, status="skipped", reason=self.spent(p, deadline))
                for w, p in planned
            ]
            return rows, False
        load = load_average()
        self.log(f"{self.arch.name} {mode} B={batch}: {len(planned)} contestants (load {load})")
        group = _Group(planned, mode, batch, x)
        try:
            self.prepare_group(group, works, deadline)
            if _STOP.is_set():
                raise Stopped
            samples, failed = interleaved(
                group.contestants, self.device, cfg.rounds, cfg.block_seconds
            )
        except Stopped:
            self.log(f"{self.arch.name} {mode} B={batch}: stopped (SIGTERM): recording the group")
            self.record_stopped(group)
            return group.ordered(), True
        self.record_timed(group, samples, failed, load)
        if machine_is_loaded(self.threads):
            self.log(f"  warning: the machine is loaded ({load_average()}): timings are unreliable")
        return group.ordered(), False

    def prepare_group(self, group: _Group, works: list[Workload], deadline: float | None) -> None:
        """Prepare the group's contestants in turn (built, run once, checked against their
        reference's eager output) while ``deadline`` allows: each ready to time, or its row
        saying why not. Raises :class:`Stopped` at a SIGTERM, ``group.current`` naming the
        contestant it stopped."""
        row = partial(self.row, batch=group.batch, x=group.x)
        by_config = {w.config: w for w in works}
        references: dict[str, object] = {}
        for work, path in group.planned:
            if _STOP.is_set():
                raise Stopped
            key = (work.config, path)
            reason = self.not_started(work, path, group.batch, deadline)
            if reason is not None:
                group.rows[key] = row(work, path, status="skipped", reason=reason)
                continue
            # the concurrent and vmapped experts are checked against the sequential experts
            reference = by_config.get("experts") if work.config in SAME_AS_EXPERTS else None
            group.current = (work, path, time.perf_counter())
            status = self.prepare(work, path, group.batch, group.x, references, reference or work)
            group.current = None
            if isinstance(status, EngineResult):
                group.rows[key] = status
                continue
            fn, setup, err = status
            if path == "compile":
                self.note_compile(work, group.batch, setup)
            group.contestants.append(Contestant(key, fn, work.threads))
            group.ready[key] = (work, setup, err)

    def record_stopped(self, group: _Group) -> None:
        """After a SIGTERM, a row for every contestant without one, saying how far it got: being
        prepared (for how long), prepared but not timed, or not started."""
        row = partial(self.row, batch=group.batch, x=group.x)
        for work, path in group.planned:
            key = (work.config, path)
            if key in group.rows:
                continue
            current = group.current
            if current is not None and (current[0], current[1]) == (work, path):
                spent = time.perf_counter() - current[2]
                what = "compile" if path == "compile" else "preparation"
                reason = f"{what}: not measured (stopped after {spent:.0f} s by SIGTERM)"
            elif key in group.ready:
                reason = "prepared, not timed: stopped by SIGTERM"
            else:
                reason = "not started: stopped by SIGTERM"
            group.rows[key] = row(work, path, status="skipped", reason=reason)

    def record_timed(
        self,
        group: _Group,
        samples: dict[tuple[str, str], Samples],
        failed: dict[tuple[str, str], BaseException],
        load: list[float] | None,
    ) -> None:
        """A row for every contestant that was timed: its median and quartiles over the rounds,
        answers/s, TFLOP/s and the fraction of the device's peak; or why it failed while timed.
        Each is logged."""
        cfg, mode, batch = self.config, group.mode, group.batch
        row = partial(self.row, batch=batch, x=group.x)
        peak = cfg.peak_tflops if self.device.type == "cuda" else None
        for key, (work, setup, err) in group.ready.items():
            if key in failed:
                reason = _short(failed[key])
                self.log(f"  {key[0]} {mode} {key[1]} B={batch}: failed while timed: {reason}")
                group.rows[key] = row(work, key[1], status="failed", reason=reason)
                continue
            s = samples[key]
            answers = answers_per_call(work.config, mode, batch, cfg.num_tasks)
            r = row(
                work,
                key[1],
                status="ok",
                timer=s.timer,
                rounds=len(s.ms),
                calls_per_block=s.calls_per_block,
                median_ms=s.median,
                q1_ms=s.q1,
                q3_ms=s.q3,
                load_avg_1m=None if load is None else load[0],
                setup_s=setup,
                max_abs_err_vs_eager=err,
            )
            tflops = r.flops_per_call / (s.median * 1e-3) / 1e12
            group.rows[key] = dataclasses.replace(
                r,
                answers_per_s=answers / (s.median * 1e-3),
                tflops=tflops,
                peak_fraction=None if peak is None else tflops / peak,
            )
            spread = "" if s.spread <= 0.1 else f"  (spread {100 * s.spread:.0f}%)"
            self.log(
                f"  {work.config:18s} {mode:9s} {key[1]:16s} B={batch:<4d} {s.median:9.3f} ms "
                f"{answers / (s.median * 1e-3):12.1f} answers/s{spread}"
            )

    # --- the compile share ----------------------------------------------------------------------

    @staticmethod
    def compiled_function(work: Workload) -> object:
        """What ``torch.compile`` compiles for ``work``: the experts' one shared encoder, or the
        workload's own call."""
        return "expert-encoder" if work.config in EXPERT_CONFIGS else (work.config, work.mode)

    def compile_estimate(self, work: Workload, batch: int) -> float:
        """The seconds a compile of ``work`` at ``batch`` is expected to take: none where its
        function already ran at this shape, its own last compile where it compiled at another,
        else the longest compile so far (0 before the first)."""
        fn = self.compiled_function(work)
        if (fn, work.mode, batch) in self.compiled_at:
            return 0.0
        if fn in self.compile_seconds:
            return self.compile_seconds[fn]
        return max(self.compile_seconds.values(), default=0.0)

    def note_compile(self, work: Workload, batch: int, seconds: float | None) -> None:
        fn = self.compiled_function(work)
        if (fn, work.mode, batch) not in self.compiled_at and seconds is not None:
            self.compile_seconds[fn] = seconds
        self.compiled_at.add((fn, work.mode, batch))

    def spent(self, path: str, deadline: float | None) -> str:
        """Why a contestant was skipped once its phase's ``deadline`` passed."""
        budget = f"the time budget of {self.config.budget_s:g} s"
        if path == "compile":
            return f"compile: not measured (budget): {budget} was spent"
        if deadline != self.deadline:  # the phase before the compile share
            return f"{budget}, less its compile share, was spent"
        return f"{budget} was spent"

    def not_started(
        self, work: Workload, path: str, batch: int, deadline: float | None
    ) -> str | None:
        """Why the contestant is not prepared (the budget), or None: prepare it."""
        if self.over_budget(deadline):
            return self.spent(path, deadline)
        if path != "compile" or deadline is None or self.unavailable[path] is not None:
            return None
        left = deadline - time.perf_counter()
        expected = self.compile_estimate(work, batch)
        if expected > left:
            return (
                f"compile: not measured (budget): {left:.0f} s of the compile share left, "
                f"a compile here took {expected:.0f} s"
            )
        return None

    def prepare(
        self,
        work: Workload,
        path: str,
        batch: int,
        x: Inputs,
        references: dict[str, object],
        reference: Workload,
    ):
        """The contestant's callable (run once, checked against ``reference``'s eager output),
        or the row saying why it is not timed."""
        fail = partial(self.row, work, path, batch, x)
        if self.unavailable[path] is not None:
            return fail(status="unavailable", reason=self.unavailable[path])
        if path in work.sticky_error:
            return fail(status="failed", reason=work.sticky_error[path])
        try:
            with torch.inference_mode():
                if reference.config not in references:
                    references[reference.config] = reference.call()(x)
                start = time.perf_counter()
                fn = work.prepare(path, x)
                output = fn()
                sync(self.device)
                setup = time.perf_counter() - start
        except Exception as e:  # a path that fails is recorded; the others still run
            reason = _short(e)
            if path == "compile":
                reason = work.sticky_error[path] = f"torch.compile failed: {reason}"
            if path in ("onnxruntime", "tensorrt") and work.onnx is None and work.trt is None:
                reason = work.sticky_error[path] = f"export or session failed: {reason}"
            self.log(f"  {work.config} {work.mode} {path} B={batch}: failed: {reason}")
            if self.verbose:
                self.log(traceback.format_exc())
            return fail(status="failed", reason=reason)
        own = path == "eager" and reference is work
        err = None if own else max_abs_err(output, references[reference.config])
        return fn, None if path == "eager" else setup, err

    # --- peak memory, one process per (configuration, mode, path) -----------------------------

    def attach_memory(
        self, results: list[EngineResult], works: list[Workload], bench: ArchBench
    ) -> None:
        """The peak memory of every (configuration, mode, path) timed, each in a process of its
        own, into its rows (none once the time budget is spent)."""
        specs = memory_specs(self.config, bench, works, results)
        if not specs:
            return
        if self.over_budget():
            self.log(f"{self.arch.name}: peak memory not measured: the time budget was spent")
            return
        jobs = self.config.memory_jobs
        self.log(f"{self.arch.name}: peak memory, {len(specs)} processes ({jobs} at once)")
        attach_records(results, run_children(specs, jobs), self.log)


def _short(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def run_and_write(
    config: EngineBenchConfig,
    out: Path,
    command: str,
    append: bool = False,
    plots: bool = True,
    quiet: bool = False,
    verbose: bool = False,
) -> list[Path]:
    """Run the benchmark and write its JSON and Markdown under ``out`` after every group, and
    the plots at the end (``plots``); returns the files written.

    ``command`` is recorded; ``append`` keeps the rows of an earlier ``engine-<arch>.json`` in
    ``out`` that this run does not measure; ``quiet``: the Markdown is not printed. Progress goes
    to stderr. Interrupted, it says where the groups measured so far are, and re-raises.
    """
    previous = Previous.read(out, config) if append else Previous()
    log = partial(print, file=sys.stderr, flush=True)
    rates = measure_rates(config.device, DTYPES[config.resolved_dtype()])
    write = partial(write_outputs, config, out=out, command=command, previous=previous, rates=rates)
    try:
        results = run_engine_bench(
            config,
            log=log,
            verbose=verbose,
            on_group=lambda rows: write(rows, plots=False, complete=False, quiet=True),
        )
    except KeyboardInterrupt:
        log(f"interrupted: the groups measured so far are in {out}")
        raise
    return write(results, plots=plots, complete=True, quiet=quiet)

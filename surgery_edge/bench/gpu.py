"""The GPU run: every GPU measurement of the project in one budgeted command.

``benchmarks/gpu/run.sh`` installs the project on the GPU machine and calls this module, which
runs each step in a process of its own, within its share of the time, keeps going when a step
fails or runs out of time, and after every step rewrites what it has under ``--out``
(``$OUT``): at most eight files, no folders, so that everything comes back from the machine:

* ``report.md``: the targets with the measured figure, whether each was met, the peak it was
  judged against and the baselines a "best" was taken over
  (:mod:`~surgery_edge.bench.gpu_targets`), then every step's Markdown;
  ``summary.json``: the steps (command, status, seconds, budget), the environment (device,
  driver, CUDA, torch, triton, the device's peaks and where they came from), the test results
  and the targets; ``log.txt``: the steps' output;
* ``kernels.json``, ``engine-<arch>.json`` (one per architecture), ``training.json``.

The steps, in order of what the targets need most:

1. ``env``: the environment, the measured matmul and copy rates, and the device's peaks (the
   datasheet's for its name, :mod:`surgery_edge.bench.roofline`; measured for a GPU not listed);
2. ``tests``: the gpu-marked tests (the kernels at fp16, bf16 and fp32; the fused model against
   eager at ViT-B/32 width), each result logged as it finishes (``tests.jsonl``), so that a step
   stopped at the end of its slot keeps what passed and failed;
3. ``kernels``: the fused correction kernel against PyTorch and ``torch.compile``, ViT-L/14
   batch 64 first (the targets' shape), then ViT-B/32 and ViT-L/14 at batch 1-128, fp16;
4. ``engine-b32``: eight experts (one after another, on CUDA streams, vmapped, and as one
   model: their engines in one ONNX graph, on ONNX Runtime and TensorRT) against the merged
   backbone and the V1 and V2 engines, fp16: eager, fused, CUDA graphs, ONNX Runtime, TensorRT
   at batch 1, 8 and 64 first, then ``torch.compile`` in the share of the step kept for it
   (each model built and compiled once, in the same process);
5. ``training``: SurgeryV2 (and V1) training speed, ViT-B/32, 8 tasks x batch 16;
6. ``engine-l14``: the same at ViT-L/14, batch 128 first (the backbone's fraction of peak);
7. ``serve`` (optional, only with ``--only serve``, in a call of its own): the serving benchmark
   as the CPU record ran it, on the machine's processors (:func:`serve_step`).

Each step ends by the end of its slot in a cumulative schedule (time an earlier step did not use
passes to the later ones); the benchmarks also get a budget of their own, so that they stop
between measurements and write what they have, and an engine step stopped at its slot records
the group in progress before it exits. ``--dry-run`` runs every step at tiny size on the CPU
under the Triton interpreter (timings meaningless), to check the whole run before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgery_edge.bench.gpu_targets import env_peaks, read_json, serve_targets, targets
from surgery_edge.bench.gpu_tests import test_results
from surgery_edge.bench.roofline import peaks_for
from surgery_edge.io import write_json_atomic, write_text_atomic
from surgery_edge.surgery.methods import SURGERY, SURGERY_V2

MODULE = "surgery_edge.bench.gpu"
PLUGIN = "surgery_edge.bench.gpu_tests"  # the tests step's per-test log (``-p PLUGIN``)
TOTAL_BUDGET_S = 450.0  # of the 8-minute call, after the installation
LOG_TAIL_CHARS = 60_000  # per step, in log.txt
TEST_PATHS = ("tests/kernels/test_kernels.py", "tests/surgery/test_fused.py")
TEST_LOG = "tests.jsonl"  # the tests step's per-test results, written as each test ends
# steps run only when ``--only`` names them: serving needs tritonserver, whose wheel does not
# fit one device call beside the project's (run.sh --install-serving carries it in a call before)
OPTIONAL_STEPS = ("serve",)
SERVE_ARCH = "tiny-vit-32"  # the CPU record's architecture, so the two records compare


@dataclass(frozen=True)
class Step:
    """One step: a command, its share of the time, and the files it leaves for ``--out``."""

    name: str
    what: str
    args: tuple[str, ...]  # run as ``python <args>``
    budget_s: float
    products: tuple[str, ...] = ()  # file names in the scratch folder, copied to --out
    markdown: str | None = None  # how its Markdown is found: "engine", "json" or None
    bench_budget_flag: bool = False  # pass --budget-s (its slot, less a margin)


@dataclass
class StepResult:
    name: str
    what: str
    command: str
    status: str = "not run"  # ok | failed | timeout | not run
    returncode: int | None = None
    seconds: float = 0.0
    timeout_s: float = 0.0
    files: list[str] = field(default_factory=list)


def _each(option: str, *values: str) -> list[str]:
    """``option`` once per value: the engine benchmark's lists are repeated options."""
    return [word for value in values for word in (option, value)]


@dataclass(frozen=True)
class _Sizes:
    """The benchmarks' options at one size: on a GPU at full size, or tiny on the CPU."""

    b32: str  # the architecture of the first engine step
    l14: str  # and of the last
    engine_common: tuple[str, ...]  # every engine step's
    b32_batches: tuple[str, ...]
    l14_batches: tuple[str, ...]
    b32_extra: tuple[str, ...]
    l14_extra: tuple[str, ...]
    kernels: tuple[str, ...]
    training: tuple[str, ...]


def _gpu_sizes() -> _Sizes:
    """The targets' architectures, batches and paths, fp16 on CUDA."""
    engine_common = ("--device", "cuda", "--dtype", "fp16", "--rounds", "5")
    engine_common += ("--block-seconds", "0.02", "--no-plots", "--memory-jobs", "4")
    # compile runs last in each step, in the share of its budget kept for it
    paths = _each("--path", "eager", "fused", "cuda-graph", "onnxruntime", "tensorrt", "compile")
    extra = (*paths, "--memory-path", "eager")
    training = ("--arch", "ViT-B-32", "--tasks", "8", "--batch-size", "16")
    return _Sizes(
        b32="ViT-B-32",
        l14="ViT-L-14",
        engine_common=engine_common,
        # the targets' batches first (the engine bench runs all-tasks groups, then routed at
        # --overhead-batch 64, then the rest): a budget cut drops the last
        b32_batches=tuple(_each("--batch", "1", "8", "64", "128")),
        l14_batches=tuple(_each("--batch", "128", "64", "1", "8")),
        b32_extra=extra,
        l14_extra=extra,
        kernels=("--dtype", "fp16", "--batches", "1", "8", "32", "64", "128"),
        training=(*training, "--steps", "40", "--warmup", "5", "--device", "cuda"),
    )


def _dry_run_sizes() -> _Sizes:
    """Tiny architectures and batches on the CPU, every path and configuration checked once."""
    engine_common = ("--device", "cpu", "--num-tasks", "2", "--rounds", "1")
    engine_common += ("--block-seconds", "0.002", "--no-plots", "--memory-jobs", "2")
    # dynamo only for compile: the GPU's inductor makes Triton kernels, which a CPU cannot
    # check anyway
    paths = ("--compile-backend", "eager", *_each("--path", "eager", "cuda-graph", "tensorrt"))
    b32_paths = (*paths, *_each("--path", "fused", "compile"), "--time-interpreter")
    # the b32 step checks every configuration, the fused path under the (slow) Triton
    # interpreter, compile (dynamo: about 2 s a model here) and the memory processes; this
    # one, the second step's options at another width
    configs = _each("--config", "experts", "merged", SURGERY, SURGERY_V2)
    training = ("--arch", "micro-vit-16", "--tasks", "2", "--batch-size", "4")
    return _Sizes(
        b32="micro-vit-16",
        l14="tiny-vit-32",
        engine_common=engine_common,
        b32_batches=("--batch", "2"),
        l14_batches=("--batch", "1"),
        b32_extra=(*b32_paths, "--memory-path", "eager", "--memory-config", "experts"),
        l14_extra=(*paths, "--no-memory", *configs),
        kernels=("--cpu-smoke", "--batches", "1"),
        training=(*training, "--steps", "3", "--warmup", "1", "--device", "cpu"),
    )


def plan(dry_run: bool, scratch: Path) -> list[Step]:
    """The steps, at full size on a GPU or (``dry_run``) at tiny size on the CPU."""
    s = str(scratch)
    size = _dry_run_sizes() if dry_run else _gpu_sizes()
    b32, l14 = size.b32, size.l14

    def engine(arch: str, batches: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
        args = ("benchmarks/bench_engine.py", *size.engine_common, "--arch", arch)
        return (*args, *batches, *extra, "--out", s)

    tests = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *TEST_PATHS)
    tests += ("--junitxml", f"{s}/tests.xml", "-o", "junit_family=xunit1")
    tests += ("-p", PLUGIN, "--result-log", f"{s}/{TEST_LOG}")  # a line per test as it ends
    return [
        Step(
            "env",
            "environment, measured device rates, the device's peaks",
            ("-m", MODULE, "--capture-env", f"{s}/env.json"),
            25,
        ),
        Step("tests", "gpu-marked tests: kernels fp16/bf16/fp32, fused model vs eager", tests, 70),
        Step(
            "kernels",
            "fused correction kernel vs torch and torch.compile",
            ("benchmarks/bench_kernels.py", *size.kernels, "--out", f"{s}/kernels.json"),
            55,
            ("kernels.json",),
            "json",
            True,
        ),
        Step(
            "engine-b32",
            f"engine benchmark {b32}: the engines against eight experts (separate, and as one "
            "graph on ONNX Runtime and TensorRT): eager, fused, CUDA graphs, then torch.compile",
            engine(b32, size.b32_batches, size.b32_extra),
            100,
            (f"engine-{b32}.json",),
            "engine",
            True,
        ),
        Step(
            "training",
            "SurgeryV2 and V1 training speed",
            ("benchmarks/bench_training.py", *size.training, "--out", f"{s}/training.json"),
            35,
            ("training.json",),
            "json",
        ),
        Step(
            "engine-l14",
            f"engine benchmark {l14}: the same, the experts as one graph included",
            engine(l14, size.l14_batches, size.l14_extra),
            165,
            (f"engine-{l14}.json",),
            "engine",
            True,
        ),
        serve_step(dry_run, scratch),
    ]


def serve_step(dry_run: bool, scratch: Path) -> Step:
    """The serving benchmark as the CPU record ran it (``bench_serve.py --instances 2``), on the
    GPU machine's processors: ONNX Runtime there has no CUDA provider and TensorRT cannot be
    installed, so this measures the serving chain on 16 cores, not the GPU. Optional (run with
    ``--only serve``): see :data:`OPTIONAL_STEPS`."""
    s = str(scratch)
    if dry_run:  # one short window per point at the smallest width
        arch, load = "micro-vit-16", ["--concurrency", "1", "--seconds", "0.3", "--repeats", "1"]
        load += ["--warmup-s", "0.1"]
    else:
        arch, load = SERVE_ARCH, []  # the CPU record's windows, clients and batching
    return Step(
        "serve",
        f"serving through one Triton server, {arch}: V1, V2, the merged backbone, the eight "
        "experts and the experts as one graph (ONNX Runtime on the machine's CPUs)",
        ("benchmarks/bench_serve.py", "--arch", arch, "--instances", "2", *load)
        + ("--engines", f"{s}/serve-engines", "--out", s),
        420,
        (f"serve-{arch}.json",),
        "engine",  # its Markdown lies beside its JSON
    )


def run_step(
    step: Step, python: str, scratch: Path, timeout_s: float, log: list[str]
) -> StepResult:
    """Run one step within ``timeout_s``; its output goes to ``log``."""
    args = list(step.args)
    if step.bench_budget_flag:  # stop between measurements, leaving time to write and exit
        args += ["--budget-s", f"{max(5.0, 0.8 * timeout_s - 5):.0f}"]
    cmd = [python, *args]
    result = StepResult(step.name, step.what, " ".join(cmd), timeout_s=round(timeout_s, 1))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SURGERY_EDGE_QUIET": "1"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(
            cmd, stdout=output, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        try:
            result.returncode = proc.wait(timeout=max(1.0, timeout_s))
            result.status = "ok" if result.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill(proc)
            result.status = "timeout"
        output.seek(0)
        text = output.read()
    result.seconds = round(time.perf_counter() - start, 1)
    if len(text) > LOG_TAIL_CHARS:
        text = f"[... {len(text) - LOG_TAIL_CHARS} characters cut ...]\n" + text[-LOG_TAIL_CHARS:]
    log.append(f"===== {step.name} ({result.status}, {result.seconds} s): {result.command}\n{text}")
    return result


def _kill(proc: subprocess.Popen) -> None:
    """End the step and everything it started (it runs in its own process group)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def write_summary(
    out: Path,
    scratch: Path,
    steps: list[Step],
    results: list[StepResult],
    log: list[str],
    meta: dict[str, Any],
    archs: tuple[str, str],
) -> None:
    """Rewrite ``report.md``, ``summary.json`` and ``log.txt`` under ``out``."""
    tests = test_results(scratch / "tests.xml", scratch / TEST_LOG)
    env = read_json(scratch / "env.json")
    goals = targets(out, *archs, env=env) + serve_targets(out)
    summary = {
        **meta,
        "environment": env,
        "steps": [asdict(r) for r in results],
        "tests": tests,
        "targets": goals,
    }
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "log.txt", "\n".join(log))
    lines = [f"# GPU run{' (dry run: tiny sizes on the CPU)' if meta['dry_run'] else ''}", ""]
    lines += [f"Command: `{meta['command']}`", ""]
    if env:
        keys = ("device_name", "driver", "cuda", "torch", "triton", "surgery_edge", "python")
        lines += ["- " + ", ".join(f"{k}: {env.get(k)}" for k in keys)]
        peaks = env_peaks(env)
        if peaks is not None:
            lines.append(
                f"- peaks the targets use: HBM {peaks.describe('bw')}; dense fp16 "
                f"{peaks.describe('tflops')}"
            )
        lines.append("")
    lines += [
        "## Steps",
        "",
        "| step | status | seconds | slot (s) | what |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds} | {r.timeout_s} | {r.what} |")
    if tests:
        stopped = ""
        if not tests["complete"]:
            stopped = (
                f" The tests step stopped before pytest ended: {tests['reported']} of "
                f"{tests['collected']} tests reported, read from its per-test log."
            )
        lines += [
            "",
            f"Tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
            f"errors, {tests['skipped']} skipped.{stopped}",
        ]
        lines += [f"- {p['outcome']}: {p['test']}: {p['message']}" for p in tests["problems"]]
    lines += ["", "## Targets", ""]
    lines += ["| target | measured | met | peak, baselines |", "|---|---|---|---|"]
    for g in goals:
        value = "—" if g["measured"] is None else f"{g['measured']:.3g}{g['unit']}"
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['target']} | {value} | {met} | {g['note']} |")
    # a file several steps write (an engine file and its compile pass) is shown once, as last
    # written
    last = {name: step.name for step in steps for name in step.products}
    for step in steps:
        if any(last[name] != step.name for name in step.products):
            continue
        md = _step_markdown(step, scratch)
        if md:
            demoted = "\n".join("#" + ln if ln.startswith("#") else ln for ln in md.splitlines())
            lines += ["", f"## {step.name}: {step.what}", "", demoted]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")


def _step_markdown(step: Step, scratch: Path) -> str | None:
    if step.markdown == "engine":
        md = scratch / step.products[0].replace(".json", ".md")
        return md.read_text() if md.is_file() else None
    if step.markdown == "json":
        record = read_json(scratch / step.products[0])
        return (record or {}).get("markdown")
    return None


def capture_env(path: Path) -> None:
    """The environment record of the GPU run: versions, driver, device and measured rates."""
    import torch  # deferred: only this step needs it in the orchestrating process' children

    from surgery_edge.bench.env import environment  # deferred: it imports torch too
    from surgery_edge.bench.roofline import measure_rates, smi_gpu_names  # tests patch roofline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    rates = measure_rates(device, dtype)
    env["rates"] = asdict(rates)
    peaks = None
    if device == "cuda":  # the datasheet's for the name; the rates just measured if not listed
        peaks = peaks_for(env["device_name"], rates, smi_gpu_names())
    env["peaks"] = None if peaks is None else asdict(peaks)
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    write_json_atomic(path, env)
    print(json.dumps({k: v for k, v in env.items() if k != "nvidia_smi"}, indent=1))
    print(env["nvidia_smi"] or "nvidia-smi: not available")


def _selected(name: str, only: Sequence[str]) -> bool:
    """Whether a step runs: those named by ``--only``, else every step but the optional ones."""
    return name in only if only else name not in OPTIONAL_STEPS


def run(
    out: Path, dry_run: bool, budget_s: float, python: str, command: str, only: Sequence[str] = ()
) -> list[StepResult]:
    """Every step (or those in ``only``), results under ``out``; prints the summary table."""
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="surgery-edge-gpu-"))
    steps = [s for s in plan(dry_run, scratch) if _selected(s.name, only)]
    archs = ("micro-vit-16", "tiny-vit-32") if dry_run else ("ViT-B-32", "ViT-L-14")
    results = [StepResult(s.name, s.what, "") for s in steps]
    meta = {"command": command, "dry_run": dry_run, "budget_s": budget_s}
    log: list[str] = []
    start = time.perf_counter()
    scale = budget_s / sum(s.budget_s for s in steps)
    slot_end = 0.0
    try:
        for i, step in enumerate(steps):
            slot_end += step.budget_s * scale  # the cumulative schedule
            timeout = min(slot_end, budget_s) - (time.perf_counter() - start)
            if timeout < 5:
                results[i].status = "not run"
                log.append(f"===== {step.name}: not run, no time left")
                continue
            print(f"[{time.perf_counter() - start:6.1f} s] {step.name}: {step.what}", flush=True)
            results[i] = run_step(step, python, scratch, timeout, log)
            for name in step.products:
                if (scratch / name).is_file():
                    shutil.copyfile(scratch / name, out / name)
                    results[i].files.append(name)
            write_summary(out, scratch, steps, results, log, meta, archs)
    finally:
        write_summary(out, scratch, steps, results, log, meta, archs)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{'step':20s} {'status':8s} {'seconds':>8s} {'slot':>6s}")
    for r in results:
        print(f"{r.name:20s} {r.status:8s} {r.seconds:8.1f} {r.timeout_s:6.0f}")
    print(f"results in {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m surgery_edge.bench.gpu [--dry-run] [--out DIR] [--budget-s S]``."""
    p = argparse.ArgumentParser(prog="benchmarks/gpu/run.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, TRITON_INTERPRET")
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="default: $OUT")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="all steps together")
    p.add_argument(
        "--only",
        nargs="+",
        default=(),
        help=f"run these steps only (the optional {', '.join(OPTIONAL_STEPS)} runs only so)",
    )
    p.add_argument("--capture-env", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.capture_env:
        capture_env(args.capture_env)
        return 0
    if args.out is None:
        p.error("no --out and no $OUT: say where the results go")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # the GPU run times compiled kernels
    command = "benchmarks/gpu/run.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(args.out, args.dry_run, args.budget_s, sys.executable, command, args.only)
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

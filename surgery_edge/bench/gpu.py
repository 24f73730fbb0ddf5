"""The GPU run: every GPU measurement of the project in one budgeted command.

``benchmarks/gpu/run.sh`` installs the project on the GPU machine and calls this module, which
runs each step in a process of its own, within its share of the time, keeps going when a step
fails or runs out of time, and after every step rewrites what it has under ``--out``
(``$OUT``): at most eight files, no folders, so that everything comes back from the machine:

* ``report.md``: the targets with the measured figure and whether each was met, then every
  step's Markdown; ``summary.json``: the steps (command, status, seconds, budget), the
  environment (device, driver, CUDA, torch, triton), the test results and the targets;
  ``log.txt``: the steps' output;
* ``kernels.json``, ``engine-<arch>.json`` (one per architecture), ``training.json``.

The steps, in order of what the targets need most (the slow ``torch.compile`` passes last, their
rows merged into the same engine files):

1. ``env``: the environment and the measured matmul and copy rates;
2. ``tests``: the gpu-marked tests (the kernels at fp16, bf16 and fp32; the fused model against
   eager at ViT-B/32 width);
3. ``kernels``: the fused correction kernel against PyTorch and ``torch.compile``, ViT-B/32 and
   ViT-L/14 shapes, batch 1-128, fp16;
4. ``engine-b32``, ``engine-l14``: eight experts (one after another, on CUDA streams, vmapped)
   against the merged backbone and the V1 and V2 engines, fp16: eager, fused, CUDA graphs;
5. ``training``: SurgeryV2 (and V1) training speed, ViT-B/32, 8 tasks x batch 16;
6. ``engine-b32-compile``, ``engine-l14-compile``: the same under ``torch.compile``.

Each step ends by the end of its slot in a cumulative schedule (time an earlier step did not use
passes to the later ones); the benchmarks also get a budget of their own, so that they stop
between measurements and write what they have. ``--dry-run`` runs every step at tiny size on
the CPU under the Triton interpreter (timings meaningless), to check the whole run before a GPU
is lent.
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
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgery_edge.io import write_json_atomic, write_text_atomic

MODULE = "surgery_edge.bench.gpu"
TOTAL_BUDGET_S = 450.0  # of the 8-minute call, after the installation
LOG_TAIL_CHARS = 60_000  # per step, in log.txt
TEST_PATHS = ("tests/kernels/test_kernels.py", "tests/surgery/test_fused.py")


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


def plan(dry_run: bool, scratch: Path) -> list[Step]:
    """The steps, at full size on a GPU or (``dry_run``) at tiny size on the CPU."""
    s = str(scratch)
    b32, l14 = ("micro-vit-16", "tiny-vit-32") if dry_run else ("ViT-B-32", "ViT-L-14")
    if dry_run:
        engine_common = ["--device", "cpu", "--num-tasks", "2", "--rounds", "2"]
        engine_common += ["--block-seconds", "0.002", "--no-plots", "--memory-jobs", "2"]
        fast = [*_each("--path", "eager", "fused", "cuda-graph", "tensorrt"), "--time-interpreter"]
        b32_batches, l14_batches = ["--batch", "2"], ["--batch", "1"]
        memory = ["--memory-path", "eager", "--memory-config", "experts"]
        l14_memory = ["--no-memory"]  # the b32 step checks the memory processes
        # one compiled encoder shared by the experts; one compiled engine; dynamo only (the
        # GPU's inductor makes Triton kernels, which a CPU cannot check anyway)
        b32_compile = ["--config", "experts", "--compile-backend", "eager"]
        l14_compile = ["--config", "surgeryv2", "--compile-backend", "eager"]
        kernels = ["--cpu-smoke", "--batches", "1"]
        training = ["--arch", "micro-vit-16", "--tasks", "2", "--batch-size", "4"]
        training += ["--steps", "3", "--warmup", "1", "--device", "cpu"]
    else:
        engine_common = ["--device", "cuda", "--dtype", "fp16", "--rounds", "5"]
        engine_common += ["--block-seconds", "0.02", "--no-plots", "--memory-jobs", "4"]
        fast = _each("--path", "eager", "fused", "cuda-graph", "onnxruntime", "tensorrt")
        # the targets' batches first: a budget cut drops the last
        b32_batches = _each("--batch", "1", "64", "8", "128")
        l14_batches = _each("--batch", "1", "64", "128", "8")
        memory = l14_memory = ["--memory-path", "eager"]
        b32_compile = l14_compile = []
        kernels = ["--dtype", "fp16", "--batches", "1", "8", "32", "64", "128"]
        training = ["--arch", "ViT-B-32", "--tasks", "8", "--batch-size", "16"]
        training += ["--steps", "40", "--warmup", "5", "--device", "cuda"]
    # the compile passes add their rows to the files of the passes before; memory is measured
    # there already
    b32_compile = ["--path", "compile", *b32_compile, "--no-memory", "--append"]
    l14_compile = ["--path", "compile", *l14_compile, "--no-memory", "--append"]

    def engine(arch: str, batches: list[str], extra: list[str]) -> tuple[str, ...]:
        return ("benchmarks/bench_engine.py", *engine_common, "--arch", arch, *batches, *extra)

    tests = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *TEST_PATHS)
    tests += ("--junitxml", f"{s}/tests.xml", "-o", "junit_family=xunit1")
    return [
        Step(
            "env",
            "environment and measured device rates",
            ("-m", MODULE, "--capture-env", f"{s}/env.json"),
            30,
        ),
        Step("tests", "gpu-marked tests: kernels fp16/bf16/fp32, fused model vs eager", tests, 75),
        Step(
            "kernels",
            "fused correction kernel vs torch and torch.compile",
            ("benchmarks/bench_kernels.py", *kernels, "--out", f"{s}/kernels.json"),
            60,
            ("kernels.json",),
            "json",
            True,
        ),
        Step(
            "engine-b32",
            f"engine benchmark {b32}: eager, fused, CUDA graphs",
            engine(b32, b32_batches, [*fast, *memory, "--out", s]),
            70,
            (f"engine-{b32}.json",),
            "engine",
            True,
        ),
        Step(
            "engine-l14",
            f"engine benchmark {l14}: eager, fused, CUDA graphs",
            engine(l14, l14_batches, [*fast, *l14_memory, "--out", s]),
            110,
            (f"engine-{l14}.json",),
            "engine",
            True,
        ),
        Step(
            "training",
            "SurgeryV2 and V1 training speed",
            ("benchmarks/bench_training.py", *training, "--out", f"{s}/training.json"),
            35,
            ("training.json",),
            "json",
        ),
        Step(
            "engine-b32-compile",
            f"engine benchmark {b32}: torch.compile",
            engine(b32, b32_batches, [*b32_compile, "--out", s]),
            35,
            (f"engine-{b32}.json",),
            "engine",
            True,
        ),
        Step(
            "engine-l14-compile",
            f"engine benchmark {l14}: torch.compile",
            engine(l14, l14_batches, [*l14_compile, "--out", s]),
            35,
            (f"engine-{l14}.json",),
            "engine",
            True,
        ),
    ]


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


def test_results(path: Path) -> dict[str, Any] | None:
    """Totals and the non-passing tests of a JUnit XML file (pytest ``--junitxml``)."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    totals = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    problems = []
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            kind = "failed" if "failure" in kinds else "errors"
            child = case.find("failure") if "failure" in kinds else case.find("error")
            message = (
                (child.get("message") or "").splitlines()[0][:300] if child is not None else ""
            )
            problems.append({"test": name, "outcome": kind, "message": message})
            totals[kind] += 1
        elif "skipped" in kinds:
            totals["skipped"] += 1
        else:
            totals["passed"] += 1
    return {**totals, "problems": problems}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def targets(out: Path, b32: str, l14: str) -> list[dict[str, Any]]:
    """Issue 17's targets against what the files under ``out`` hold (None: not measured)."""
    rows: list[dict[str, Any]] = []

    def add(target: str, value: float | None, ok: bool | None, unit: str = "x") -> None:
        rows.append({"target": target, "measured": value, "unit": unit, "met": ok})

    for arch in (b32, l14):
        record = _load(out / f"engine-{arch}.json")
        derived = (record or {}).get("derived", {})
        vs = derived.get("vs_experts", {})
        best = [r for rows_ in vs.get("surgery", {}).values() for r in rows_]
        best = [r for r in best if r["kind"] == "best-vs-best"]
        for batch in (1, 8, 64):
            row = next((r for r in best if r["batch"] == batch), None)
            value = None if row is None else row["speedup"]
            add(f"{arch}: V1 >= 7x best 8-expert baseline, B={batch}", value, _ge(value, 7.0))
        weight = derived.get("weight_ratio_vs_one_expert", {}).get("surgery")
        add(f"{arch}: V1 weights <= 1.05x one expert", weight, _le(weight, 1.05))
        v2 = [r for rows_ in vs.get("surgeryv2", {}).values() for r in rows_]
        row = next(
            (
                r
                for r in v2
                if (r["kind"], r["batch"], r["mode"]) == ("best-vs-best", 1, "all-tasks")
            ),
            None,
        )
        value = None if row is None else row["latency_ratio"]
        add(f"{arch}: V2 batch-1 latency <= 0.35x eight experts", value, _le(value, 0.35))
        over = derived.get("routed_overhead_over_merged", {})
        rows_ = over.get("rows", {}).get("surgeryv2", []) if over.get("batch") == 64 else []
        row = next((r for r in rows_ if r["kind"] == "best-vs-best"), None)
        value = None if row is None else 100 * row["overhead"]
        add(f"{arch}: V2 routed overhead over merged <= 5% at B=64", value, _le(value, 5.0), "%")
        if arch == l14:
            peaks = [p for p in derived.get("merged_peak_fraction", []) if p["batch"] == 128]
            value = max((100 * p["peak_fraction"] for p in peaks), default=None)
            add(f"{arch}: backbone >= 50% of dense fp16 peak at B=128", value, _ge(value, 50), "%")
    kernels = _load(out / "kernels.json") or {}
    at = [
        r
        for r in kernels.get("results", [])
        if r["shape"]["model"] == "ViT-L/14" and r["shape"]["batch"] == 64
    ]
    for name, key, bound in (
        ("fused kernel >= 1.5x unfused eager (ViT-L/14 B=64)", "speedup_vs_torch", 1.5),
        ("fused kernel >= 1.1x torch.compile (ViT-L/14 B=64)", "speedup_vs_compile", 1.1),
    ):
        value = min((r[key] for r in at if r[key] is not None), default=None)
        add(name, value, _ge(value, bound))
    fractions = [t["peak_fraction"] for r in at for t in r["timings"] if t["impl"] == "fused"]
    value = min((100 * f for f in fractions if f is not None), default=None)
    add("fused kernel >= 70% of HBM bandwidth (ViT-L/14 B=64)", value, _ge(value, 70.0), "%")
    training = _load(out / "training.json") or {}
    v2 = [r for r in training.get("results", []) if r["config"]["method"] == "surgeryv2"]
    value = v2[0]["seconds_per_1000_steps"] if v2 else None
    add("SurgeryV2 training 8 tasks x 1,000 steps x 16 <= 60 s", value, _le(value, 60.0), " s")
    return rows


def _ge(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def _le(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


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
    tests = test_results(scratch / "tests.xml")
    env = _load(scratch / "env.json")
    goals = targets(out, *archs)
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
        lines += ["- " + ", ".join(f"{k}: {env.get(k)}" for k in keys), ""]
    lines += [
        "## Steps",
        "",
        "| step | status | seconds | slot (s) | what |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds} | {r.timeout_s} | {r.what} |")
    if tests:
        lines += [
            "",
            f"Tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
            f"errors, {tests['skipped']} skipped.",
        ]
        lines += [f"- {p['outcome']}: {p['test']}: {p['message']}" for p in tests["problems"]]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for g in goals:
        value = "—" if g["measured"] is None else f"{g['measured']:.3g}{g['unit']}"
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['target']} | {value} | {met} |")
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
        record = _load(scratch / step.products[0])
        return (record or {}).get("markdown")
    return None


def capture_env(path: Path) -> None:
    """The environment record of the GPU run: versions, driver, device and measured rates."""
    import torch  # deferred: only this step needs it in the orchestrating process' children

    from surgery_edge.bench.env import environment
    from surgery_edge.bench.roofline import measure_rates

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    env["rates"] = asdict(measure_rates(device, dtype))
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    write_json_atomic(path, env)
    print(json.dumps({k: v for k, v in env.items() if k != "nvidia_smi"}, indent=1))
    print(env["nvidia_smi"] or "nvidia-smi: not available")


def run(
    out: Path, dry_run: bool, budget_s: float, python: str, command: str, only: Sequence[str] = ()
) -> list[StepResult]:
    """Every step (or those in ``only``), results under ``out``; prints the summary table."""
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="surgery-edge-gpu-"))
    steps = [s for s in plan(dry_run, scratch) if not only or s.name in only]
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
    p.add_argument("--only", nargs="+", default=(), help="run these steps only")
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

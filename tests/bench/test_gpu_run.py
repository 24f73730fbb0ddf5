"""The GPU run (benchmarks/gpu/run.sh, surgery_edge.bench.gpu): its dry run end to end on the
CPU, the plan it runs on a GPU, its time slots, and how it reads results back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgery_edge.bench import gpu

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return done, out, time.perf_counter() - start


def test_the_dry_run_passes_every_step(dry_run):
    done, out, seconds = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == [s.name for s in gpu.plan(True, Path("/tmp"))]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert summary["dry_run"] is True and summary["environment"]["torch"]
    assert sum(s["seconds"] for s in steps.values()) < seconds
    # the gpu-marked tests were collected (and skipped: no CUDA here)
    tests = summary["tests"]
    assert tests["skipped"] >= 10 and tests["failed"] == tests["errors"] == 0
    assert "dry run: nothing is installed" in done.stdout
    assert "engine-l14-compile" in done.stdout.splitlines()[-2]  # the summary table, printed


def test_the_dry_run_leaves_what_the_device_tool_brings_back(dry_run):
    _, out, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert all((out / name).is_file() for name in files)  # no folders
    assert len(files) <= 8  # the device tool returns at most eight files
    assert files == sorted(
        [
            "engine-micro-vit-16.json",
            "engine-tiny-vit-32.json",
            "kernels.json",
            "log.txt",
            "report.md",
            "summary.json",
            "training.json",
        ]
    )
    report = (out / "report.md").read_text()
    for section in ("## Steps", "## Targets", "## kernels", "## engine-b32-compile", "## training"):
        assert section in report
    assert "V1 >= 7x best 8-expert baseline" in report


def test_the_dry_run_exercises_every_path_of_the_engine_steps(dry_run):
    _, out, _ = dry_run
    record = json.loads((out / "engine-micro-vit-16.json").read_text())
    rows = record["results"]
    status = {(r["config"], r["mode"], r["path"]): r["status"] for r in rows}
    assert status[("surgeryv2", "routed", "fused")] == "ok"  # the Triton interpreter
    assert status[("surgery", "all-tasks", "fused")] == "ok"
    assert status[("experts-vmap", "all-tasks", "eager")] == "ok"
    assert status[("experts-concurrent", "routed", "eager")] == "ok"
    assert status[("experts", "all-tasks", "compile")] == "ok"  # merged in by the compile step
    assert status[("experts", "all-tasks", "cuda-graph")] == "unavailable"
    fused = [r for r in rows if r["path"] == "fused" and r["status"] == "ok"]
    assert all(r["max_abs_err_vs_eager"] < 1e-4 for r in fused)
    assert [run["command"].count("--append") for run in record["runs"]] == [0, 1]
    memory = [r for r in rows if r["peak_mem_bytes"] is not None]
    assert memory and {r["config"] for r in memory} == {"experts"}
    kernels = json.loads((out / "kernels.json").read_text())
    assert [t["impl"] for t in kernels["results"][0]["timings"]][0] == "fused"
    assert kernels["results"][0]["max_abs_err_vs_torch"] < 1e-4
    training = json.loads((out / "training.json").read_text())
    assert {r["config"]["method"] for r in training["results"]} == {"surgery", "surgeryv2"}


def test_the_gpu_plan_is_the_issue_17_run():
    steps = {s.name: s for s in gpu.plan(False, Path("/scratch"))}
    assert list(steps) == [
        "env",
        "tests",
        "kernels",
        "engine-b32",
        "engine-l14",
        "training",
        "engine-b32-compile",
        "engine-l14-compile",
    ]
    tests = " ".join(steps["tests"].args)
    assert "-m gpu" in tests and "tests/kernels" in tests and "test_fused.py" in tests
    kernels = " ".join(steps["kernels"].args)
    assert "--dtype fp16" in kernels and "--batches 1 8 32 64 128" in kernels
    for name, arch in (("engine-b32", "ViT-B-32"), ("engine-l14", "ViT-L-14")):
        fast, compiled = " ".join(steps[name].args), " ".join(steps[f"{name}-compile"].args)
        assert f"--arch {arch}" in fast and "--dtype fp16" in fast and "--device cuda" in fast
        assert "--path eager --path fused --path cuda-graph" in fast
        assert "--config" not in fast  # all
        assert "--path compile" in compiled and "--append" in compiled
        assert steps[name].products == steps[f"{name}-compile"].products
    training = " ".join(steps["training"].args)
    assert "--arch ViT-B-32" in training and "--tasks 8" in training
    assert "--batch-size 16" in training and "--device cuda" in training
    products = {p for s in steps.values() for p in s.products}
    assert len(products) + 3 <= 8  # with report.md, summary.json and log.txt
    assert sum(s.budget_s for s in steps.values()) == pytest.approx(gpu.TOTAL_BUDGET_S, rel=0.1)


def test_a_step_past_its_slot_is_stopped(tmp_path):
    step = gpu.Step("sleep", "sleeps", ("-c", "import time; print('started'); time.sleep(60)"), 1)
    log: list[str] = []
    start = time.perf_counter()
    result = gpu.run_step(step, sys.executable, tmp_path, 2.0, log)
    assert result.status == "timeout" and time.perf_counter() - start < 30
    assert "started" in log[0]
    failing = gpu.Step("fail", "fails", ("-c", "raise SystemExit(3)"), 1)
    result = gpu.run_step(failing, sys.executable, tmp_path, 30.0, log)
    assert (result.status, result.returncode) == ("failed", 3)


def test_test_results_are_read_from_junit_xml(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="ok"/>'
        '<testcase classname="tests.a" name="bad"><failure message="assert 1 == 2">x</failure>'
        "</testcase>"
        '<testcase classname="tests.a" name="gpu"><skipped message="needs a GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    totals = gpu.test_results(xml)
    assert (totals["passed"], totals["failed"], totals["skipped"]) == (1, 1, 1)
    assert totals["problems"] == [
        {"test": "tests.a::bad", "outcome": "failed", "message": "assert 1 == 2"}
    ]
    assert gpu.test_results(tmp_path / "missing.xml") is None


def test_targets_are_read_from_the_results(tmp_path):
    best = {"kind": "best-vs-best", "mode": "all-tasks", "speedup": 7.5, "latency_ratio": 0.3}
    engine = {
        "derived": {
            "vs_experts": {
                "surgery": {"all-tasks": [{**best, "batch": b} for b in (1, 8, 64)]},
                "surgeryv2": {"all-tasks": [{**best, "batch": 1}]},
            },
            "weight_ratio_vs_one_expert": {"surgery": 1.06},
            "routed_overhead_over_merged": {"batch": 64, "rows": {}},
        }
    }
    (tmp_path / "engine-A.json").write_text(json.dumps(engine))
    goals = {g["target"]: g for g in gpu.targets(tmp_path, "A", "B")}
    assert goals["A: V1 >= 7x best 8-expert baseline, B=8"]["met"] is True
    assert goals["A: V1 weights <= 1.05x one expert"]["met"] is False
    assert goals["A: V2 batch-1 latency <= 0.35x eight experts"]["met"] is True
    assert goals["A: V2 routed overhead over merged <= 5% at B=64"]["met"] is None
    assert goals["B: V1 >= 7x best 8-expert baseline, B=1"]["measured"] is None


@pytest.mark.skipif((ROOT / ".whl").exists(), reason="would install the carried wheels")
def test_the_real_run_refuses_without_its_wheels(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "lacks the wheels of open_clip_torch==" in done.stderr
    assert "pip download" in done.stderr and not list(tmp_path.iterdir())

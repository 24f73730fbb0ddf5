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
import torch

from surgery_edge.bench import gpu, roofline
from surgery_edge.bench.engine_config import with_device_peaks
from surgery_edge.bench.kernels import sweep_shapes
from surgery_edge.bench.roofline import DeviceRates
from surgery_edge.bench.workloads import EngineBenchConfig

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
    optional = gpu.OPTIONAL_STEPS  # serving: only when --only names it
    assert list(steps) == [s.name for s in gpu.plan(True, Path("/tmp")) if s.name not in optional]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert summary["dry_run"] is True and summary["environment"]["torch"]
    assert sum(s["seconds"] for s in steps.values()) < seconds
    # the gpu-marked tests were collected (and skipped: no CUDA here)
    tests = summary["tests"]
    assert tests["skipped"] >= 10 and tests["failed"] == tests["errors"] == 0
    assert tests["complete"] is True and tests["source"] == "tests.xml"
    assert summary["environment"]["peaks"] is None  # no GPU: no fraction of a GPU's peak
    assert "dry run: nothing is installed" in done.stdout
    assert "engine-l14" in done.stdout.splitlines()[-2]  # the summary table, printed


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
    for section in ("## Steps", "## Targets", "## kernels", "## engine-b32", "## training"):
        assert section in report
    assert "V1 >= 7x best 8-expert baseline" in report
    assert "best: experts" in report and "over eager (experts" in report  # which baselines


def test_the_dry_run_exercises_every_path_of_the_engine_steps(dry_run):
    _, out, _ = dry_run
    record = json.loads((out / "engine-micro-vit-16.json").read_text())
    rows = record["results"]
    status = {(r["config"], r["mode"], r["path"]): r["status"] for r in rows}
    assert status[("surgeryv2", "routed", "fused")] == "ok"  # the Triton interpreter
    assert status[("surgery", "all-tasks", "fused")] == "ok"
    assert status[("experts-vmap", "all-tasks", "eager")] == "ok"
    assert status[("experts-concurrent", "routed", "eager")] == "ok"
    assert status[("experts", "all-tasks", "cuda-graph")] == "unavailable"
    # compile in the same step, after the other paths: every configuration compiled or, where
    # its share of the budget ran out, saying so
    assert status[("experts", "all-tasks", "compile")] == "ok"  # the first compile: always
    compiled = [r for r in rows if r["path"] == "compile"]
    assert len(compiled) == 11
    for r in compiled:
        assert r["status"] == "ok" or r["reason"].startswith("compile: not measured (budget)")
    fused = [r for r in rows if r["path"] == "fused" and r["status"] == "ok"]
    assert all(r["max_abs_err_vs_eager"] < 1e-4 for r in fused)
    assert len(record["runs"]) == 1
    memory = [r for r in rows if r["peak_mem_bytes"] is not None]
    assert memory and {r["config"] for r in memory} == {"experts"}
    kernels = json.loads((out / "kernels.json").read_text())
    assert [t["impl"] for t in kernels["results"][0]["timings"]][0] == "fused"
    assert kernels["results"][0]["max_abs_err_vs_torch"] < 1e-4
    training = json.loads((out / "training.json").read_text())
    assert {r["config"]["method"] for r in training["results"]} == {"surgery", "surgeryv2"}


def test_the_gpu_plan_measures_what_the_targets_need_first():
    plan = gpu.plan(False, Path("/scratch"))
    assert [s.name for s in plan if s.name in gpu.OPTIONAL_STEPS] == ["serve"]
    steps = {s.name: s for s in plan if s.name not in gpu.OPTIONAL_STEPS}  # a default run's
    assert list(steps) == ["env", "tests", "kernels", "engine-b32", "training", "engine-l14"]
    tests = " ".join(steps["tests"].args)
    assert "-m gpu" in tests and "tests/kernels" in tests and "test_fused.py" in tests
    assert "-p surgery_edge.bench.gpu_tests --result-log /scratch/tests.jsonl" in tests
    kernels = " ".join(steps["kernels"].args)
    assert "--dtype fp16" in kernels and "--batches 1 8 32 64 128" in kernels
    assert "--peak-bw" not in kernels  # the device's own
    for name, arch, batches in (
        ("engine-b32", "ViT-B-32", "--batch 1 --batch 8 --batch 64 --batch 128"),
        ("engine-l14", "ViT-L-14", "--batch 128 --batch 64 --batch 1 --batch 8"),
    ):
        args = " ".join(steps[name].args)
        assert f"--arch {arch}" in args and "--dtype fp16" in args and "--device cuda" in args
        assert batches in args and "--config" not in args  # every configuration
        # torch.compile in the same process as the other paths: each model built once
        paths = ("eager", "fused", "cuda-graph", "onnxruntime", "tensorrt", "compile")
        assert " ".join(f"--path {p}" for p in paths) in args
        assert "--peak-tflops" not in args and "--append" not in args
    training = " ".join(steps["training"].args)
    assert "--arch ViT-B-32" in training and "--tasks 8" in training
    assert "--batch-size 16" in training and "--device cuda" in training
    products = {p for s in steps.values() for p in s.products}
    assert len(products) + 3 <= 8  # with report.md, summary.json and log.txt
    assert sum(s.budget_s for s in steps.values()) == pytest.approx(gpu.TOTAL_BUDGET_S, rel=0.1)


def test_the_kernel_bench_times_the_targets_shapes_first():
    shapes = sweep_shapes((1, 8, 32, 64, 128))
    assert [(s.model, s.batch, s.rank) for s in shapes[:2]] == [
        ("ViT-L/14", 64, 4),
        ("ViT-L/14", 64, 16),
    ]
    assert len(shapes) == len(set(shapes)) == 15


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


def test_the_serving_step_runs_only_when_named_and_as_the_cpu_record_ran():
    from importlib.metadata import version

    from surgery_edge.bench.serve import build_parser

    assert gpu.OPTIONAL_STEPS == ("serve",)
    assert not gpu._selected("serve", ()) and gpu._selected("engine-b32", ())
    assert gpu._selected("serve", ["serve"]) and not gpu._selected("engine-b32", ["serve"])
    # the GPU machine's record compares with the CPU's: the same benchmark settings
    step = next(s for s in gpu.plan(False, Path("/tmp/s")) if s.name == "serve")
    assert step.args[0] == "benchmarks/bench_serve.py"
    args = vars(build_parser().parse_args(list(step.args[1:])))
    cpu = json.loads((ROOT / "benchmarks/results/cpu/serve-tiny-vit-32.json").read_text())
    for key, value in cpu["config"].items():
        assert args[key] == (list(value) if isinstance(value, list) else value), key
    assert step.products == ("serve-tiny-vit-32.json",) and str(args["out"]) == "/tmp/s"
    dry = next(s for s in gpu.plan(True, Path("/tmp/s")) if s.name == "serve")
    assert vars(build_parser().parse_args(list(dry.args[1:])))["arch"] == "micro-vit-16"
    # the wheels carried for it are the versions tested here
    pins = [
        line.split("==")
        for line in (ROOT / "benchmarks/gpu/wheels-serve.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["nvidia-pytriton", version("nvidia-pytriton")] in pins
    assert all(version(name) == pinned for name, pinned in pins), pins


def test_the_serving_records_targets_join_the_report(tmp_path):
    record = json.loads((ROOT / "benchmarks/results/cpu/serve-tiny-vit-32.json").read_text())
    (tmp_path / "serve-tiny-vit-32.json").write_text(json.dumps(record))
    rows = gpu.serve_targets(tmp_path)
    assert len(rows) == len(record["targets"]) == 15
    for row, target in zip(rows, record["targets"]):
        assert row["measured"] == target["ratio"]
        assert f"{target['concurrency']} client(s)" in row["target"]
        if target["above_ceiling"]:  # a flagged ratio is shown, never judged
            assert row["met"] is None and row["note"].startswith("flagged beyond its bound")
        else:
            assert row["met"] is target["met"] and "flagged" not in row["note"]
    assert sum(r["met"] is None for r in rows) == 6  # 4 flagged, 2 more without a target
    assert gpu.serve_targets(tmp_path / "none") == []


@pytest.mark.skipif((ROOT / ".whl-serve").exists(), reason="would install the carried wheels")
def test_installing_the_serving_wheels_refuses_without_them(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--install-serving"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2, done.stderr
    assert ".whl-serve/ lacks the wheels of nvidia-pytriton==0.7.0" in done.stderr
    assert "wheels-serve.txt" in done.stderr and not (ROOT / ".site-serve").exists()


@pytest.mark.parametrize(
    "name, model, bw, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 3.35e12, 989.0),  # the lent H100
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 2.0e12, 756.0),
        ("NVIDIA H200", "NVIDIA H200 SXM", 4.8e12, 989.0),  # the lent H200
    ],
)
def test_the_datasheet_is_found_by_the_device_name(name, model, bw, tflops):
    sheet = roofline.lookup_datasheet(name)
    assert (sheet.model, sheet.hbm_bytes_per_s, sheet.dense_fp16_tflops) == (model, bw, tflops)
    peaks = roofline.peaks_for(name)
    assert (peaks.hbm_bytes_per_s, peaks.dense_fp16_tflops) == (bw, tflops)
    assert peaks.source.startswith(f"datasheet: {model}")


def test_a_gpu_not_in_the_table_gets_its_measured_rates():
    for name in ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 NVL", "NVIDIA GH200 480GB",
                 "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA H200 NVL"):  # fmt: skip
        assert roofline.lookup_datasheet(name) is None, name
        assert roofline.peaks_for(name) is None
    rates = DeviceRates(500e12, 1.5e12, "float16", "a 1 GiB copy")
    peaks = roofline.peaks_for("NVIDIA A100-SXM4-80GB", rates)
    assert (peaks.hbm_bytes_per_s, peaks.dense_fp16_tflops) == (1.5e12, 500.0)
    assert peaks.source.startswith("measured: 'NVIDIA A100-SXM4-80GB' is not in the datasheet")
    # nvidia-smi's name is the second chance
    assert roofline.lookup_datasheet("", "NVIDIA H200").model == "NVIDIA H200 SXM"


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA A40", 150.0)])
def test_the_benchmarks_default_to_the_device_peaks(monkeypatch, name, tflops):
    measured = DeviceRates(150e12, 0.6e12, "float16", "a 1 GiB copy")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(roofline, "smi_gpu_names", lambda: [])
    monkeypatch.setattr(roofline, "measure_rates", lambda device, dtype: measured)
    config = with_device_peaks(EngineBenchConfig(device="cuda"))  # the engine bench's default
    assert config.peak_tflops == tflops
    assert config.peak_source.split(":")[0] == ("datasheet" if tflops == 989.0 else "measured")
    given = with_device_peaks(EngineBenchConfig(device="cuda", peak_tflops=500.0))
    assert given.peak_tflops == 500.0 and given.peak_source.startswith("given: --peak-tflops 500")
    bw = roofline.device_peaks("cuda")  # the kernel bench's --peak-bw default
    assert bw.hbm_bytes_per_s == (3.35e12 if tflops == 989.0 else 0.6e12)
    assert with_device_peaks(EngineBenchConfig(device="cpu")).peak_tflops is None


def test_the_report_judges_each_target_by_the_peaks_of_its_gpu(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir(), scratch.mkdir()
    fused = {"impl": "fused", "gbps": 2500.0, "peak_fraction": 0.52}  # of a 4.8 TB/s flag
    kernels = {"shape": {"model": "ViT-L/14", "batch": 64}, "timings": [fused]}
    kernels |= {"speedup_vs_torch": 2.0, "speedup_vs_compile": 1.2}
    (out / "kernels.json").write_text(json.dumps({"results": [kernels]}))

    def row(config, path, status="ok", reason=None, batch=1, tflops=None):
        return {"config": config, "mode": "all-tasks", "path": path, "batch": batch,
                "status": status, "reason": reason, "tflops": tflops}  # fmt: skip

    budget = "compile: not measured (budget): 3 s of the compile share left"
    results = [
        row("experts", "eager"), row("experts-vmap", "eager"), row("experts", "compile"),
        row("experts-vmap", "compile", "skipped", budget),
        row("experts", "tensorrt", "unavailable", "tensorrt is not installed"),
        row("merged", "eager", batch=128, tflops=600.0),
    ]  # fmt: skip
    best = {"kind": "best-vs-best", "batch": 1, "mode": "all-tasks", "speedup": 7.5}
    best |= {"baseline": "experts", "baseline_path": "compile"}
    derived = {"vs_experts": {"surgery": {"all-tasks": [best]}}}
    (out / "engine-B.json").write_text(json.dumps({"results": results, "derived": derived}))
    meta = {"command": "run.sh", "dry_run": False}
    for name, bw, hbm, met in (
        ("NVIDIA H100 80GB HBM3", "3.35 TB/s (datasheet: NVIDIA H100 SXM", 74.6, True),
        ("NVIDIA H200", "4.80 TB/s (datasheet: NVIDIA H200 SXM", 52.1, False),
    ):
        (scratch / "env.json").write_text(json.dumps({"device_name": name}))
        gpu.write_summary(out, scratch, [], [], [], meta, ("A", "B"))
        goals = {g["target"]: g for g in json.loads((out / "summary.json").read_text())["targets"]}
        hbm_goal = goals["fused kernel >= 70% of HBM bandwidth (ViT-L/14 B=64)"]
        assert (round(hbm_goal["measured"], 1), hbm_goal["met"]) == (hbm, met)
        assert hbm_goal["note"].startswith(f"2500 GB/s of {bw}")
        backbone = goals["B: backbone >= 50% of dense fp16 peak at B=128"]
        assert round(backbone["measured"], 1) == 60.7 and "of 989 TFLOP/s" in backbone["note"]
        v1 = goals["B: V1 >= 7x best 8-expert baseline, B=1"]
        assert v1["note"] == (
            "best: experts / compile; over eager (experts, experts-vmap); compile (experts); "
            f"not measured: compile for experts-vmap (skipped: {budget}); "
            "not measured: tensorrt for experts (unavailable: tensorrt is not installed)"
        )
        report = (out / "report.md").read_text()
        assert f"- peaks the targets use: HBM {bw}" in report
        assert f"| {v1['note']} |" in report


KILLED_TESTS = """
import os, signal, pytest

def test_passes():
    pass

def test_fails():
    assert 1 == 2

@pytest.mark.skip(reason="not here")
def test_skipped():
    pass

def test_at_the_end_of_the_slot():  # the GPU run stops the step: SIGTERM, then SIGKILL
    os.kill(os.getpid(), signal.SIGTERM)

def test_never_run():
    pass
"""


def test_a_tests_step_stopped_at_its_slot_keeps_the_finished_results(tmp_path):
    (tmp_path / "test_killed.py").write_text(KILLED_TESTS)
    xml, log = tmp_path / "tests.xml", tmp_path / gpu.TEST_LOG
    args = ("-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_killed.py"))
    args += ("--rootdir", str(tmp_path))  # test ids relative to it, wherever the checkout lies
    args += ("--junitxml", str(xml), "-p", gpu.PLUGIN, "--result-log", str(log))
    result = gpu.run_step(gpu.Step("tests", "tests", args, 60), sys.executable, tmp_path, 120, [])
    assert result.status == "failed" and not xml.exists()  # pytest never wrote its XML
    totals = gpu.test_results(xml, log)
    assert (totals["passed"], totals["failed"], totals["skipped"], totals["errors"]) == (1, 1, 1, 0)
    assert (totals["complete"], totals["collected"], totals["reported"]) == (False, 5, 3)
    assert totals["problems"] == [
        {"test": "test_killed.py::test_fails", "outcome": "failed", "message": "assert 1 == 2"}
    ]

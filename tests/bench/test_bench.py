"""The benchmarks (surgery_edge.bench): engine result structure, weight bytes, FLOPs, reports,
``surgery-edge bench --quick``, the thin scripts under benchmarks/."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.bench.decode import main as decode_main
from surgery_edge.bench.engine import run_engine_bench
from surgery_edge.bench.flops import (
    adapter_flops,
    backbone_flops,
    one_expert_bytes,
    task_classes,
    workload_flops,
)
from surgery_edge.bench.ratios import derive_ratios
from surgery_edge.bench.report import merge_previous, write_outputs
from surgery_edge.bench.workloads import CONFIG_MODES, CONFIGS, DTYPES, EngineBenchConfig
from surgery_edge.models import get_arch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def results():
    config = EngineBenchConfig(
        archs=("tiny-vit-32",),
        batches=(2,),
        paths=("eager", "fused"),
        device="cpu",
        rank=16,
        rank_v2=4,  # a tiny width makes rank-16 V2 adapters ~20% of the backbone
        warmup=1,
        iters=2,
        min_iters=1,
    )
    return config, run_engine_bench(config)


def test_every_configuration_is_measured_eagerly(results):
    config, rows = results
    eager = {(r.config, r.mode) for r in rows if r.path == "eager" and r.status == "ok"}
    assert eager == {(c, m) for c in CONFIGS for m in CONFIG_MODES[c]}
    for r in rows:
        assert r.arch == "tiny-vit-32" and r.batch == 2 and r.dtype == "fp32"
        if r.path == "fused":  # engines only, and never timed on the CPU
            assert r.config in ("surgery", "surgeryv2")
            assert r.status == "unavailable" and "CUDA" in r.reason
            continue
        assert r.median_ms > 0 and r.p90_ms >= r.median_ms and r.iters >= 1
        assert r.answers_per_call == (2 * 8 if r.mode == "all-tasks" else 2)
        assert r.answers_per_s == pytest.approx(r.answers_per_call / (r.median_ms * 1e-3))
        assert r.tflops == pytest.approx(r.flops_per_call / (r.median_ms * 1e-3) / 1e12)
        assert r.peak_fraction is None and r.peak_mem_bytes is None  # CPU
        assert r.timer == "perf_counter"


def test_weight_bytes(results):
    config, rows = results
    arch = get_arch("tiny-vit-32")
    one = one_expert_bytes(arch, DTYPES["fp32"], task_classes(arch, 8)[0])
    held = {r.config: r.weight_bytes for r in rows}
    assert held["experts"] / one == pytest.approx(8.0, rel=0.02)
    for engine in ("merged", "surgery", "surgeryv2"):
        assert held[engine] <= 1.1 * one, engine
    derived = derive_ratios(rows, one)
    assert derived["weight_ratio_vs_one_expert"]["experts"] == pytest.approx(8.0, rel=0.02)
    assert [x["batch"] for x in derived["v1_all_tasks_throughput_over_experts"]] == [2]


def test_flops_by_hand():
    # micro-vit-16: 16 px, 8-px patches -> P = 4, N = 5; d = 32, m = 64, L = 2, e = 24
    arch = get_arch("micro-vit-16")
    patch_embed = 2 * 4 * (3 * 8 * 8) * 32  # 49,152
    block = 2 * 5 * (4 * 32 * 32 + 2 * 32 * 64) + 2 * 2 * 5 * 5 * 32  # 81,920 + 3,200
    backbone = patch_embed + 2 * block + 2 * 32 * 24
    assert backbone == 220_928 == backbone_flops(arch)
    v2_adapters = 2 * (4 * 2 * 32 * 5) + 4 * 2 * 24  # rank 2: two block sites, then final
    assert adapter_flops(arch, "surgeryv2", 2) == v2_adapters
    heads = [2 * 24 * c for c in (10, 6)]
    assert workload_flops(arch, "surgeryv2", "routed", [0, 1, 1], [10, 6], 2) == (
        3 * (backbone + v2_adapters) + heads[0] + 2 * heads[1]
    )
    assert workload_flops(arch, "experts", "all-tasks", [0, 0], [10, 6], 2) == 2 * (
        2 * backbone + sum(heads)
    )
    assert workload_flops(arch, "surgery", "all-tasks", [0], [10, 6], 2) == (
        backbone + 2 * 4 * 2 * 24 + sum(heads)
    )
    # the published profile numbers (GFLOPs per image at 224 px)
    assert backbone_flops(get_arch("ViT-B-32")) / 1e9 == pytest.approx(8.82, rel=0.01)
    assert backbone_flops(get_arch("ViT-L-14")) / 1e9 == pytest.approx(162.03, rel=0.01)


def test_outputs(results, tmp_path):
    config, rows = results
    written = write_outputs(config, rows, tmp_path, "bench_engine.main test", plots=False)
    record = json.loads((tmp_path / "engine-tiny-vit-32.json").read_text())
    assert record["note"] == "random weights: timing only"
    assert record["command"] == "bench_engine.main test"
    assert record["device"] == "cpu" and record["torch"]
    assert len(record["results"]) == len(rows)
    assert set(record["derived"]) >= {
        "weight_ratio_vs_one_expert",
        "v1_all_tasks_throughput_over_experts",
        "v2_batch1_latency_over_experts",
        "v2_routed_overhead_over_merged",
    }
    assert "| experts | all-tasks | eager | 2 |" in (tmp_path / "engine-tiny-vit-32.md").read_text()
    assert len(written) == 2


def test_merge_keeps_earlier_rows(results, tmp_path):
    config, rows = results
    write_outputs(config, rows, tmp_path, "first", plots=False)
    again = [r for r in rows if r.config == "merged"]
    write_outputs(config, again, tmp_path, "second", plots=False, merge=True)
    record = json.loads((tmp_path / "engine-tiny-vit-32.json").read_text())
    assert len(record["results"]) == len(rows)
    assert [run["command"] for run in record["runs"]] == ["first", "second"]


def test_decode_benchmark_writes_its_result(tmp_path):
    out = tmp_path / "decode.json"
    args = ["--images", "12", "--width", "40", "--height", "30", "--size", "16", "--out", str(out)]
    result = decode_main(args)
    saved = json.loads(out.read_text())
    assert saved == result and saved["images"] == 12
    assert saved["cache_mb"] == round(12 * 16 * 16 * 3 / 1e6, 1) and saved["images_per_s"] > 0


def test_merge_reads_the_stored_cpu_results(results, tmp_path):
    stored = BENCHMARKS / "results" / "cpu" / "engine-tiny-vit-32.json"
    old = json.loads(stored.read_text())
    path = shutil.copy(stored, tmp_path / stored.name)
    config, rows = results  # batch 2: none of the stored rows is measured again
    merged, runs = merge_previous(Path(path), rows, old["device_name"], "fp32")
    assert len(merged) == len(old["results"]) + len(rows)
    assert [run["command"] for run in runs] == [run["command"] for run in old["runs"]]
    assert {r.batch for r in merged} == {1, 2, 8, 32}


def test_bench_quick_through_the_cli(tmp_path):
    r = CliRunner().invoke(app, ["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "engine-micro-vit-16.json").read_text())
    assert (tmp_path / "engine-micro-vit-16.md").is_file()
    assert not list(tmp_path.glob("*.png"))  # --quick writes no plots
    assert record["command"] == f"surgery-edge bench --quick --device cpu --out {tmp_path}"
    measured = {
        (r["config"], r["mode"], r["path"], r["batch"])
        for r in record["results"]
        if r["status"] == "ok"
    }
    for config in CONFIGS:
        for mode in CONFIG_MODES[config]:
            paths = ["eager"] if config == "experts" else ["eager", "onnxruntime"]
            for path in paths:
                for batch in (1, 4):
                    assert (config, mode, path, batch) in measured
    onnx = [r for r in record["results"] if r["path"] == "onnxruntime"]
    assert all(r["max_abs_err_vs_eager"] < 1e-4 for r in onnx)


def test_bench_help_lists_the_benchmark_options():
    r = CliRunner().invoke(app, ["bench", "--help"])
    assert r.exit_code == 0, r.output
    assert "usage: surgery-edge bench" in r.output
    for option in ("--quick", "--archs", "--batches", "--paths", "--merge", "--out"):
        assert option in r.output


@pytest.mark.parametrize(
    "script", ["bench_engine", "bench_kernels", "bench_training", "bench_decode", "onnx_sizes"]
)
def test_scripts_are_entry_points(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / f"{script}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_importing_the_benchmarks_is_lean():
    modules = ["engine", "kernels", "training", "decode", "onnx_sizes", "plots", "report"]
    code = (
        "import sys, torch\n"
        + "".join(f"import surgery_edge.bench.{m}\n" for m in modules)
        + "heavy = [m for m in ('triton', 'matplotlib', 'onnxruntime') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

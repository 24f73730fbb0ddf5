"""The benchmarks (surgery_edge.bench): the engine benchmark's configurations and baselines,
interleaved timing, ratios against their ceilings, incremental writes, peak memory in its own
process, FLOPs and bytes, ``surgery-edge bench --quick``, the thin scripts under benchmarks/."""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.bench import engine as engine_bench
from surgery_edge.bench.choices import BASELINES, CONFIGS, ONE_GRAPH
from surgery_edge.bench.decode import main as decode_main
from surgery_edge.bench.engine import run_engine_bench
from surgery_edge.bench.engine_memory import memory_specs
from surgery_edge.bench.flops import (
    adapter_flops,
    backbone_flops,
    one_expert_bytes,
    task_classes,
    workload_bytes,
    workload_flops,
)
from surgery_edge.bench.memory import MemorySpec, run_children
from surgery_edge.bench.ratios import (
    BEST_VS_BEST,
    SAME_RUNTIME,
    ceilings,
    compare,
    derive_ratios,
)
from surgery_edge.bench.report import Previous, read_previous, write_outputs
from surgery_edge.bench.roofline import DeviceRates
from surgery_edge.bench.runners import Workload
from surgery_edge.bench.workloads import (
    CONFIG_MODES,
    DTYPES,
    EngineBenchConfig,
    EngineResult,
    Inputs,
    Parts,
    build_all,
    vmappable_attention,
)
from surgery_edge.models import get_arch
from surgery_edge.surgery.methods import SURGERY_METHODS

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
ARCH = "micro-vit-16"


@pytest.fixture(scope="module")
def results():
    config = EngineBenchConfig(
        archs=(ARCH,),
        batches=(2,),
        paths=("eager", "fused"),
        device="cpu",
        rank=4,
        rounds=3,
        block_seconds=0.002,
        threads=2,  # two concurrent experts, one intra-op thread each
        memory_paths=(),
    )
    snapshots = []
    rows = run_engine_bench(config, on_group=lambda rows: snapshots.append(len(rows)))
    return config, rows, snapshots


def test_every_configuration_is_measured_eagerly(results):
    config, rows, _ = results
    eager = {(r.config, r.mode) for r in rows if r.path == "eager" and r.status == "ok"}
    # the experts as one graph are an exported engine: ONNX Runtime and TensorRT only
    assert eager == {(c, m) for c in CONFIGS for m in CONFIG_MODES[c] if c != ONE_GRAPH}
    assert not [r for r in rows if r.config == ONE_GRAPH]
    for r in rows:
        assert r.arch == ARCH and r.batch == 2 and r.dtype == "fp32"
        if r.path == "fused":  # engines only, and never timed on the CPU
            assert r.config in ("surgery", "surgeryv2")
            assert r.status == "unavailable" and "CUDA" in r.reason
            continue
        assert r.rounds == 3 and r.calls_per_block >= 1 and r.timer == "torch.utils.benchmark"
        assert r.q1_ms <= r.median_ms <= r.q3_ms
        answers = 2 if r.mode == "routed" or r.config == "one-expert" else 2 * 8
        assert r.answers_per_call == answers
        assert r.answers_per_s == pytest.approx(r.answers_per_call / (r.median_ms * 1e-3))
        assert r.tflops == pytest.approx(r.flops_per_call / (r.median_ms * 1e-3) / 1e12)
        assert r.peak_fraction is None and r.load_avg_1m is not None
        concurrent = r.config == "experts-concurrent"
        assert (r.threads, r.workers) == ((1, 2) if concurrent else (2, 1))


def test_the_baselines_compute_the_experts_outputs(results):
    _, rows, _ = results
    checked = [r for r in rows if r.config in ("experts-concurrent", "experts-vmap")]
    assert checked and all(r.status == "ok" for r in checked)
    for r in checked:  # against the sequential experts' eager output
        assert r.max_abs_err_vs_eager is not None and r.max_abs_err_vs_eager < 1e-5, r


def test_results_are_handed_over_after_every_group(results):
    _, rows, snapshots = results
    # two groups (all-tasks, routed), then the memory pass: each hands over the rows so far
    assert snapshots[0] < snapshots[1] == snapshots[2] == len(rows)


def test_weight_bytes(results):
    _, rows, _ = results
    arch = get_arch(ARCH)
    one = one_expert_bytes(arch, DTYPES["fp32"], task_classes(arch, 8)[0])
    held = {r.config: r.weight_bytes for r in rows}
    for baseline in (b for b in BASELINES if b != ONE_GRAPH):  # no eager one graph
        assert held[baseline] / one == pytest.approx(8.0, rel=0.05), baseline
    assert held["one-expert"] == pytest.approx(one, rel=0.05)
    for engine in ("merged", "surgery"):
        assert held[engine] <= 1.2 * one, engine
    derived = derive_ratios(rows, one)
    assert derived["weight_ratio_vs_one_expert"]["experts"] == pytest.approx(8.0, rel=0.05)


def test_flops_and_bytes_by_hand():
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
    for baseline in BASELINES:  # every baseline does the eight experts' work
        assert workload_flops(arch, baseline, "all-tasks", [0, 0], [10, 6], 2) == 2 * (
            2 * backbone + sum(heads)
        )
    assert workload_flops(arch, "one-expert", "all-tasks", [0, 0], [10, 6], 2) == 2 * (
        backbone + heads[0]
    )
    assert workload_flops(arch, "surgery", "all-tasks", [0], [10, 6], 2) == (
        backbone + 2 * 4 * 2 * 24 + sum(heads)
    )
    # bytes: weights once, images in, logits out; routed experts read only their tasks' weights
    image = 3 * 16 * 16 * 4
    assert workload_bytes(arch, "merged", "all-tasks", [0, 0], [10, 6], 1000, 4) == (
        1000 + 2 * image + 2 * 16 * 4
    )
    assert workload_bytes(arch, "experts", "routed", [1, 1], [10, 6], 1000, 4) == (
        500 + 2 * image + 2 * 6 * 4
    )
    # the published profile numbers (GFLOPs per image at 224 px)
    assert backbone_flops(get_arch("ViT-B-32")) / 1e9 == pytest.approx(8.82, rel=0.01)
    assert backbone_flops(get_arch("ViT-L-14")) / 1e9 == pytest.approx(162.03, rel=0.01)


# FlopCounterMode counts matmuls, convolutions and SDPA at the dispatcher; so does the formula
# (LayerNorm, softmax, GELU, bias adds and the residuals are in neither). MultiheadAttention's
# inference fast path is one fused op the counter has no formula for, so the count is taken
# with it off and SDPA on its math backend (matmuls): the same arithmetic.
STACKED_HEADS = {"experts-vmap", "merged", *SURGERY_METHODS}  # heads padded to the most classes


def _padding_flops(arch, config, mode, ids, classes) -> int:
    """What stacked heads compute beyond the formula, which counts each task's own classes:
    every head at the largest class count (the padded logits are -inf or cut off)."""
    if config not in STACKED_HEADS:
        return 0
    most, e = max(classes), arch.embed_dim
    if mode == "routed":
        return sum(2 * e * (most - classes[t]) for t in ids)
    return len(ids) * 2 * e * (len(classes) * most - sum(classes))


@pytest.mark.parametrize("arch_name", ["micro-vit-16", "tiny-vit-32"])  # tiny: the demo's width
def test_flops_formula_matches_flop_counter_mode(arch_name):
    from torch.utils.flop_counter import FlopCounterMode

    arch, cpu, num_tasks, rank = get_arch(arch_name), torch.device("cpu"), 3, 4
    parts = Parts.random(arch, num_tasks, 0)
    models = build_all(parts, CONFIGS, dict.fromkeys(SURGERY_METHODS, rank), cpu, torch.float32)
    bench = SimpleNamespace(arch=arch, device=cpu)
    x = Inputs.make(arch, 3, num_tasks, cpu, torch.float32)  # one image per task
    ids, classes = x.task_ids.tolist(), task_classes(arch, num_tasks)
    for config in CONFIGS:
        if config == "experts-concurrent":  # the experts' modules and work, run from threads the
            continue  # counter (thread-local) does not see; the formula says the same as experts'
        for mode in CONFIG_MODES[config]:
            call = Workload(bench, models[config], config, mode, rank).call()
            with torch.inference_mode(), vmappable_attention():
                with FlopCounterMode(display=False) as counter:
                    call(x)
            formula = workload_flops(arch, config, mode, ids, classes, rank)
            padding = _padding_flops(arch, config, mode, ids, classes)
            assert counter.get_total_flops() == formula + padding, (config, mode)


def _row(config, path, median, mode="all-tasks", batch=1, flops=8, nbytes=8, answers=8):
    return EngineResult(
        arch=ARCH, config=config, mode=mode, path=path, batch=batch, status="ok", reason=None,
        dtype="fp32", rank=None, timer="t", rounds=5, calls_per_block=1, median_ms=median,
        q1_ms=median, q3_ms=median, answers_per_call=answers, answers_per_s=answers / median,
        flops_per_call=flops, bytes_per_call=nbytes, tflops=None, peak_fraction=None,
        weight_bytes=nbytes, threads=1, workers=1, load_avg_1m=0.0, setup_s=None,
        max_abs_err_vs_eager=None,
    )  # fmt: skip


def test_ratios_are_same_runtime_or_best_vs_best_beside_their_ceilings():
    rows = [
        # eight experts: 8 units of work and 8 of weights; the engine: 1 and 1.05
        _row("experts", "eager", 100.0, flops=80, nbytes=80),
        _row("experts-vmap", "eager", 60.0, flops=80, nbytes=80),
        _row("experts", "onnxruntime", 40.0, flops=80, nbytes=80),
        _row("one-expert", "eager", 5.0, flops=10, nbytes=10, answers=1),
        _row("one-expert", "onnxruntime", 4.5, flops=10, nbytes=10, answers=1),
        _row("surgery", "eager", 6.0, flops=10, nbytes=10.5),
        _row("surgery", "onnxruntime", 6.0, flops=10, nbytes=10.5),
        _row(ONE_GRAPH, "onnxruntime", 30.0, flops=80, nbytes=80),
    ]
    derived = derive_ratios(rows, one_expert=10)
    v1 = derived["vs_experts"]["surgery"]["all-tasks"]
    same = {
        x["engine_path"]: x for x in v1 if x["kind"] == SAME_RUNTIME and x["baseline"] != ONE_GRAPH
    }
    # the experts as one graph: a row of its own beside the eight models on the same runtime
    (graph,) = [x for x in v1 if x["baseline"] == ONE_GRAPH]
    assert (graph["kind"], graph["engine_path"], graph["baseline_path"]) == (
        SAME_RUNTIME,
        "onnxruntime",
        "onnxruntime",
    )
    assert graph["speedup"] == pytest.approx(30 / 6) and not graph["above_ceiling"]
    # never one runtime against another: eager against the fastest eager baseline (vmap)
    assert same["eager"]["baseline"] == "experts-vmap" and same["eager"]["baseline_path"] == "eager"
    assert same["eager"]["speedup"] == pytest.approx(10.0)
    assert same["onnxruntime"]["baseline_path"] == "onnxruntime"
    assert same["onnxruntime"]["speedup"] == pytest.approx(40 / 6)
    assert (
        same["eager"]["ceiling"] == pytest.approx(8.0) and same["eager"]["ceiling_basis"] == "FLOPs"
    )
    # 10x is above the 8x ceiling: the vmapped experts ran 60 / (8 x 5) = 1.5x slower than
    # eight times one expert alone, and against that the engine is 10 / 1.5 = 6.7x: explained
    assert same["eager"]["above_ceiling"] and same["eager"]["explained"]
    assert same["eager"]["penalty"]["value"] == pytest.approx(1.5)
    assert not same["onnxruntime"]["above_ceiling"]
    (best,) = [x for x in v1 if x["kind"] == BEST_VS_BEST]
    assert (best["baseline"], best["baseline_path"]) == ("experts", "onnxruntime")
    assert best["speedup"] == pytest.approx(40 / 6)
    assert derived["above_ceiling"] == [same["eager"]]


def test_an_unexplained_ratio_is_flagged_in_the_report(tmp_path):
    rows = [
        _row("experts", "eager", 100.0, flops=80, nbytes=80),
        _row("one-expert", "eager", 12.5, flops=10, nbytes=10, answers=1),  # 8 x 12.5 = 100 ms
        _row("surgery", "eager", 5.0, flops=10, nbytes=10),  # 20x against an 8x ceiling
    ]
    derived = derive_ratios(rows, one_expert=10)
    (flag,) = derived["above_ceiling"]
    assert flag["speedup"] == pytest.approx(20.0) and flag["explained"] is False
    config = EngineBenchConfig(archs=(ARCH,), batches=(1,))
    write_outputs(config, rows, tmp_path, "cmd", plots=False, quiet=True)
    md = (tmp_path / f"engine-{ARCH}.md").read_text()
    assert "above ceiling, even against the experts one at a time: do not cite" in md
    record = json.loads((tmp_path / f"engine-{ARCH}.json").read_text())
    assert any("exceed their ceiling" in w for w in record["warnings"])


def test_roofline_ceiling_knows_which_bound_applies():
    rates = DeviceRates(matmul_flops_per_s=100.0, copy_bytes_per_s=10.0, dtype="fp32", how="")
    engine = _row("surgery", "eager", 1.0, flops=100, nbytes=10)  # 1 s by both bounds
    baseline = _row("experts", "eager", 1.0, flops=800, nbytes=20)  # 8 s of FLOPs, 2 of bytes
    c = ceilings(engine, baseline, rates)
    assert c["ceiling"] == pytest.approx(8.0) and c["roofline_ceiling"] == pytest.approx(8.0)
    baseline = _row("experts", "eager", 1.0, flops=200, nbytes=80)  # 2 s of FLOPs, 8 of bytes
    c = ceilings(engine, baseline, rates)
    assert c["ceiling_basis"] == "bytes" and c["roofline_ceiling"] == pytest.approx(8.0)
    # beating the roofline ceiling is flagged even under the FLOPs/bytes one: 6x against 4x
    engine = _row("surgery", "eager", 1.0, flops=100, nbytes=20)  # 2 s of bytes
    baseline = _row("experts", "eager", 6.0, flops=800, nbytes=80)  # 8 s: ceiling 8x, roof 4x
    row = compare([engine, baseline], engine, baseline, SAME_RUNTIME, rates)
    assert row["ceiling"] == pytest.approx(8.0) and row["roofline_ceiling"] == pytest.approx(4.0)
    assert row["speedup"] == pytest.approx(6.0) and row["above_ceiling"]
    assert not compare([engine, baseline], engine, baseline, SAME_RUNTIME, None)["above_ceiling"]


def test_a_routed_engine_faster_than_the_merged_backbone_is_flagged(tmp_path):
    rows = [
        _row("merged", "eager", 10.0, flops=100, nbytes=10, mode="routed"),
        _row("surgeryv2", "eager", 8.0, flops=110, nbytes=11, mode="routed"),  # floor: 1.1x
    ]
    (row,) = [x for x in derive_ratios(rows, one_expert=10)["routed_overhead_over_merged"]["rows"]
              ["surgeryv2"] if x["kind"] == SAME_RUNTIME]  # fmt: skip
    assert row["overhead"] == pytest.approx(-0.2) and row["below_floor"]
    config = EngineBenchConfig(archs=(ARCH,), batches=(1,))
    write_outputs(config, rows, tmp_path, "cmd", plots=False, quiet=True)
    assert "below its floor: do not cite" in (tmp_path / f"engine-{ARCH}.md").read_text()


def test_outputs(results, tmp_path):
    config, rows, _ = results
    written = write_outputs(config, rows, tmp_path, "bench_engine.main test", plots=False)
    record = json.loads((tmp_path / f"engine-{ARCH}.json").read_text())
    assert record["note"] == "random weights: timing only" and record["complete"] is True
    assert record["command"] == "bench_engine.main test"
    assert record["device"] == "cpu" and record["torch"] and record["cpu_load_avg"]
    assert record["torch_threads"] >= 1 and "L2" in record["caches"]
    assert len(record["results"]) == len(rows)
    assert set(record["derived"]) >= {
        "weight_ratio_vs_one_expert",
        "vs_experts",
        "routed_overhead_over_merged",
        "eight_expert_penalty",
        "above_ceiling",
    }
    md = (tmp_path / f"engine-{ARCH}.md").read_text()
    assert "    bench_engine.main test" in md  # the command, to re-run on a quiet machine
    for section in ("## Headline", "## Same-runtime ratios", "What eight sets of weights cost"):
        assert section in md
    assert "| experts | all-tasks | eager | 2 |" in md
    assert len(written) == 2


def test_merge_keeps_earlier_rows(results, tmp_path):
    config, rows, _ = results
    write_outputs(config, rows, tmp_path, "first", plots=False, quiet=True)
    again = [r for r in rows if r.config == "merged"]
    previous = Previous.read(tmp_path, config)
    for complete in (False, True):  # incremental writes do not merge with themselves
        write_outputs(
            config, again, tmp_path, "second", previous, plots=False, complete=complete, quiet=True
        )
    record = json.loads((tmp_path / f"engine-{ARCH}.json").read_text())
    assert len(record["results"]) == len(rows)
    assert [run["command"] for run in record["runs"]] == ["first", "second"]


def test_a_spent_budget_skips_the_rest(tmp_path):
    config = EngineBenchConfig(
        archs=(ARCH,), batches=(1,), paths=("eager",), modes=("all-tasks",),
        configs=("merged", "surgery"), budget_s=0.0, memory_paths=("eager",),
    )  # fmt: skip
    rows = run_engine_bench(config)
    assert rows and all(r.status == "skipped" and "budget" in r.reason for r in rows)
    assert all(r.peak_mem_bytes is None for r in rows)


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    real = engine_bench._ArchRun.bench_group
    calls = []

    def interrupt_second(self, works, batch, paths, deadline):
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, works, batch, paths, deadline)

    monkeypatch.setattr(engine_bench._ArchRun, "bench_group", interrupt_second)
    args = ["bench", "--device", "cpu", "--arch", ARCH, "--batch", "1", "--path", "eager"]
    args += ["--config", "merged", "--config", "surgery", "--rounds", "2"]
    args += ["--block-seconds", "0.001", "--no-memory", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 130, r.output
    assert f"the groups measured so far are in {tmp_path}" in r.stderr
    record = json.loads((tmp_path / f"engine-{ARCH}.json").read_text())
    assert record["complete"] is False
    assert {(r["config"], r["mode"]) for r in record["results"]} == {
        ("merged", "all-tasks"),
        ("surgery", "all-tasks"),
    }
    assert all(r["status"] == "ok" for r in record["results"])


def test_groups_run_in_the_order_the_targets_need():
    # every all-tasks group (the speedups), then routed at the overhead batch, then the rest
    order = engine_bench.group_order((128, 64, 1), ("all-tasks", "routed"), 64)
    assert order == [
        (128, "all-tasks"), (64, "all-tasks"), (1, "all-tasks"),
        (64, "routed"), (128, "routed"), (1, "routed"),
    ]  # fmt: skip
    assert engine_bench.group_order((1, 8), ("routed",), 64) == [(1, "routed"), (8, "routed")]


def _budgeted(**fields) -> EngineBenchConfig:
    base = dict(
        archs=(ARCH,), batches=(1,), modes=("all-tasks",), configs=("experts", "merged"),
        device="cpu", num_tasks=2, rounds=1, block_seconds=0.001, memory_paths=(),
        budget_s=600.0, compile_backend="eager",
    )  # fmt: skip
    return EngineBenchConfig(**{**base, **fields})


def test_compile_runs_last_in_its_share_and_says_what_did_not_fit(monkeypatch):
    real = engine_bench._ArchRun.prepare

    def slow_first_compile(self, work, path, batch, x, references, reference):
        status = real(self, work, path, batch, x, references, reference)
        if path == "compile" and not self.compile_seconds:  # as if it took 10 minutes
            fn, _, err = status
            return fn, 600.0, err
        return status

    monkeypatch.setattr(engine_bench._ArchRun, "prepare", slow_first_compile)
    config = _budgeted(configs=("experts", "one-expert", "merged"), paths=("eager", "compile"))
    snapshots = []
    rows = run_engine_bench(config, on_group=lambda rows: snapshots.append(list(rows)))
    # the eager group first, on its own; then compile: the experts' encoder (compiled once,
    # reused by one expert alone at the same shape), and no time left for the merged model
    assert [r.path for r in snapshots[0]] == ["eager"] * 3
    compile_rows = {r.config: r for r in rows if r.path == "compile"}
    assert compile_rows["experts"].status == compile_rows["one-expert"].status == "ok"
    merged = compile_rows["merged"]
    assert merged.status == "skipped" and merged.reason.startswith("compile: not measured (budget)")
    assert "a compile here took 600 s" in merged.reason


def test_a_contestant_not_prepared_in_time_is_recorded_and_the_others_timed(monkeypatch):
    real = engine_bench._ArchRun.prepare

    def budget_spent_after_first(self, work, path, batch, x, references, reference):
        status = real(self, work, path, batch, x, references, reference)
        # the budget runs out during the group
        monkeypatch.setattr(engine_bench._ArchRun, "over_budget", lambda self, deadline=0: True)
        return status

    monkeypatch.setattr(engine_bench._ArchRun, "prepare", budget_spent_after_first)
    rows = run_engine_bench(_budgeted(paths=("eager",)))
    status = {r.config: (r.status, r.reason) for r in rows}
    assert status["experts"] == ("ok", None)  # prepared in time: timed
    assert status["merged"] == ("skipped", "the time budget of 600 s was spent")


def test_a_sigterm_records_the_group_in_progress(monkeypatch):
    real = engine_bench._ArchRun.prepare
    calls = []

    def stopped_at_the_fourth(self, work, path, batch, x, references, reference):
        calls.append((work.config, batch))
        if len(calls) == 4:  # the second group's second contestant: the step's slot ends
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, work, path, batch, x, references, reference)

    monkeypatch.setattr(engine_bench._ArchRun, "prepare", stopped_at_the_fourth)
    handler = signal.getsignal(signal.SIGTERM)
    snapshots = []
    with pytest.raises(engine_bench.Stopped):
        run_engine_bench(
            _budgeted(batches=(1, 2), paths=("eager",)),
            on_group=lambda rows: snapshots.append(list(rows)),
        )
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    first, second = snapshots[-1][:2], snapshots[-1][2:]
    assert [(r.batch, r.status) for r in first] == [(1, "ok"), (1, "ok")]
    assert [(r.config, r.batch, r.status) for r in second] == [
        ("experts", 2, "skipped"),
        ("merged", 2, "skipped"),
    ]
    assert second[0].reason == "prepared, not timed: stopped by SIGTERM"
    assert second[1].reason.startswith("preparation: not measured (stopped after")


def test_peak_memory_is_measured_in_a_process_of_its_own():
    spec = MemorySpec(
        arch=ARCH, config="experts", mode="all-tasks", path="eager", batches=(1, 16),
        device="cpu", dtype="fp32", num_tasks=8, rank=4, threads=1, seed=0,
    )  # fmt: skip
    broken = dataclasses.replace(spec, arch="no-such-arch")
    good, bad = run_children([spec, broken], jobs=2)
    assert good["status"] == "ok" and good["kind"] == "rss", good
    peaks = [b["peak_bytes"] for b in good["batches"]]
    assert [b["batch"] for b in good["batches"]] == [1, 16]
    assert peaks[0] <= peaks[1] and good["held_bytes"] > good["baseline_bytes"]
    assert bad["status"] == "failed" and "no-such-arch" in bad["reason"]


def test_each_timed_combination_gets_a_memory_process_with_its_engines():
    measured = ("experts", "one-expert", "merged")
    config = EngineBenchConfig(device="cpu", num_tasks=3, memory_configs=measured)
    cpu, folder = torch.device("cpu"), Path("/x")
    bench = SimpleNamespace(arch=get_arch(ARCH), device=cpu, threads=2, folder=folder)
    configs = (*measured, "surgery")  # not among memory_configs
    works = [SimpleNamespace(config=c, mode="routed", rank=4, workers=3) for c in configs]
    results = [SimpleNamespace(status="ok", arch=ARCH, config=c, mode="routed", path=p, batch=b)
               for c in configs for p in ("eager", "onnxruntime") for b in (8, 1)
               if (c, p) != ("merged", "eager")]  # fmt: skip
    specs = {(s.config, s.path): s for s in memory_specs(config, bench, works, results)}
    assert set(specs) == {(c, p) for c in measured for p in ("eager", "onnxruntime")} - {
        ("merged", "eager")  # not timed: nothing to measure
    }
    eager, experts = specs[("experts", "eager")], specs[("experts", "onnxruntime")]
    assert eager.batches == (1, 8) and eager.threads == 2 and eager.onnx_files == ()
    assert experts.onnx_files == tuple(f"/x/expert-{t}.onnx" for t in range(3))
    assert (experts.concurrent_workers, eager.concurrent_workers) == (3, 1)
    assert specs[("one-expert", "onnxruntime")].onnx_files == ("/x/expert-0.onnx",)
    assert specs[("merged", "onnxruntime")].onnx_files == ("/x/merged-routed.onnx",)
    on_gpu = SimpleNamespace(**{**vars(bench), "device": torch.device("cuda")})
    assert {s.path for s in memory_specs(config, on_gpu, works, results)} == {"eager"}


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
    rows, runs = read_previous(Path(path), old["device_name"], "fp32")
    assert len(rows) == len(old["results"]) and runs
    # every baseline is in the stored results (the one graph came after the record)
    assert {r.config for r in rows} >= set(CONFIGS) - {ONE_GRAPH}
    assert {r.path for r in rows if r.status == "ok"} >= {"eager", "compile", "onnxruntime"}


def test_bench_quick_through_the_cli(tmp_path):
    configs = ["experts", "experts-concurrent", "one-expert", "surgeryv2", ONE_GRAPH]
    args = ["bench", "--quick", "--device", "cpu", *(w for c in configs for w in ("--config", c))]
    args += ["--num-tasks", "2", "--memory-path", "eager", "--memory-path", "onnxruntime"]
    args += ["--memory-config", "one-expert", "--threads", "2", "--out", str(tmp_path), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / f"engine-{ARCH}.json").read_text())
    assert json.loads(r.stdout)["records"] == [record]  # --json: stdout is the record
    assert (tmp_path / f"engine-{ARCH}.md").is_file()
    assert not list(tmp_path.glob("*.png"))  # --quick writes no plots
    assert record["command"] == "surgery-edge " + " ".join(args)  # the options in declared order
    ok = {
        (r["config"], r["mode"], r["path"], r["batch"]): r
        for r in record["results"]
        if r["status"] == "ok"
    }
    for config in ("experts", "experts-concurrent", "one-expert", "surgeryv2"):
        for mode in CONFIG_MODES[config]:
            for path in ("eager", "onnxruntime"):  # the experts run on ONNX Runtime too
                for batch in (1, 4):
                    assert (config, mode, path, batch) in ok
    for batch in (1, 4):  # the experts as one graph: ONNX Runtime only, the experts' answers
        graph = ok[(ONE_GRAPH, "all-tasks", "onnxruntime", batch)]
        assert graph["answers_per_call"] == 2 * batch and graph["max_abs_err_vs_eager"] < 1e-5
    assert not [k for k in ok if k[0] == ONE_GRAPH and k[2] != "onnxruntime"]
    onnx = [r for r in ok.values() if r["path"] == "onnxruntime"]
    assert all(r["max_abs_err_vs_eager"] < 1e-4 for r in onnx)
    memory = [r for r in ok.values() if r["config"] == "one-expert"]
    assert all(r["peak_mem_bytes"] > 0 and r["peak_mem_kind"] == "rss" for r in memory)
    assert record["derived"]["vs_experts"]["surgeryv2"]["routed"]


def test_the_onnx_memory_process_imports_no_torch(tmp_path):
    import torch

    from surgery_edge.bench.workloads import Parts, build_all, expert_as_engine
    from surgery_edge.export.onnx import export_onnx

    parts = Parts.random(get_arch(ARCH), 2, 0)
    experts = build_all(parts, ["experts"], {}, torch.device("cpu"), torch.float32)["experts"]
    path = tmp_path / "expert.onnx"
    export_onnx(expert_as_engine("task0", experts, 0, torch.float32), path, "all-tasks")
    spec = MemorySpec(
        arch=ARCH, config="one-expert", mode="all-tasks", path="onnxruntime", batches=(2,),
        device="cpu", dtype="fp32", num_tasks=2, rank=4, threads=1, seed=0,
        onnx_files=(str(path),),
    )  # fmt: skip
    (record,) = run_children([spec])
    assert record["status"] == "ok", record
    assert record["imported_torch"] is False and record["batches"][0]["peak_bytes"] > 0


def test_bench_help_lists_the_benchmark_options():
    r = CliRunner().invoke(app, ["bench", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "Usage: surgery-edge bench [OPTIONS]" in r.output
    for option in ("--quick", "--arch", "--batch", "--path", "--append", "--out", "--rounds"):
        assert option in r.output
    for option in ("--budget-s", "--memory-path", "--no-memory", "--threads", "--json"):
        assert option in r.output
    assert "--batches" not in r.output and "--merge" not in r.output  # old spellings: hidden


@pytest.mark.parametrize(
    "script",
    ["bench_engine", "bench_kernels", "bench_training", "bench_decode", "onnx_sizes", "replot"],
)
def test_scripts_are_entry_points(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / f"{script}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out.lower()


def test_importing_the_benchmarks_is_lean():
    modules = ["engine", "kernels", "training", "decode", "onnx_sizes", "plots", "report"]
    modules += ["memory", "roofline", "ratios", "gpu"]
    code = (
        "import sys, torch\n"
        + "".join(f"import surgery_edge.bench.{m}\n" for m in modules)
        + "heavy = [m for m in ('triton', 'matplotlib', 'onnxruntime') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_old_spellings_still_parse_for_one_release(capsys):
    from surgery_edge.cli.bench import new_spellings

    old = ["--archs", "a", "b", "--batches", "1", "8", "--merge", "--tasks=3", "--memory-paths"]
    assert new_spellings([*old, "--json"]) == [
        "--arch", "a", "--arch", "b", "--batch", "1", "--batch", "8", "--append",
        "--num-tasks=3", "--no-memory", "--json",
    ]  # fmt: skip
    notes = capsys.readouterr().err
    assert "note: --batches 1 8 is now --batch 1 --batch 8" in notes
    assert "note: --memory-paths is now --no-memory" in notes
    # click reads the rewritten options as the new ones
    command = typer.main.get_command(app).commands["bench"]
    given = ["--paths", "eager", "onnxruntime", "--configs", "merged", "--batch", "4"]
    params = command.make_context("bench", given).params
    assert [p.value for p in params["path"]] == ["eager", "onnxruntime"]
    assert [c.value for c in params["config"]] == ["merged"] and params["batch"] == [4]

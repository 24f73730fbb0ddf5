"""The quantize benchmark's pure parts (surgery_edge.bench.quantize): which recipe it picks per
precision, and how it checks issue 12's targets. The measuring itself needs a finished demo run
(benchmarks/results/cpu/quantize-tiny-vit-32.json records one)."""

from __future__ import annotations

from surgery_edge.bench.quantize import choose, markdown, targets


def _row(recipe, precision, size, agreement=None, ms8=10.0, per_task=None, **extra):
    per_task = per_task or {"a": 80.0, "b": 90.0}
    avg = sum(per_task.values()) / len(per_task)
    return {
        "recipe": recipe,
        "precision": precision,
        "bytes": size,
        "avg": avg,
        "delta_avg": round(avg - 85.0, 3),
        "delta_worst_task": min(per_task["a"] - 80.0, per_task["b"] - 90.0),
        "per_task": per_task,
        "ms_batch_1": 1.0,
        "ms_batch_8": ms8,
        "agreement_heldout_adapt": agreement,
        **extra,
    }


def test_int8_is_the_smallest_among_the_near_fastest_that_agree():
    rows = [
        _row("small but slow", "int8", 100, 99.5, ms8=20.0),
        _row("fast", "int8", 300, 99.5, ms8=10.0),
        _row("nearly as fast, smaller", "int8", 200, 99.5, ms8=10.9),
        _row("smallest, disagrees", "int8", 50, 98.0, ms8=5.0),
        {"recipe": "broken", "precision": "int8", "error": "ONNX Runtime cannot run it"},
        _row("fp8 close, smaller", "fp8", 120, 99.2),
        _row("fp8 best", "fp8", 150, 99.8),
    ]
    # the disagreeing recipe sets no bar: "fast" is the fastest that agrees, 10.9 is within 10%;
    # fp8 agreements within a point of the best are equal, then the smaller file wins
    assert choose(rows) == {"int8": "nearly as fast, smaller", "fp8": "fp8 close, smaller"}


def test_fp8_keeps_the_default_unless_a_recipe_agrees_clearly_more():
    rows = [_row("modelopt-fp8", "fp8", 200, 99.4), _row("other", "fp8", 100, 100.0)]
    assert choose(rows) == {"fp8": "modelopt-fp8"}  # 0.6 pt: a couple of held-out images
    rows[0]["agreement_heldout_adapt"] = 98.5  # below MIN_AGREEMENT
    assert choose(rows) == {"fp8": "other"}


def test_the_head_to_head_timing_decides_where_there_is_one():
    rows = [
        _row("fast alone", "int8", 300, 99.5, ms8=5.0, ms_batch_8_head_to_head=12.0),
        _row("small", "int8", 200, 99.5, ms8=11.0, ms_batch_8_head_to_head=10.0),
    ]
    # timed one after the other, "fast alone" looked twice as fast: head to head it is not
    assert choose(rows) == {"int8": "small"}


def test_a_recipe_the_gate_refuses_is_never_chosen():
    # the demo's record: ModelOpt int8 with the tables kept agreed on 99.32% on average but on
    # 97.66% of one task, so export would refuse it; the benchmark chose it before
    refused = "refused: The int8 engine agrees with the fp32 engine on 97.66% of task 'c'"
    rows = [
        _row("smallest, refused", "int8", 100, 99.3, ms8=10.0, gate=refused),
        _row("passes", "int8", 200, 99.6, ms8=10.0, gate="pass (worst task c: 99.22%)"),
        _row("fp8 refused", "fp8", 100, 99.9, gate=refused.replace("int8", "fp8")),
    ]
    assert choose(rows) == {"int8": "passes"}


def test_nothing_is_chosen_when_no_recipe_agrees():
    assert choose([_row("bad", "int8", 10, 90.0), _row("bad8", "fp8", 10, 97.0)]) == {}


def test_targets_read_fp16_and_the_int8_recipe_against_pytorch():
    engine = {
        "engine": "surgeryv2-routed",
        "pytorch": {"a": 80.0, "b": 90.0},
        "rows": [
            _row("fp32", "fp32", 1000),
            _row("fp16", "fp16", 500, per_task={"a": 80.0, "b": 90.2}),
            _row("ort-dynamic", "int8", 340, 99.5, ms8=5.0, per_task={"a": 77.5, "b": 90.5}),
        ],
    }
    t = targets(engine)
    assert t["int8_size_vs_fp32"] == 0.34
    assert t["latency_ms"]["int8"] == {"batch_1": 1.0, "batch_8": 5.0}
    assert t["fp16_avg_change"] == 0.1
    # task a lost 2.5 points: the average (-1.0) holds, every task does not
    assert t["met"] == {
        "fp16_avg": True,
        "fp16_every_task": True,
        "int8_avg": True,
        "int8_every_task": False,
        "int8_size": True,
    }
    record = {
        "arch": "tiny-vit-32",
        "run": "runs/demo",
        "command": "bench_quantize.py --run runs/demo",
        "threads": 1,
        "loadavg": "1.0 1.0 1.0",
        "environment": {},
        "min_agreement": 99.0,
        "targets": t,
        "engines": [{**engine, "mode": "routed", "choice": {"int8": "ort-dynamic"}}],
    }
    text = markdown(record)
    assert "0.340x the fp32 engine" in text and "'int8_every_task': False" in text


def test_head_to_head_times_every_engine_through_the_runtime(engines, run):
    from surgery_edge.bench.quantize import head_to_head
    from surgery_edge.evaluation.engine import split_images

    fp32 = engines["dir"] / "surgeryv2-routed.onnx"
    int8 = engines["dir"] / "surgeryv2-routed-int8.onnx"
    data = split_images(run.suite, run.tasks, "test", per_task=8)
    ms = head_to_head({"fp32": fp32, "int8": int8}, data, threads=1, rounds=2)
    assert set(ms) == {"fp32", "int8"} and all(v > 0 for v in ms.values())

"""Engine evaluation: accuracy through the runtime from the stored images, against PyTorch.

Uses the tiny run and the demo hook's engines (``engines`` in conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_checks import user_error
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.errors import ConfigError
from surgery_edge.evaluation.engine import TaskImages, engine_accuracy, split_images
from surgery_edge.runtime import load

runner = CliRunner()


def test_fp32_engine_scores_exactly_the_pytorch_row(engines, tiny_run):
    from surgery_edge.run.engine_eval import evaluate_engine

    report = evaluate_engine(engines["dir"] / "surgeryv2-routed.onnx", tiny_run[0])
    rows = json.loads(tiny_run[1].with_suffix(".json").read_text())["results"]
    row = next(r for r in rows if (r["method"], r["surgery"]) == ("task_arithmetic", "surgeryv2"))
    # the reference is the report's own row (same model, same images), and the fp32 engine
    # answers every image as PyTorch does
    assert report["pytorch"]["per_task"] == pytest.approx(row["per_task"], abs=1e-6)
    assert report["per_task"] == pytest.approx(row["per_task"], abs=1e-6)
    assert report["delta"]["avg"] == 0.0 and report["delta"]["worst_task"] == 0.0
    assert report["images"] == 48 and report["split"] == "test"
    assert report["bytes"] == (engines["dir"] / "surgeryv2-routed.onnx").stat().st_size
    latency = report["latency"]
    assert latency["backend"] == "onnxruntime-cpu"
    assert 0 < latency["batch_1"]["median_ms"] and 0 < latency["batch_8"]["median_ms"]


def test_accuracy_is_counted_from_the_runtime_answers(engines, run):
    predictor = load(engines["dir"] / "surgery-all-tasks.onnx", device="cpu")
    task = run.tasks[2]
    images = run.suite.task(task).test_x[:10]
    answers = [r[task].index for r in predictor.predict(list(images), task=task)]
    labels = np.array(answers)
    labels[:3] = (labels[:3] + 1) % 3  # three wrong labels -> 70%
    data = {t: TaskImages(images, labels) for t in run.tasks}
    assert engine_accuracy(predictor, data)[task] == pytest.approx(70.0)


def test_demo_hook_evaluates_every_engine(engines):
    report = engines["report"]["engines"]
    for name, engine in report.items():
        for key, entry in engine.items():
            if not key.startswith("onnx"):
                continue
            if "error" in entry:  # only the publishing gate may refuse one (micro model: ties)
                assert f"task '{entry['check']['worst_task']}'" in entry["error"], (name, key)
                assert not (engines["dir"] / f"{name}-{key.partition('-')[2]}.onnx").exists()
                continue
            evaluation = entry["evaluation"]
            assert set(evaluation["per_task"]) == set(evaluation["pytorch"]["per_task"])
            assert evaluation["precision"] == (key.partition("-")[2] or "fp32")
            assert {"batch_1", "batch_8"} <= set(evaluation["latency"])
        if "onnx" in engine:
            assert engine["onnx"]["evaluation"]["delta"]["avg"] == 0.0
    single = report["single-expert"]
    assert set(single) >= {"onnx", "onnx-fp16", "onnx-int8"}
    assert single["onnx"]["evaluation"]["source"] == {"expert": single["expert"]}
    v2 = report["surgeryv2-routed"]
    assert v2["onnx-int8"]["bytes_vs_expert_same_precision"] > 0


def test_report_table_has_accuracy_latency_and_change(engines, tmp_path):
    from surgery_edge.evaluation.report import engines_table

    lines = engines_table(engines["report"])
    header = next(ln for ln in lines if ln.startswith("| engine"))
    for column in ("accuracy (%)", "change (pt)", "ms @1", "ms @8", "x one expert"):
        assert column in header
    assert any("| surgeryv2-routed | onnx-int8 |" in ln for ln in lines)
    assert any("| single-expert | onnx-fp16 |" in ln for ln in lines)


def test_split_images_refuses_the_unlabelled_split(run):
    with pytest.raises(ConfigError, match="labelled split"):
        split_images(run.suite, run.tasks, "adapt")


# --- the command ------------------------------------------------------------------------------


def test_eval_engine_command(engines, tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    engine = engines["dir"] / "single-expert-int8.onnx"
    args = ["eval-engine", str(engine), "--run", str(tiny_run[0]), "--out", str(out)]
    result = runner.invoke(app, [*args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["precision"] == "int8" and len(saved["per_task"]) == 1
    assert "average" in result.stdout and "latency (onnxruntime-cpu)" in result.stdout
    assert f"{saved['avg']:.2f}" in result.stdout


def test_eval_engine_bad_input(engines, tiny_run, tmp_path):
    run_dir = str(tiny_run[0])
    engine = str(engines["dir"] / "surgeryv2-routed.onnx")
    missing = str(tmp_path / "no.onnx")
    assert "does not exist" in user_error(["eval-engine", missing, "--run", run_dir])
    assert "not a surgery-edge run" in user_error(["eval-engine", engine, "--run", str(tmp_path)])
    user_error(["eval-engine", engine, "--run", run_dir, "--split", "adapt"])
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tiny_run[0] / "config.json").read_text())
    config["suite"]["tasks"] = ["digits", "shapes"]  # lacks the engine's colours
    (other / "config.json").write_text(json.dumps(config))
    assert "does not have" in user_error(["eval-engine", engine, "--run", str(other)])

"""Runtime: preprocessing, the Predictor over engines, `surgery-edge predict`, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_checks import user_error
from PIL import Image
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.errors import ExportError

runner = CliRunner()


@pytest.fixture(scope="session")
def routed(engines):
    from surgery_edge.runtime import load

    return load(engines["dir"] / "surgeryv2-routed.onnx")


@pytest.fixture(scope="session")
def known(run, tmp_path_factory):
    """A test image of each task that the PyTorch SurgeryV2 model classifies right (the most
    confident one), saved as PNG: {task: (path, class name, PyTorch probabilities)}."""
    from surgery_edge.data.transforms import to_model_input

    model = run.layout.export_model("task_arithmetic", "surgeryv2")[0]
    folder = tmp_path_factory.mktemp("images")
    out = {}
    for t, task in enumerate(run.tasks):
        data = run.suite.task(task)
        with torch.no_grad():
            x = to_model_input(data.test_x, run.arch)
            logits = model(x, torch.full((len(x),), t))[:, : len(data.class_names)]
        probs = torch.softmax(logits, -1).numpy()
        right = np.flatnonzero(probs.argmax(-1) == data.test_y)
        assert len(right), f"the tiny model gets no {task} test image right"
        i = right[np.argmax(probs[right].max(-1))]
        path = folder / f"{task}-{i}.png"
        Image.fromarray(data.test_x[i]).save(path)
        out[task] = (path, data.class_names[data.test_y[i]], probs[i])
    return out


# --- preprocessing ------------------------------------------------------------------------------


def test_preprocessing_matches_training(run):
    from surgery_edge.data.transforms import to_model_input
    from surgery_edge.runtime import preprocess

    images = run.suite.task("digits").test_x[:5]  # 32 x 32, resized to 16
    ours = preprocess(list(images), run.arch.preprocessing)
    np.testing.assert_array_equal(ours, to_model_input(images, run.arch).numpy())


def test_images_are_converted_to_rgb():
    from surgery_edge.runtime import to_rgb_array

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    assert to_rgb_array(grey).shape == (20, 30, 3)
    assert (to_rgb_array(grey[..., None])[..., 2] == grey).all()
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_rgb_array(rgba), rgb)
    np.testing.assert_array_equal(to_rgb_array(rgb / 255.0), rgb)
    for shape in [(5,), (3, 4, 5, 6), (8, 8, 2), (0, 4, 3)]:
        with pytest.raises(ExportError, match="not an image"):
            to_rgb_array(np.zeros(shape, np.uint8))
    with pytest.raises(ExportError, match=r"\[0, 1\]"):
        to_rgb_array(np.full((4, 4, 3), 2.0))


# --- the Predictor --------------------------------------------------------------------------


def test_predictor_reads_metadata(routed, run):
    assert routed.kind == "onnx" and routed.mode == "routed"
    assert routed.tasks == run.tasks and routed.image_size == 16
    assert routed.class_names[1] == run.suite.task("shapes").class_names
    assert routed.meta["method"] == "surgeryv2" and routed.meta["precision"] == "fp32"
    assert "surgeryv2" in repr(routed)


def test_predict_known_images(routed, known):
    for task, (path, label, probs) in known.items():
        (result,) = routed.predict(path, task=task)
        assert result.ok and result.source == str(path)
        answer = result[task]
        assert answer.label == label
        np.testing.assert_allclose(answer.probs, probs, atol=1e-5)
        assert len(answer.probs) == len(probs) and abs(sum(answer.probs) - 1) < 1e-6


def test_predict_inputs_of_every_kind(routed, known):
    path, label, _ = known["shapes"]
    array = np.asarray(Image.open(path))
    pil = Image.open(path)
    batch = np.stack([array, array])  # (N, H, W, 3): N images
    results = routed.predict([path, pil, array, *batch], task="shapes")
    assert [r["shapes"].label for r in results] == [label] * 5
    assert [r.source for r in results[1:]] == [f"image[{i}]" for i in range(1, 5)]
    # Other sizes and channel counts are resized / converted, not rejected.
    big_rgba = np.asarray(Image.open(path).convert("RGBA").resize((50, 40)))
    grey = np.asarray(Image.open(path).convert("L"))
    results = routed.predict([big_rgba, grey], task=1)
    assert all(r.ok and r.predictions[0].task == "shapes" for r in results)


def test_all_tasks_and_mixed_tasks(engines, routed, known, run):
    from surgery_edge.runtime import load

    paths = [known[t][0] for t in run.tasks]
    everything = routed.predict(paths, all_tasks=True)
    assert [[p.task for p in r.predictions] for r in everything] == [run.tasks] * 3
    mixed = routed.predict(paths, task=run.tasks)  # one task per image
    for i, task in enumerate(run.tasks):
        assert mixed[i][task].label == known[task][1] == everything[i][task].label
        np.testing.assert_allclose(mixed[i][task].probs, everything[i][task].probs, atol=1e-6)
    # An all-tasks engine answers a single task by running all of them.
    v1 = load(engines["dir"] / "surgery-all-tasks.onnx")
    one = v1.predict(paths, task="colours")
    every = v1.predict(paths, all_tasks=True)
    for a, b in zip(one, every):
        assert a["colours"].probs == pytest.approx(b["colours"].probs, abs=1e-6)
    assert json.loads(json.dumps([r.to_dict() for r in every]))[0]["predictions"]["digits"]


def test_single_task_engine_needs_no_task(engines, known):
    from surgery_edge.runtime import load

    expert = load(engines["dir"] / "single-expert.onnx")
    assert expert.tasks == ["digits"]
    (result,) = expert.predict(known["digits"][0])
    assert result["digits"].label in [str(i) for i in range(10)]


def test_bad_tasks(routed, known):
    path = known["digits"][0]
    with pytest.raises(ExportError, match="Unknown task 'sudoku'.*0=digits, 1=shapes, 2=colours"):
        routed.predict(path, task="sudoku")
    for bad in (3, -1, "7"):
        with pytest.raises(ExportError, match="out of range: this engine has 3 tasks"):
            routed.predict(path, task=bad)
    with pytest.raises(ExportError, match="choose one"):
        routed.predict(path)
    with pytest.raises(ExportError, match="not both"):
        routed.predict(path, task="digits", all_tasks=True)
    with pytest.raises(ExportError, match="2 images but 1 tasks"):
        routed.predict([path, path], task=["digits"])
    with pytest.raises(ExportError, match="out of range"):
        routed.routed_logits(np.zeros((1, 3, 16, 16), np.float32), np.array([5]))
    with pytest.raises(ExportError, match=r"\(B, 3, 16, 16\)"):
        routed.routed_logits(np.zeros((1, 3, 32, 32), np.float32), np.array([0]))


def test_unreadable_images_are_named_and_the_rest_answered(routed, known, tmp_path):
    good, label, _ = known["colours"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:40])  # a truncated PNG
    missing = tmp_path / "missing.png"
    results = routed.predict([broken, good, missing, np.zeros((7,))], task="colours")
    assert [r.ok for r in results] == [False, True, False, False]
    assert "broken.png" in results[0].error and "not a readable image" in results[0].error
    assert "missing.png" in results[2].error and "does not exist" in results[2].error
    assert "not an image" in results[3].error and "(7,)" in results[3].error
    assert results[1]["colours"].label == label
    assert results[0].to_dict() == {"source": str(broken), "error": results[0].error}


def test_predict_never_runs_an_external_decoder(engines, known, tmp_path, monkeypatch):
    """EPS bytes (which Pillow decodes by running Ghostscript) in a file named like a photo,
    and a PDF: refused by name with the allowed formats, the other image answered (exit 1)."""
    from image_files import EPS_BYTES, PDF_BYTES, fake_ghostscript

    marker = fake_ghostscript(tmp_path, monkeypatch)
    eps, pdf = tmp_path / "holiday.jpg", tmp_path / "scan.pdf"
    eps.write_bytes(EPS_BYTES)
    pdf.write_bytes(PDF_BYTES)
    good = str(known["digits"][0])
    engine = str(engines["dir"] / "surgeryv2-routed.onnx")
    result = runner.invoke(app, ["predict", engine, str(eps), str(pdf), good, "--task", "digits"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    stderr = " ".join(result.stderr.split())
    assert "holiday.jpg is not a readable image in an allowed format (PNG, JPEG" in stderr
    assert "scan.pdf is not a readable image in an allowed format" in stderr
    assert result.stdout.startswith(f"{good}\tdigits\t")
    from surgery_edge.runtime import load

    (row,) = load(engine).predict(EPS_BYTES, task="digits")  # bytes, as the server gets them
    assert "allowed format" in row.error
    assert not marker.exists()


@pytest.mark.parametrize("name", ["engine.onnx", "engine.pt2", "engine.bin"])
def test_corrupt_engine_files(engines, tmp_path, name):
    from surgery_edge.runtime import load

    path = tmp_path / name
    path.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ExportError, match=name):
        load(path)
    truncated = tmp_path / f"truncated-{name}"
    truncated.write_bytes((engines["dir"] / "surgeryv2-routed.onnx").read_bytes()[:30000])
    with pytest.raises(ExportError, match=f"truncated-{name}"):
        load(truncated)
    with pytest.raises(ExportError, match="does not exist"):
        load(tmp_path / "nothing.onnx")


def test_tensorrt_engine_needs_its_sidecar_and_tensorrt(engines, tmp_path, monkeypatch):
    import sys

    from surgery_edge.engine_format import file_sha256, read_onnx_metadata, write_sidecar
    from surgery_edge.runtime import load

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    with pytest.raises(ExportError, match="model.engine.json"):
        load(engine)
    meta = read_onnx_metadata(engines["dir"] / "surgeryv2-routed.onnx")
    write_sidecar(engine, meta.to_dict(), file_sha256(engine))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ExportError, match=r"surgery-edge\[trt\]"):
        load(engine)


# --- the CLI --------------------------------------------------------------------------------


def test_cli_predicts_a_known_image(engines, known):
    path, label, probs = known["shapes"]
    engine = str(engines["dir"] / "surgeryv2-routed.onnx")
    result = runner.invoke(app, ["predict", engine, str(path), "--task", "shapes"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\t")[:3] == [str(path), "shapes", label]
    result = runner.invoke(app, ["predict", engine, str(path), "--task", "1", "--json"])
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()  # JSON Lines: one object per image
    answer = json.loads(line)
    shapes = answer["predictions"]["shapes"]
    assert answer["source"] == str(path) and shapes["label"] == label
    assert shapes["index"] == int(np.argmax(probs))
    np.testing.assert_allclose(shapes["probs"], probs, atol=1e-5)
    result = runner.invoke(app, ["predict", engine, str(path), "--all-tasks", "--json"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["predictions"]) == ["digits", "shapes", "colours"]


def test_cli_predict_bad_input(engines, known, tmp_path):
    engine = str(engines["dir"] / "surgeryv2-routed.onnx")
    image = str(known["digits"][0])
    msg = user_error(["predict", engine, image, "--task", "sudoku"])
    assert "sudoku" in msg and "0=digits, 1=shapes, 2=colours" in msg
    msg = user_error(["predict", engine, image, "--task", "9"])
    assert "Task id 9 is out of range" in msg
    msg = user_error(["predict", engine, image, "--task", "digits", "--all-tasks"])
    assert "not both" in msg
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage" * 50)
    msg = user_error(["predict", str(corrupt), image, "--task", "digits"])
    assert "corrupt.onnx" in msg
    odd = [tmp_path / "big-rgba.png", tmp_path / "grey.png"]  # other sizes and channels
    Image.open(image).convert("RGBA").resize((50, 40)).save(odd[0])
    Image.open(image).convert("L").save(odd[1])
    result = runner.invoke(app, ["predict", engine, *map(str, odd), "--task", "digits"])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == list(map(str, odd))
    broken = tmp_path / "cat.jpg"
    broken.write_text("not a jpeg")
    result = runner.invoke(app, ["predict", engine, str(broken), image, "--task", "digits"])
    assert result.exit_code == 1 and "Traceback" not in result.output  # a partial result
    assert "cat.jpg" in result.stderr and "1 of 2 images" in result.stderr
    assert result.stdout.startswith(f"{image}\tdigits\t{known['digits'][1]}\t")  # still answered

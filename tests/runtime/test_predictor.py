"""The Predictor on small engines built in milliseconds (``tests/engine_graphs.py``).

Every answer is compared with the engines' NumPy reference, so routing an image to another
task, preprocessing it otherwise than the metadata says, dropping an image of a batch or
mislabelling a class fails here, without the tiny run (and so under mutation testing too).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from engine_graphs import build_engine
from image_files import png_bytes
from PIL import Image

from surgery_edge.errors import ExportError
from surgery_edge.runtime import Predictor, load
from surgery_edge.runtime.backends import OnnxBackend
from surgery_edge.runtime.predictor import ImageResult, TaskPrediction, softmax
from surgery_edge.runtime.preprocess import normalise, open_image, resize_crop

TASKS = ["digits", "shapes", "colours"]
CLASSES = [3, 5, 2]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{mode: (path, reference)} for a routed and an all-tasks engine with the same weights."""
    folder = tmp_path_factory.mktemp("engines")
    return {
        mode: (folder / f"{mode}.onnx", build_engine(folder / f"{mode}.onnx", mode))
        for mode in ("routed", "all-tasks")
    }


@pytest.fixture(scope="module", params=["routed", "all-tasks"])
def engine(request, built):
    path, ref = built[request.param]
    return load(path), ref


def _photos(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` (H, W, 3) uint8 images of different sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (9 + 3 * i, 12 + 5 * (i % 3), 3), np.uint8) for i in range(n)]


def _inputs(predictor: Predictor, images: list[np.ndarray], resize=None, interpolation=None):
    pre = predictor.preprocessing
    s = pre.image_size
    batch = np.stack(
        [
            resize_crop(open_image(a), s, resize or pre.resize, interpolation or pre.interpolation)
            for a in images
        ]
    )
    return normalise(batch, pre.mean, pre.std)  # (B, 3, S, S)


def _expected(ref, x: np.ndarray, t: int):
    logits = ref.logits(x, t)  # (B, C_t)
    return logits.argmax(-1), softmax(logits)


def _assert_answers(results, ref, x, tasks):
    """Each result answers its image's task(s) as the reference does."""
    for b, (result, ts) in enumerate(zip(results, tasks)):
        assert result.ok and [p.task for p in result.predictions] == [TASKS[t] for t in ts]
        for p, t in zip(result.predictions, ts):
            index, probs = _expected(ref, x[b : b + 1], t)
            assert p.index == index[0] and p.label == f"{TASKS[t]}-{index[0]}"
            np.testing.assert_allclose(p.probs, probs[0], rtol=1e-4, atol=1e-6)
            assert len(p.probs) == CLASSES[t] and p.score == p.probs[p.index]


def test_the_engine_is_described_by_its_metadata(engine, built):
    predictor, _ = engine
    assert predictor.tasks == TASKS and list(predictor.class_counts) == CLASSES
    assert predictor.class_names[1] == [f"shapes-{c}" for c in range(5)]
    assert predictor.image_size == 8 and predictor.kind == "onnx"
    assert predictor.batch_size == predictor.backend.max_batch == 64
    assert predictor.path == built[str(predictor.mode)][0]
    text = repr(predictor)
    for part in (str(predictor.path), "onnx", str(predictor.mode), "fp32", "surgery", "shapes"):
        assert part in text


def test_raw_logits_route_each_image_to_its_task(engine):
    predictor, ref = engine
    x = np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32)
    ids = np.array([2, 0, 1, 1, 0])
    routed = predictor.routed_logits(x, ids)
    assert routed.shape == (5, max(CLASSES)) and routed.dtype == np.float32
    for b, t in enumerate(ids):
        np.testing.assert_allclose(routed[b, : CLASSES[t]], ref.logits(x[b : b + 1], t)[0], 1e-4)
        assert np.isneginf(routed[b, CLASSES[t] :]).all()
    every = predictor.all_task_logits(x)
    assert [a.shape for a in every] == [(5, c) for c in CLASSES]
    for t in range(3):
        np.testing.assert_allclose(every[t], ref.logits(x, t), rtol=1e-4, atol=1e-5)


def test_empty_batches_give_empty_answers_of_the_right_width(engine):
    predictor, _ = engine
    empty = np.zeros((0, 3, 8, 8), np.float32)
    assert predictor.routed_logits(empty, np.zeros(0, np.int64)).shape == (0, max(CLASSES))
    assert [a.shape for a in predictor.all_task_logits(empty)] == [(0, c) for c in CLASSES]


@pytest.mark.parametrize("mode", ["routed", "all-tasks"])
def test_raw_batches_larger_than_the_engine_takes_are_split(built, mode):
    """A backend that takes at most 2 rows per run still answers 5 images, each for its task."""
    path, ref = built[mode]
    backend, rows = OnnxBackend(path, device="cpu"), []
    backend.max_batch, run = 2, backend.run

    def counted(images, ids):
        rows.append(len(images))
        return run(images, ids)

    backend.run = counted
    predictor = Predictor(backend)
    assert predictor.batch_size == 2
    x = np.random.default_rng(2).normal(size=(5, 3, 8, 8)).astype(np.float32)
    ids = np.array([1, 2, 0, 2, 1])
    got = predictor.routed_logits(x, ids)
    assert rows == [2, 2, 1]
    for b, t in enumerate(ids):
        np.testing.assert_allclose(got[b, : CLASSES[t]], ref.logits(x[b : b + 1], t)[0], 1e-4)
    column = predictor.routed_logits(x, ids.reshape(-1, 1))  # (B, 1) ids read as (B,)
    np.testing.assert_array_equal(column, got)
    rows.clear()
    every = predictor.all_task_logits(x)
    assert rows == ([2] * 7 + [1] if mode == "routed" else [2, 2, 1])  # routed: 5 rows x 3 tasks
    for t in range(3):
        np.testing.assert_allclose(every[t], ref.logits(x, t), rtol=1e-4, atol=1e-5)
    backend.max_batch = 1  # one row per run
    rows.clear()
    predictor.routed_logits(x[:3], ids[:3])
    assert rows == [1, 1, 1]


def test_raw_batches_of_the_wrong_shape_or_tasks_are_refused(engine):
    predictor, _ = engine
    x = np.zeros((2, 3, 8, 8), np.float32)
    for bad in (np.zeros((2, 3, 8, 9)), np.zeros((3, 8, 8)), np.zeros((2, 1, 8, 8))):
        with pytest.raises(
            ExportError, match=r"\(B, 3, 8, 8\) float32, got .*; use predict\(\) for raw images\.$"
        ):
            predictor.routed_logits(bad, [0, 0])
        with pytest.raises(ExportError, match=r"\(B, 3, 8, 8\)"):
            predictor.all_task_logits(bad)
    with pytest.raises(ExportError, match="2 images but 3 task ids"):
        predictor.routed_logits(x, [0, 1, 2])
    with pytest.raises(ExportError, match="Task id 3 is out of range"):
        predictor.routed_logits(x, [0, 3])


def test_tasks_by_name_id_or_digits(engine):
    predictor, _ = engine
    assert [predictor.task_index(t) for t in TASKS] == [0, 1, 2]
    assert [predictor.task_index(t) for t in (0, 2, np.int64(1), "1", " 2")] == [0, 2, 1, 1, 2]
    known = "0=digits, 1=shapes, 2=colours"
    for bad, message in [
        (3, f"Task id 3 is out of range: this engine has 3 tasks ({known})"),
        (-1, "Task id -1 is out of range"),
        ("-1", "Task id -1 is out of range"),
        ("3", "Task id 3 is out of range"),
        ("cars", f"Unknown task 'cars'; this engine serves {known}"),
        ("X1", "Unknown task 'X1'"),
        (True, "Unknown task True"),
        (1.0, "Unknown task 1.0"),
        (None, "Unknown task None"),
    ]:
        with pytest.raises(ExportError) as e:
            predictor.task_index(bad)
        assert message in str(e.value)


def test_images_of_every_kind_are_answered_as_preprocessed_by_the_metadata(engine, tmp_path):
    predictor, ref = engine
    arrays = _photos(4)
    path = tmp_path / "photo.png"
    Image.fromarray(arrays[0]).save(path)
    buf = io.BytesIO()
    Image.fromarray(arrays[1]).save(buf, format="PNG")
    items = [str(path), buf.getvalue(), Image.fromarray(arrays[2]), arrays[3], path]
    x = _inputs(predictor, [arrays[0], arrays[1], arrays[2], arrays[3], arrays[0]])
    results = predictor.predict(items, task="shapes")
    assert [r.source for r in results] == [str(path), "image[1]", "image[2]", "image[3]", str(path)]
    _assert_answers(results, ref, x, [[1]] * 5)
    # another resize or interpolation than the metadata's would answer other probabilities
    for other in (
        _inputs(predictor, arrays, "squash"),
        _inputs(predictor, arrays, None, "nearest"),
    ):
        assert not np.allclose(ref.logits(other, 1), ref.logits(x[:4], 1), atol=1e-3)


@pytest.mark.parametrize(
    ("resize", "interpolation"), [("squash", "nearest"), ("shortest", "bilinear")]
)
def test_images_are_resized_as_the_engines_metadata_says(tmp_path, resize, interpolation):
    pre = {"resize": resize, "interpolation": interpolation}
    ref = build_engine(tmp_path / "e.onnx", "routed", preprocessing=pre)
    predictor = load(tmp_path / "e.onnx")
    arrays = _photos(3, seed=8)
    x = _inputs(predictor, arrays)
    assert (predictor.preprocessing.resize, predictor.preprocessing.interpolation) == (
        resize,
        interpolation,
    )
    _assert_answers(predictor.predict(arrays, task="shapes"), ref, x, [[1]] * 3)
    # what the default preprocessing (shortest side, bicubic) would have answered differs
    default = _inputs(predictor, arrays, "shortest", "bicubic")
    assert not np.allclose(ref.logits(default, 1), ref.logits(x, 1), atol=1e-3)


def test_one_image_a_stack_and_a_path_are_read_as_such(engine, tmp_path):
    predictor, ref = engine
    stack = np.stack([a[:9, :12] for a in _photos(3, seed=3)])  # (3, 9, 12, 3)
    x = _inputs(predictor, list(stack))
    assert len(predictor.predict(stack, task=0)) == 3
    _assert_answers(predictor.predict(stack, task=0), ref, x, [[0]] * 3)
    _assert_answers(predictor.predict(stack[1], task=0), ref, x[1:2], [[0]])
    Image.fromarray(stack[2]).save(tmp_path / "one.png")
    for one in (tmp_path / "one.png", str(tmp_path / "one.png")):
        _assert_answers(predictor.predict(one, task=0), ref, x[2:], [[0]])
    encoded = (tmp_path / "one.png").read_bytes()
    for one in (encoded, bytearray(encoded), memoryview(encoded)):
        _assert_answers(predictor.predict(one, task=0), ref, x[2:], [[0]])
    _assert_answers(predictor.predict(Image.fromarray(stack[0]), task=0), ref, x[:1], [[0]])
    # iter_predict reads a stack, one image and a path as predict does
    _assert_answers(list(predictor.iter_predict(stack, task=0)), ref, x, [[0]] * 3)
    _assert_answers(list(predictor.iter_predict(stack[1], task=0)), ref, x[1:2], [[0]])
    _assert_answers(list(predictor.iter_predict(tmp_path / "one.png", task=0)), ref, x[2:], [[0]])


def test_every_task_or_one_task_per_image(engine):
    predictor, ref = engine
    arrays = _photos(5, seed=4)
    x = _inputs(predictor, arrays)
    every = predictor.predict(arrays, all_tasks=True)
    _assert_answers(every, ref, x, [[0, 1, 2]] * 5)
    assert every[2]["colours"] == every[2].predictions[2]
    with pytest.raises(KeyError, match="cars"):
        every[2]["cars"]
    mixed = predictor.predict(arrays, task=["colours", 0, "shapes", 2, "1"])
    _assert_answers(mixed, ref, x, [[2], [0], [1], [2], [1]])
    streamed = list(predictor.iter_predict(iter(arrays), task=iter([2, 0, 1, 2, 1])))
    assert [r.to_dict() for r in streamed] == [r.to_dict() for r in mixed]


def test_answers_are_read_in_batches_and_keep_their_order(built):
    path, ref = built["routed"]
    predictor = load(path, batch_size=2)
    assert predictor.batch_size == 2
    arrays, pulled = _photos(5, seed=5), []

    def stream():
        for i, a in enumerate(arrays):
            pulled.append(i)
            yield a

    results = predictor.iter_predict(stream(), task="colours")
    first = next(results)
    assert len(pulled) == 2  # one batch read, nothing more
    rest = list(results)
    assert [r.source for r in [first, *rest]] == [f"image[{i}]" for i in range(5)]
    _assert_answers([first, *rest], ref, _inputs(predictor, arrays), [[2]] * 5)
    every = list(predictor.iter_predict(iter(arrays), all_tasks=True))
    assert [r.source for r in every] == [f"image[{i}]" for i in range(5)]
    _assert_answers(every, ref, _inputs(predictor, arrays), [[0, 1, 2]] * 5)


def test_unreadable_images_are_named_and_the_others_answered(engine, tmp_path):
    predictor, ref = engine
    arrays = _photos(3, seed=6)
    missing = tmp_path / "missing.png"
    for every in (False, True):
        kwargs = {"all_tasks": True} if every else {"task": "digits"}
        results = predictor.predict([arrays[0], missing, b"not an image", arrays[2]], **kwargs)
        assert [r.ok for r in results] == [True, False, False, True]
        assert str(missing) in results[1].error and results[1].source == str(missing)
        assert results[2].source == "image[2]" and results[2].error
        assert results[1].to_dict() == {"source": str(missing), "error": results[1].error}
        tasks = [[0, 1, 2]] * 2 if every else [[0]] * 2
        _assert_answers([results[0], results[3]], ref, _inputs(predictor, arrays[::2]), tasks)
    none = predictor.predict([missing, b"no"], task=0)
    assert not any(r.ok for r in none) and all(r.predictions == [] for r in none)
    assert none[0].to_dict() == {"source": str(missing), "error": none[0].error}
    assert predictor.predict([missing, b"no"], all_tasks=True)[1].error


def test_images_over_the_pixel_limit_are_refused_one_by_one(built):
    predictor = load(built["routed"][0], max_pixels=300)
    assert predictor.max_pixels == 300
    small, large = png_bytes(15, 20), png_bytes(20, 20)
    results = predictor.predict([small, large, small], task=1)
    assert [r.ok for r in results] == [True, False, True]
    assert "400" in results[1].error and "300" in results[1].error
    with pytest.raises(ExportError, match="max_pixels"):
        load(built["routed"][0], max_pixels=0)
    with pytest.raises(ExportError, match="tpu"):  # the device is passed on, and checked
        load(built["routed"][0], device="tpu")


def test_asking_for_no_task_too_many_or_both_is_refused(engine):
    predictor, _ = engine
    arrays = _photos(2)
    with pytest.raises(ExportError, match="^No images to predict.$"):
        predictor.predict([], task=0)
    with pytest.raises(
        ExportError,
        match=r"serves 3 tasks \(digits, shapes, colours\): choose one \(task=\.\.\. / --task\) or "
        r"ask for all of them \(all_tasks=True / --all-tasks\)\.$",
    ):
        predictor.predict(arrays)
    with pytest.raises(ExportError, match="serves 3 tasks"):
        list(predictor.iter_predict(arrays))
    for task in ("shapes", ["shapes", "digits"]):
        with pytest.raises(ExportError, match="^Ask for one task or for all tasks, not both.$"):
            predictor.predict(arrays, task=task, all_tasks=True)
        with pytest.raises(ExportError, match="^Ask for one task or for all tasks, not both.$"):
            list(predictor.iter_predict(arrays, task=task, all_tasks=True))
    with pytest.raises(ExportError, match="2 images but 3 tasks; give one task per image"):
        predictor.predict(arrays, task=[0, 1, 2])
    with pytest.raises(ExportError, match="Unknown task 'cars'"):
        predictor.predict(arrays, task=[0, "cars"])
    with pytest.raises(ExportError, match="^The images and the tasks differ in number; give one"):
        list(predictor.iter_predict(iter(arrays), task=iter([0])))
    with pytest.raises(ExportError, match="differ in number"):
        list(predictor.iter_predict(iter(arrays), task=iter([0, 1, 2])))
    with pytest.raises(ExportError, match="batch_size must be at least 1, not 0"):
        Predictor(predictor.backend, batch_size=0)
    one = Predictor(predictor.backend, batch_size=1)  # one image at a time is a batch size
    assert [r.ok for r in one.predict(arrays, task=0)] == [True, True]


def test_a_single_task_engine_needs_no_task(tmp_path):
    ref = build_engine(tmp_path / "one.onnx", "routed", tasks=("digits",), classes=(4,))
    predictor = load(tmp_path / "one.onnx")
    arrays = _photos(2, seed=7)
    x = _inputs(predictor, arrays)
    results = predictor.predict(arrays)
    assert [r.predictions[0].task for r in results] == ["digits", "digits"]
    assert [r.predictions[0].index for r in results] == list(ref.logits(x, 0).argmax(-1))
    assert [r.predictions[0].task for r in predictor.iter_predict(arrays)] == ["digits"] * 2


@pytest.mark.parametrize("mode", ["routed", "all-tasks"])
def test_an_engine_with_non_finite_weights_is_refused_naming_the_task(tmp_path, mode):
    path = _with_nan_head(tmp_path / "nan.onnx", mode, task=1)
    with pytest.raises(ExportError, match=r"nan\.onnx gives non-finite logits for task 'shapes'"):
        load(path)
    predictor = Predictor(OnnxBackend(path, device="cpu"))  # constructing it runs nothing
    with pytest.raises(ExportError, match="task 'shapes'") as e:
        predictor.check_finite()
    assert "NaN or infinity" in str(e.value) and "Re-export it from finite" in str(e.value)


def _with_nan_head(path: Path, mode: str, task: int) -> Path:
    """An engine whose head for ``task`` holds NaN."""
    import onnx
    from onnx import numpy_helper

    from surgery_edge.export.onnx import write_engine

    build_engine(path, mode)
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        if init.name == "head_table":
            table = numpy_helper.to_array(init).copy()
            table[task, :, 0] = np.nan
            init.CopyFrom(numpy_helper.from_array(table, "head_table"))
    write_engine(proto, path)
    return path


def test_results_read_as_plain_values():
    p = TaskPrediction("shapes", 1, "square", (0.25, 0.75))
    assert p.score == 0.75
    assert p.to_dict() == {
        "task": "shapes",
        "index": 1,
        "label": "square",
        "score": 0.75,
        "probs": [0.25, 0.75],
    }
    ok, bad = ImageResult("a.png", [p]), ImageResult("b.png", error="unreadable")
    assert ok.ok and not bad.ok and ok["shapes"] is p
    assert ok.to_dict() == {"source": "a.png", "predictions": {"shapes": p.to_dict()}}
    assert bad.to_dict() == {"source": "b.png", "error": "unreadable"}


def test_softmax_is_stable_and_gives_padding_no_probability():
    logits = np.array([[1000.0, 999.0, -np.inf], [0.0, 0.0, 0.0]])
    probs = softmax(logits)
    e = np.exp(-1.0)
    np.testing.assert_allclose(probs[0], [1 / (1 + e), e / (1 + e), 0.0])
    np.testing.assert_allclose(probs[1], [1 / 3] * 3)

"""Resource limits in the runtime: a pixel budget per image, bounded batches, no lost answers."""

from __future__ import annotations

import pytest
from cli_checks import partial_result
from image_files import png_bytes, png_header

from surgery_edge.errors import ExportError


@pytest.fixture(scope="module")
def routed(engines):
    from surgery_edge.runtime import load

    return load(engines["dir"] / "surgeryv2-routed.onnx", device="cpu")


@pytest.mark.parametrize(("width", "height"), [(50000, 50000), (20000, 10000), (10000, 10000)])
def test_a_decompression_bomb_is_refused_from_its_header(width, height):
    """Above PIL's own limit (2x its threshold) and between the two: one clear error, no
    traceback, no decoding (these files would decode to 300 MB - 7.5 GB)."""
    from surgery_edge.runtime.preprocess import open_image

    with pytest.raises(ExportError, match=r"max_pixels=89,478,485") as e:
        open_image(png_header(width, height))
    assert "DecompressionBomb" not in type(e.value).__name__


def test_max_pixels_is_configurable(tmp_path):
    from surgery_edge.runtime.preprocess import open_image

    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(40, 30))
    assert open_image(path, max_pixels=1200).size == (40, 30)
    with pytest.raises(ExportError, match=rf"{path}.* 40x30 = 1,200 pixels.*max_pixels=1,199"):
        open_image(path, max_pixels=1199)
    with pytest.raises(ExportError, match="at least 1"):
        open_image(path, max_pixels=0)
    with pytest.raises(ExportError, match="positive integer"):
        open_image(path, max_pixels=2.5)


def test_every_other_image_of_the_call_is_answered(routed, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(50000, 50000))
    inputs = [png_bytes(), bomb, b"not an image", png_header(20000, 10000), tmp_path / "a.png"]
    (tmp_path / "a.png").write_bytes(png_bytes(33, 47, (10, 200, 10)))
    results = routed.predict(inputs, task="shapes")
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert str(bomb) in results[1].error and "max_pixels" in results[1].error
    assert "not a readable image" in results[2].error
    assert "20000x10000" in results[3].error or "max_pixels" in results[3].error
    # the answers of the good images are those they get alone
    alone = routed.predict([inputs[0], inputs[4]], task="shapes")
    assert [r["shapes"].probs for r in alone] == [
        results[0]["shapes"].probs,
        results[4]["shapes"].probs,
    ]


def test_images_are_read_and_answered_in_bounded_batches(routed):
    """The Predictor never holds more than ``batch_size`` decoded images: it pulls a batch
    from the input, answers it, and only then reads on."""
    from surgery_edge.runtime import Predictor

    calls, pulled = [], []
    backend = routed.backend

    class Recording:
        kind, meta, max_batch, path = backend.kind, backend.meta, backend.max_batch, backend.path

        def run(self, images, task_ids):
            calls.append(len(images))
            return backend.run(images, task_ids)

    def images():
        for i in range(8):
            pulled.append(i)
            yield png_bytes(20 + i, 30)

    predictor = Predictor(Recording(), batch_size=3)
    stream = predictor.iter_predict(images(), task="digits")
    first = next(stream)
    assert first.ok and len(pulled) == 3  # one batch read, nothing more
    rest = list(stream)
    assert len(rest) == 7 and all(r.ok for r in rest)
    assert calls == [3, 3, 2]
    with pytest.raises(ExportError, match="batch_size"):
        Predictor(Recording(), batch_size=0)


def test_per_image_tasks_stream_and_must_match_the_images(routed):
    results = list(
        routed.iter_predict(iter([png_bytes()] * 3), task=iter(["digits", 1, "colours"]))
    )
    assert [r.predictions[0].task for r in results] == ["digits", routed.tasks[1], "colours"]
    with pytest.raises(ExportError, match="differ in number"):
        list(routed.iter_predict(iter([png_bytes()] * 3), task=iter(["digits"])))


def test_predict_cli_answers_the_good_images_and_names_the_bomb(engines, tmp_path):
    good, bomb = tmp_path / "good.png", tmp_path / "bomb.png"
    good.write_bytes(png_bytes())
    bomb.write_bytes(png_header(50000, 50000))
    engine = engines["dir"] / "surgeryv2-routed.onnx"
    out = partial_result(["predict", str(engine), str(good), str(bomb), "--task", "shapes"])
    assert f"{good}\tshapes" in out and "bomb.png" in out and "1 of 2 images" in out
    out = partial_result(
        ["predict", str(engine), str(good), "--task", "shapes", "--max-pixels", "100"]
    )
    assert "max_pixels=100" in out


def test_the_http_front_checks_a_kserve_request_against_the_model():
    """The front's check, without a server: every input bounded by the model's config (name,
    dims, batch 1..max_batch), the JSON shaped as KServe v2 says; binary tensors are sized by
    Triton against the (checked) shape."""
    import json

    from surgery_edge.runtime.http_front import ModelLimits, check_inference

    limits = ModelLimits(max_batch=4, inputs={"images": (3, 2, 2), "task_ids": (1,)})
    images = {"name": "images", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": [0.5] * 12}
    ids = {"name": "task_ids", "shape": [1, 1], "datatype": "INT64", "data": [[2]]}

    def check(header, binary: bytes = b"", length: str | None = None) -> str | None:
        body = (header if isinstance(header, bytes) else json.dumps(header).encode()) + binary
        return check_inference("engine", limits, body, length)

    assert check({"inputs": [images, ids], "outputs": [{"name": "logits"}]}) is None
    assert check({"inputs": [{**images, "shape": [4, 3, 2, 2], "data": [[1] * 12] * 4}]}) is None
    binary = {**images, "parameters": {"binary_data_size": 48}}
    binary.pop("data")
    header = json.dumps({"inputs": [binary]}).encode()
    assert check(header, bytes(48), str(len(header))) is None
    refused = {
        "the request body is not JSON": [b"{oops", b"\xff\xfe", b"[" * 100_000],
        "non-empty 'inputs' list": [{"inputs": []}, {"inputs": {}}, [images]],
        "has no input 'pixels'": [{"inputs": [{**images, "name": "pixels"}]}],
        "unexpected shape": [{"inputs": [{**images, "shape": s}]} for s in
                             ([2**31], [1, 3, 2, 2**31], [5, 3, 2, 2], [0, 3, 2, 2],
                              [1, 3, 2], [1.0, 3, 2, 2], [True, 3, 2, 2], "1,3,2,2", None)]
                            + [{"inputs": [images, {**ids, "shape": [2**31, 1]}]}],
        "no 'datatype'": [{"inputs": [{**images, "datatype": None}]}],
        "'data' must be": [{"inputs": [{**images, "data": d}]} for d in
                           ("abc", [0.5] * 11, ["a"] * 12, [True] * 12, None)]
                          + [{"inputs": [{**ids, "data": [2.5]}]}],
        "'outputs' must be": [{"inputs": [images], "outputs": "logits"},
                              {"inputs": [images], "outputs": [{"name": 1}]}],
        "'parameters' must be": [{"inputs": [images], "parameters": [1]}],
        "each input is a JSON object": [{"inputs": [[1]]}, {"inputs": [{**images, "name": 3}]}],
    }  # fmt: skip
    for message, headers in refused.items():
        for h in headers:
            why = check(h)
            assert why is not None and message in why, (h, why)
            assert len(why) < 300  # one line, whatever the client sent
    assert "not a length" in check(header, bytes(48), "99999")
    assert "not a length" in check(header, bytes(48), "-1")
    # an unknown datatype is Triton's to name (400); its data are not counted here
    assert check({"inputs": [{**images, "datatype": "FP8X"}]}) is None


def test_the_http_front_inflates_within_its_limit():
    """gzip and deflate bodies are inflated by zlib told the most it may write: a stream that
    would be larger is refused after ``limit + 1`` bytes; a truncated stream, or one with
    bytes after its end, is not taken."""
    import gzip
    import zlib

    from surgery_edge.runtime.http_front import _WBITS, _inflate

    body = b'{"inputs": []}' * 100
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        assert _inflate(packed, _WBITS[encoding], len(body)) == body
        assert _inflate(packed, _WBITS[encoding], len(body) - 1) is True
        assert _inflate(packed[:-6], _WBITS[encoding], 10**6) is False  # truncated
        assert _inflate(packed + b"x", _WBITS[encoding], 10**6) is False
    assert _inflate(b"not deflate at all", _WBITS["deflate"], 10**6) is False

"""An engine's recorded preprocessing: written and read back unchanged, and every bad field
refused with a message naming it (``engine_format.Preprocessing``; fast, no engine)."""

from __future__ import annotations

import pytest

from surgery_edge.engine_format import Preprocessing
from surgery_edge.errors import ExportError

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.mark.parametrize(
    "resize, interpolation, crop",
    [
        ("shortest", "bicubic", "center"),
        ("squash", "bilinear", "none"),
        ("shortest", "nearest", "center"),
    ],
)
def test_preprocessing_reads_back_what_was_written(resize, interpolation, crop):
    written = Preprocessing(224, MEAN, STD, resize, interpolation)
    d = written.to_dict()
    assert d == {
        "image_size": 224,
        "mean": list(MEAN),
        "std": list(STD),
        "resize": resize,
        "interpolation": interpolation,
        "crop": crop,
        "channels": "RGB",
        "scale": "1/255",
        "layout": "NCHW",
    }
    assert Preprocessing.from_dict(d, "e.onnx") == written


def test_missing_resize_and_interpolation_mean_open_clips_defaults():
    read = Preprocessing.from_dict({"image_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}, "e")
    assert (read.resize, read.interpolation) == ("shortest", "bicubic")
    assert read.mean == (0.0, 0.0, 0.0) and isinstance(read.mean[0], float)


GOOD = {"image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"image_size": 0}, r"image_size must be a positive integer, got 0"),
        ({"image_size": True}, r"image_size must be a positive integer, got True"),
        ({"image_size": 16.0}, r"image_size must be a positive integer"),
        ({"mean": [0.5, 0.5]}, r"\.mean must be three finite numbers, got \[0\.5, 0\.5\]"),
        ({"mean": [0.5, float("nan"), 0.5]}, r"\.mean must be three finite numbers"),
        ({"mean": [0.5, True, 0.5]}, r"\.mean must be three finite numbers"),
        ({"mean": "0.5"}, r"\.mean must be three finite numbers"),
        ({"std": [0.25, 0.0, 0.25]}, r"\.std must be three finite numbers > 0"),
        ({"std": [0.25, -1, 0.25]}, r"\.std must be three finite numbers > 0"),
        ({"resize": "stretch"}, r"resize 'stretch' is not one of \['shortest', 'squash'\]"),
        ({"interpolation": "lanczos"}, r"interpolation 'lanczos' is not one of \['bicubic'"),
        ({"resize": "bilinear-antialias"}, r"exported by surgery-edge 0\.1 .* Re-export it"),
    ],
)
def test_a_bad_field_is_refused_naming_it(change, match):
    with pytest.raises(ExportError, match=match) as refused:
        Preprocessing.from_dict({**GOOD, **change}, "engine.onnx")
    assert "engine.onnx" in str(refused.value)


def test_preprocessing_that_is_not_an_object_is_refused():
    with pytest.raises(ExportError, match=r"preprocessing is a list, not an object; re-export"):
        Preprocessing.from_dict([16], "engine.onnx")

"""Preprocessing follows the arguments it is given: the engine's resize and interpolation, and
the pixel limit, at their edges (the transform itself is in test_preprocess.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from surgery_edge.engine_format import Preprocessing
from surgery_edge.errors import ExportError
from surgery_edge.runtime.preprocess import check_max_pixels, normalise, preprocess, resize_crop

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (13, 21, 3), np.uint8))


def test_the_defaults_are_shortest_side_and_bicubic():
    image = _image()
    np.testing.assert_array_equal(
        resize_crop(image, 8), resize_crop(image, 8, "shortest", "bicubic")
    )
    for other in (("squash", "bicubic"), ("shortest", "nearest")):
        assert not np.array_equal(resize_crop(image, 8), resize_crop(image, 8, *other))


@pytest.mark.parametrize(
    ("resize", "interpolation"), [("squash", "nearest"), ("shortest", "bilinear")]
)
def test_preprocess_uses_the_given_resize_and_interpolation(resize, interpolation):
    pre = Preprocessing(8, MEAN, STD, resize, interpolation)
    images = [np.asarray(_image(s)) for s in range(3)]
    got = preprocess(images, pre)
    want = normalise(
        np.stack([resize_crop(Image.fromarray(a), 8, resize, interpolation) for a in images]),
        MEAN,
        STD,
    )
    assert got.dtype == np.float32 and got.shape == (3, 3, 8, 8)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_pixel_limit_of_one_is_a_limit():
    assert check_max_pixels(1) == 1
    assert check_max_pixels(np.int64(5)) == 5
    with pytest.raises(ExportError, match="at least 1, not 0"):
        check_max_pixels(0)

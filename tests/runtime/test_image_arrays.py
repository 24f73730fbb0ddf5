"""Arrays handed to the runtime as images: which are taken, how they become uint8 RGB, and the
message for the rest (``runtime/preprocess.py``; fast, no engine)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from surgery_edge.errors import ExportError
from surgery_edge.runtime.preprocess import array_to_pil, to_rgb_array


def test_floats_in_0_1_are_scaled_and_rounded_to_uint8():
    got = to_rgb_array(np.array([[0.0, 0.5, 0.2, 1.0]], np.float32))
    assert got.dtype == np.uint8 and got.shape == (1, 4, 3)
    assert got[0, :, 0].tolist() == [0, 128, 51, 255]  # rint(x * 255)
    assert (got == got[..., :1]).all()  # grey repeated to three channels


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.01, 1.01])
def test_floats_outside_0_1_or_not_finite_are_refused(bad):
    image = np.full((2, 2, 3), 0.5)
    image[1, 1, 2] = bad
    with pytest.raises(ExportError, match=r"finite values in \[0, 1\].*uint8 for 0-255"):
        to_rgb_array(image)


def test_integers_and_booleans_in_0_255_are_taken_as_they_are():
    ints = np.array([[[0, 17, 255]]], np.int64)
    assert to_rgb_array(ints).tolist() == [[[0, 17, 255]]]
    assert to_rgb_array(ints).dtype == np.uint8
    assert to_rgb_array(np.array([[True, False]])).tolist() == [[[1, 1, 1], [0, 0, 0]]]


@pytest.mark.parametrize("bad", [-1, 256])
def test_integers_outside_0_255_are_refused(bad):
    with pytest.raises(ExportError, match=r"values in 0-255 \(dtype int16\)"):
        to_rgb_array(np.array([[[0, bad, 3]]], np.int16))


def test_other_dtypes_are_refused_by_name():
    with pytest.raises(ExportError, match="dtype complex128 is not supported; use uint8"):
        to_rgb_array(np.zeros((2, 2, 3), np.complex128))


@pytest.mark.parametrize("shape", [(4, 4, 2), (0, 4, 3), (4, 0), (2, 4, 4, 3), (5,)])
def test_arrays_that_are_not_images_are_refused_with_their_shape(shape):
    with pytest.raises(ExportError, match=rf"shape {re.escape(str(shape))} is not an image"):
        to_rgb_array(np.zeros(shape, np.uint8))


def test_alpha_is_dropped_and_each_array_becomes_the_pil_mode_of_its_channels():
    rgba = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert to_rgb_array(rgba).tolist() == rgba[..., :3].tolist()
    for array, mode in [
        (rgba[..., 0], "L"),
        (rgba[..., :1], "L"),
        (rgba[..., :3], "RGB"),
        (rgba, "RGBA"),
    ]:
        image = array_to_pil(array)
        assert image.mode == mode and image.size == (3, 2)
        assert np.array_equal(np.asarray(image).reshape(array.shape), array)
    assert array_to_pil(np.full((1, 1), 0.5)).getpixel((0, 0)) == 128  # floats scaled first

"""The runtime's preprocessing is open_clip's eval transform, bit for bit, without torch."""

from __future__ import annotations

import numpy as np
import pytest
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform
from PIL import Image

from surgery_edge.engine_format import Preprocessing
from surgery_edge.runtime import preprocess

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (375, 500, 3), np.uint8)
IMAGES = {
    "wide": Image.fromarray(RGB),
    "tall": Image.fromarray(RNG.integers(0, 256, (301, 120, 3), np.uint8)),
    "grey": Image.fromarray(RNG.integers(0, 256, (200, 333), np.uint8), "L"),
    "palette": Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE),
    "rgba": Image.fromarray(RNG.integers(0, 256, (250, 180, 4), np.uint8), "RGBA"),
    "16-bit": Image.fromarray(RNG.integers(0, 65535, (90, 140), np.uint16)),
    "tiny": Image.fromarray(RNG.integers(0, 256, (1, 2, 3), np.uint8)),
    "one-pixel": Image.fromarray(RNG.integers(0, 256, (1, 1, 3), np.uint8)),
}


@pytest.mark.parametrize("size", [224, 336])  # ViT-B/32 and ViT-L/14@336 input sizes
@pytest.mark.parametrize("kind", list(IMAGES))
def test_matches_open_clip_eval_transform(kind, size):
    image = IMAGES[kind]
    reference = image_transform(
        size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD
    )(image).numpy()
    ours = preprocess([image], Preprocessing(size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    assert ours.shape == (1, 3, size, size) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[0], reference)  # exact: the same PIL ops and arithmetic


def test_squash_and_bilinear_follow_open_clip():
    pre = Preprocessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "squash", "bilinear")
    reference = image_transform(
        64,
        is_train=False,
        mean=pre.mean,
        std=pre.std,
        resize_mode="squash",
        interpolation="bilinear",
    )(IMAGES["wide"]).numpy()
    np.testing.assert_array_equal(preprocess([IMAGES["wide"]], pre)[0], reference)


def test_arrays_keep_their_mode_until_resized():
    """An (H, W, 4) array is resized as RGBA, as the same image given as PIL would be."""
    rgba = np.asarray(IMAGES["rgba"])
    pre = Preprocessing(32, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    np.testing.assert_array_equal(preprocess([rgba], pre), preprocess([IMAGES["rgba"]], pre))

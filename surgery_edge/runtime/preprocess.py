"""Turning what a user hands the runtime (files, PIL images, arrays) into engine input.

The engine's metadata gives the preprocessing: RGB, scaled to [0, 1], resized to the model's
size (bilinear with antialiasing, as :func:`surgery_edge.data.transforms.to_model_input` does in
training and evaluation, so an engine sees exactly what the PyTorch model saw), normalised with
the architecture's mean and std.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.errors import ExportError

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray


def describe(image: ImageLike, index: int) -> str:
    """A short name for an input image, for results and error messages."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"image[{index}]"


def to_rgb_array(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array -> (H, W, 3) uint8 RGB.

    Grey images are repeated to three channels and an alpha channel is dropped (as PIL's
    ``convert("RGB")`` does). Floating-point arrays must hold values in [0, 1].
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ExportError(
            f"an array of shape {tuple(np.shape(array))} is not an image: expected (H, W) or "
            "(H, W, C) with C = 1, 3 or 4 (channels last)."
        )
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ExportError(
                "a floating-point image must hold finite values in [0, 1]; pass uint8 for 0-255."
            )
        a = np.rint(a * 255.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        if a.min() < 0 or a.max() > 255:
            raise ExportError(f"an integer image must hold values in 0-255 (dtype {a.dtype}).")
        a = a.astype(np.uint8)
    else:
        raise ExportError(f"an image array of dtype {a.dtype} is not supported; use uint8.")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def load_image(image: ImageLike) -> np.ndarray:
    """A file path, PIL image or array -> (H, W, 3) uint8 RGB; ExportError if it is not one."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ExportError(f"image file {path} does not exist.")
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ExportError(
                f"{path} is not a readable image ({type(e).__name__}: {e})."
            ) from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return to_rgb_array(image)
    raise ExportError(
        f"cannot read an image from a {type(image).__name__}; pass a file path, a PIL image or "
        "an (H, W, 3) uint8 array."
    )


def normalise(
    images: Sequence[np.ndarray],  # each (H, W, 3) uint8, any size
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:  # (N, 3, size, size) float32
    """Scale to [0, 1], resize to ``size`` (bilinear, antialiased), normalise with mean/std."""
    import torch
    import torch.nn.functional as F

    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = np.empty((len(images), 3, size, size), np.float32)
    for i, image in enumerate(images):
        x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255.0  # a copy: may be read-only
        if x.shape[-2:] != (size, size):
            x = F.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        out[i] = ((x - m) / s)[0].numpy()
    return out

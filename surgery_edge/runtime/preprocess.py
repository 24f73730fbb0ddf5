"""Turning what a user hands the runtime (files, PIL images, arrays) into engine input.

This is the one implementation of the preprocessing, in PIL and numpy only: the runtime applies
it to every request, the dataset cache (:mod:`surgery_edge.data.disk`) to every image it decodes,
and evaluation (:func:`surgery_edge.data.transforms.to_model_input`) to images of another size,
so an engine sees exactly what the measured model saw.

It is open_clip's eval transform (``open_clip.image_transform(size, is_train=False)``), step by
step: resize (the shorter side to ``size`` with the longer one keeping the aspect ratio, then a
centre crop; or ``squash`` to the square) with the recorded interpolation, *in the image's own
mode*; convert to RGB; scale to [0, 1]; normalise with mean and std; channels first. The order
matters for palette and RGBA images, as it does in open_clip: a palette image is resized with
nearest-neighbour (PIL's rule), an RGBA one with premultiplied alpha, and only then converted.

Decoding is bounded: a file or encoded bytes whose header declares more than ``max_pixels``
pixels is refused before any pixel is decoded (PIL's own decompression-bomb error becomes the
same per-image :class:`~surgery_edge.errors.ExportError`), so one hostile image costs a header
read, not gigabytes. And it is allowed only the formats in :data:`IMAGE_FORMATS`, which Pillow
decodes itself: left to guess, Pillow opens EPS by running Ghostscript (``gs``), so the bytes of
one request or file would choose a program to run. Every decoder of the project (the runtime,
``predict``, the server, the image-folder datasets) opens images through :func:`open_image_file`.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from surgery_edge.engine_format import Preprocessing
from surgery_edge.errors import ExportError

ImageLike = Any  # str | os.PathLike | bytes (encoded) | PIL.Image.Image | np.ndarray
ENCODED = (bytes, bytearray, memoryview)  # an encoded image file held in memory (PNG, JPEG, ...)
# The most pixels a file or encoded image may declare: PIL's own warning threshold
# (``Image.MAX_IMAGE_PIXELS``, ~89.5 megapixels, ~256 MiB as RGB); it errors at twice that.
DEFAULT_MAX_PIXELS = 89_478_485

# The formats an image may have (Pillow's names; PPM also reads PGM and PBM): the ones photos and
# datasets come in, each decoded by Pillow's own code, none by an external program.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def describe(image: ImageLike, index: int) -> str:
    """A short name for an input image, for results and error messages."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"image[{index}]"


def check_max_pixels(max_pixels: int) -> int:
    """``max_pixels`` if it is a positive integer; ExportError otherwise."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)):
        raise ExportError(f"max_pixels must be a positive integer, not {max_pixels!r}.")
    if max_pixels < 1:
        raise ExportError(f"max_pixels must be at least 1, not {max_pixels}.")
    return int(max_pixels)


def _uint8_image(array: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) with C = 1, 3 or 4, any real dtype -> (H, W, C) uint8."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ExportError(
            f"an array of shape {tuple(np.shape(array))} is not an image: expected (H, W) or "
            "(H, W, C) with C = 1, 3 or 4 (channels last)."
        )
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ExportError(
                "a floating-point image must hold finite values in [0, 1]; pass uint8 for 0-255."
            )
        return np.rint(a * 255.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        if a.min() < 0 or a.max() > 255:
            raise ExportError(f"an integer image must hold values in 0-255 (dtype {a.dtype}).")
        return a.astype(np.uint8)
    raise ExportError(f"an image array of dtype {a.dtype} is not supported; use uint8.")


def to_rgb_array(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array -> (H, W, 3) uint8 RGB.

    Grey images are repeated to three channels and an alpha channel is dropped (as PIL's
    ``convert("RGB")`` does). Floating-point arrays must hold values in [0, 1].
    """
    a = _uint8_image(array)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def array_to_pil(array: np.ndarray) -> Image.Image:
    """An image array -> a PIL image of the matching mode (L, RGB or RGBA), not yet RGB."""
    a = _uint8_image(array)
    return Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))


def open_image(image: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A file path, encoded bytes, PIL image or array -> a PIL image (any mode).

    A file or encoded image is decoded fully here, so a truncated one fails now; one that
    declares more than ``max_pixels`` pixels is refused from its header, before decoding. PIL
    images and arrays are already decoded and are taken as they are.

    Raises:
        ExportError: naming the file (or ``encoded image``) and what is wrong with it.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ExportError(f"image file {path} does not exist.")
        return _decode(path, str(path), max_pixels)
    if isinstance(image, ENCODED):
        return _decode(io.BytesIO(image), f"an encoded image of {len(image)} bytes", max_pixels)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return array_to_pil(image)
    raise ExportError(
        f"cannot read an image from a {type(image).__name__}; pass a file path, encoded bytes, "
        "a PIL image or an (H, W, 3) uint8 array."
    )


def open_image_file(source: str | os.PathLike | io.BytesIO, name: str | None = None) -> Image.Image:
    """``PIL.Image.open`` limited to :data:`IMAGE_FORMATS` (lazy: the pixels are decoded on
    ``load``).

    Raises:
        UnidentifiedImageError: the data is no image of those formats (an EPS, PDF or any other
            file), with a message naming ``name`` (default: the path) and the formats.
        OSError: the file cannot be read.
    """
    try:
        return Image.open(source, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(
            f"{name or source} is not a readable image in an allowed format "
            f"({', '.join(IMAGE_FORMATS)}; others, such as EPS or PDF, are refused so that no "
            "external decoder runs on them). Convert it to PNG or JPEG."
        ) from None


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    """Open ``source``, check its declared size against ``max_pixels``, then decode it."""
    max_pixels = check_max_pixels(max_pixels)
    limit = f"the limit is max_pixels={max_pixels:,}"
    try:
        with warnings.catch_warnings():  # PIL warns above its threshold; max_pixels decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = open_image_file(source, name)
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise ExportError(
                    f"{name} declares {width}x{height} = {width * height:,} pixels; {limit} "
                    "(a decompression bomb, or a larger image than allowed: raise max_pixels "
                    "to accept it)."
                )
            im.load()
            return im
    except Image.DecompressionBombError as e:  # PIL's own check, at twice its warning threshold
        raise ExportError(f"{name} is too large to decode ({e}); {limit}.") from None
    except UnidentifiedImageError as e:
        raise ExportError(str(e)) from None
    except (OSError, EOFError, ValueError, SyntaxError) as e:
        raise ExportError(f"{name} is not a readable image ({type(e).__name__}: {e}).") from None


def resize_crop(
    image: Image.Image, size: int, resize: str = "shortest", interpolation: str = "bicubic"
) -> np.ndarray:  # (size, size, 3) uint8
    """The geometric part of the eval transform, then RGB: a PIL image -> (S, S, 3) uint8.

    Sizes and offsets are computed as torchvision's ``Resize(int)`` and ``CenterCrop`` do.
    ``resize`` and ``interpolation`` take the values :class:`Preprocessing` records.
    """
    resample = _RESAMPLE[interpolation]
    width, height = image.size
    if resize == "squash":
        target = (size, size)
    elif width <= height:
        target = (size, int(size * height / width))
    else:
        target = (int(size * width / height), size)
    if target != image.size:
        image = image.resize(target, resample)
    if resize == "shortest":
        top = int(round((target[1] - size) / 2.0))
        left = int(round((target[0] - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def normalise(
    images: np.ndarray | Sequence[np.ndarray],  # (N, S, S, 3) uint8
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:  # (N, 3, S, S) float32
    """Scale to [0, 1] and normalise, in float32 with torchvision's arithmetic (x / 255,
    then (x - mean) / std), so the result is bit-identical to ``ToTensor`` + ``Normalize``."""
    x = np.asarray(images, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, np.float32).reshape(1, 1, 1, 3)
    s = np.asarray(std, np.float32).reshape(1, 1, 1, 3)
    return np.ascontiguousarray(((x - m) / s).transpose(0, 3, 1, 2))


def preprocess(
    images: Sequence[ImageLike], pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Images of any kind and size -> (N, 3, S, S) float32 engine input."""
    size = pre.image_size
    batch = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        batch[i] = resize_crop(open_image(image, max_pixels), size, pre.resize, pre.interpolation)
    return normalise(batch, pre.mean, pre.std)

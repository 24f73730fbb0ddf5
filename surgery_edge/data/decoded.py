"""Decoding a task's split once into a memory-mapped ``.npy`` cache (:mod:`surgery_edge.data.disk`'s
folder and torchvision sources both go through it).

``<cache_dir>/<task>-<split>-<key>.x.npy`` / ``.y.npy`` hold the split's uint8 images (N, S, S, 3)
at the model's input size S and int64 labels (N,); the key hashes everything the arrays depend on
(the sources' description, the image size, the cache version), so a changed dataset is decoded
again and an unchanged one never. Images are decoded in threads and streamed to the file, so a
split larger than memory is never held whole.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from surgery_edge.errors import DataError
from surgery_edge.io import atomic_path, sha256_file, write_json_atomic
from surgery_edge.progress import progress_bar
from surgery_edge.runtime.preprocess import resize_crop

_CACHE_VERSION = "disk-v2"  # bump when preprocessing or the cache layout changes
_NPY_HEADER_BYTES = 128  # fixed, so the header can be rewritten in place (see _npy_header)


def preprocess_image(image: Image.Image, size: int) -> np.ndarray:  # (size, size, 3) uint8
    """CLIP's eval transform up to ``ToTensor``: the shorter side to ``size`` (bicubic), centre
    crop, RGB; the runtime's own :func:`~surgery_edge.runtime.preprocess.resize_crop`, so the
    cache holds exactly what an exported engine is fed."""
    return resize_crop(image, size)


@dataclass
class Split:
    """One split to decode: its items, how to load and name one, and what its cache key hashes."""

    name: str  # train | adapt | test
    where: str  # for messages
    items: Sequence[Any]
    load: Callable[[Any], tuple[Image.Image, int]]
    describe: Callable[[Any], str]
    key: dict[str, Any]


@dataclass
class Loader:
    """Decodes the splits of one task into ``cache_dir`` (or opens them from it)."""

    task: Any  # the disk.DiskTask being read; its name names the cache files and messages
    image_size: int
    cache_dir: Path
    log: Callable[[str], Any]
    workers: int

    def load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """The split's (images, labels), memory-mapped from the cache; decoded on a miss."""
        key_parts = dict(split.key, version=_CACHE_VERSION, split=split.name, size=self.image_size)
        blob = json.dumps(key_parts, sort_keys=True, default=str).encode()
        key = hashlib.sha1(blob).hexdigest()[:12]
        stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', self.task.name)}-{split.name}-{key}"
        x_path = self.cache_dir / f"{stem}.x.npy"
        y_path = self.cache_dir / f"{stem}.y.npy"
        cached = self._open_cached(x_path, y_path)
        if cached is not None and self._intact(x_path, y_path):
            return cached
        self._decode(split, x_path, y_path)
        write_json_atomic(_digest_path(x_path), _digests(x_path, y_path))  # after both files
        return np.load(x_path, mmap_mode="r"), np.load(y_path, mmap_mode="r")

    def _intact(self, x_path: Path, y_path: Path) -> bool:
        """Whether the cached split is byte for byte what its decoding wrote (the SHA-256s
        recorded then): a split changed in place would train and evaluate on other images
        without a word. One written before the digests were recorded is decoded again."""
        try:
            recorded = json.loads(_digest_path(x_path).read_text())
        except (OSError, ValueError):
            return False
        if recorded == _digests(x_path, y_path):
            return True
        warnings.warn(
            f"Task {self.task.name!r}: the decoded images {x_path.name} or labels {y_path.name} "
            f"in {self.cache_dir} changed since they were decoded (their SHA-256 differs from "
            "the one recorded then); decoding the split again from its source.",
            stacklevel=3,
        )
        return False

    def _open_cached(self, x_path: Path, y_path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        if not (x_path.is_file() and y_path.is_file()):
            return None
        try:
            x, y = np.load(x_path, mmap_mode="r"), np.load(y_path, mmap_mode="r")
        except (OSError, ValueError, EOFError):  # EOFError: an empty file
            return None  # damaged by hand: decode again, which replaces both files
        size = self.image_size
        if x.dtype != np.uint8 or x.shape[1:] != (size, size, 3) or y.shape != x.shape[:1]:
            return None
        return x, y

    def _decode(self, split: Split, x_path: Path, y_path: Path) -> None:
        """Decode ``split`` in threads, in order, streaming the images into ``x_path``.

        Images are written as they come, under a header rewritten at the end with the count of
        readable ones, so a split larger than memory never has to be held whole.
        """
        start = time.perf_counter()
        size = self.image_size
        labels: list[int] = []
        failures: list[str] = []
        chunk = 32 * self.workers  # bounds how many decoded images wait in memory

        def decode(item: Any) -> tuple[np.ndarray | None, int | str]:
            try:
                image, label = split.load(item)
                return preprocess_image(image, size), label
            except Exception as e:  # any failure marks this one image unreadable
                return None, f"{split.describe(item)} ({type(e).__name__}: {e})"

        with (
            atomic_path(x_path) as tmp,
            open(tmp, "wb") as f,
            ThreadPoolExecutor(self.workers) as pool,
        ):
            f.write(_npy_header((len(split.items), size, size, 3)))
            bar_name = f"decode {self.task.name} {split.name}"
            with progress_bar(len(split.items), bar_name) as bar:
                for begin in range(0, len(split.items), chunk):
                    batch = split.items[begin : begin + chunk]
                    for image, label in pool.map(decode, batch):
                        if image is None:
                            failures.append(label)
                        else:
                            f.write(image.tobytes())
                            labels.append(label)
                    bar.advance(len(batch))
            if not labels:
                raise DataError(
                    f"Task {self.task.name!r}: none of the {len(split.items)} images of "
                    f"{split.where} could be read, e.g. {'; '.join(failures[:3])}. Check that "
                    "these files are images Pillow can open."
                )
            if failures:
                f.seek(0)
                f.write(_npy_header((len(labels), size, size, 3)))
        with atomic_path(y_path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(labels, dtype=np.int64))
        if failures:
            warnings.warn(
                f"Task {self.task.name!r}: skipped {len(failures)} unreadable image(s) of "
                f"{len(split.items)} in {split.where}, e.g. {'; '.join(failures[:3])}.",
                stacklevel=2,
            )
        self.log(
            f"{self.task.name}: decoded {len(labels)} {split.name} images at {size}px from "
            f"{split.where} into {x_path} ({time.perf_counter() - start:.1f} s)"
        )


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy (format 1.0) header for C-order uint8 data of ``shape``, always 128 bytes long.

    The fixed length lets the header be rewritten in place once the count of readable images is
    known. The layout is numpy's documented one: magic, version, little-endian uint16 length,
    then a space-padded dict literal ending in a newline.
    """
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape!r}, }}"
    text = text.ljust(_NPY_HEADER_BYTES - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def sample(n: int, k: int, seed: int) -> list[int]:
    """``min(k, n)`` distinct indices of ``range(n)`` drawn with ``seed``, sorted."""
    if k >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def empty(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)


def _digest_path(x_path: Path) -> Path:
    """``<stem>.x.npy`` -> ``<stem>.sha256.json``: the split's digests, written last."""
    return x_path.with_name(x_path.name.removesuffix(".x.npy") + ".sha256.json")


def _digests(x_path: Path, y_path: Path) -> dict[str, str]:
    return {"x": sha256_file(x_path), "y": sha256_file(y_path)}

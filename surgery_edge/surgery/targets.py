"""Expert targets for the unsupervised objective, computed once and cached on disk.

For each task the trainer needs, per training image, the expert's final feature (e,) and, for
SurgeryV2, the token mean of every block output (L, d). They never change during training, so
they are computed in one pass and written as ``.npy`` files that are memory-mapped when read,
with a record of their shapes and checksums: a damaged cache is rebuilt, never trained on.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from surgery_edge.data.transforms import to_model_input
from surgery_edge.errors import CheckpointError
from surgery_edge.io import HashCache, atomic_path, fingerprint, write_json_atomic
from surgery_edge.models.encoder import ImageEncoder


@torch.no_grad()
def representations(
    encoder: ImageEncoder, images: np.ndarray, device: torch.device, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(final (N, e), block token means (N, L, d)) of uint8 images through a plain encoder."""
    encoder.eval()
    finals, blocks = [], []
    for i in range(0, len(images), batch_size):
        x = to_model_input(images[i : i + batch_size], encoder.arch, device)
        final, outs = encoder.forward_with_blocks(x)
        finals.append(final.float().cpu())
        blocks.append(torch.stack([o.mean(dim=1) for o in outs], dim=1).float().cpu())
    return torch.cat(finals).numpy(), torch.cat(blocks).numpy()


class Representations(NamedTuple):
    """An expert's cached representations of some images, and the content hash of the cache."""

    final: np.ndarray  # (N, e) float32, memory-mapped
    blocks: np.ndarray  # (N, L, d) float32, memory-mapped
    digest: str  # identity of both files' content (for the provenance of adapters)


def cached_representations(
    cache_dir: str | Path,
    key: str,
    encoder_fn: Callable[[], ImageEncoder],
    images: np.ndarray,
    device: torch.device,
    hashes: HashCache | None = None,
    warn: Callable[[str], Any] | None = None,
) -> Representations:
    """Load ``key``'s representations from ``cache_dir`` (memory-mapped) or compute and save.

    A cache entry is two ``.npy`` files and a ``.json`` record of their shapes, dtype and
    SHA-256. It is used only when all of them agree and every value is finite; a missing,
    truncated, edited or non-finite entry is rebuilt, with a warning when it existed.

    Args:
        key: identifies the encoder and the images (content hashes, never paths).
        encoder_fn: called only on a cache miss; returns the :class:`ImageEncoder`.
        hashes: remembers the files' hashes between calls (default: hash them every time).
        warn: receives the warning when a damaged entry is rebuilt (default: ``warnings.warn``).

    Raises:
        CheckpointError: the encoder itself gives non-finite representations.
    """
    cache = Path(cache_dir)
    hashes = hashes or HashCache()
    paths = {"final": cache / f"{key}.final.npy", "blocks": cache / f"{key}.blocks.npy"}
    record_path = cache / f"{key}.json"
    if any(p.exists() for p in [record_path, *paths.values()]):
        problem = _cache_problem(record_path, paths, len(images), hashes)
        if problem is None:
            final, blocks = (np.load(paths[k], mmap_mode="r") for k in ("final", "blocks"))
            return Representations(final, blocks, _digest(record_path))
        (warn or _warn)(f"Representation cache {record_path.with_suffix('')}.* {problem}; rebuilt.")
    final, blocks = representations(encoder_fn(), images, device)
    if not (np.isfinite(final).all() and np.isfinite(blocks).all()):
        raise CheckpointError(
            f"The expert behind cache entry {key} gives non-finite representations (NaN or "
            "infinity) for its images: its checkpoint is broken. Re-create it."
        )
    record: dict[str, Any] = {"key": key, "images": len(images)}
    for name, arr in (("final", final), ("blocks", blocks)):
        with atomic_path(paths[name]) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
        record[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "sha256": hashes.digest(paths[name]),
        }
    write_json_atomic(record_path, record)  # last: an entry without its record is rebuilt
    final, blocks = (np.load(paths[k], mmap_mode="r") for k in ("final", "blocks"))
    return Representations(final, blocks, _digest(record_path))


def _cache_problem(
    record_path: Path, paths: dict[str, Path], n: int, hashes: HashCache
) -> str | None:
    """Why a cache entry cannot be trusted, or None when it can."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return "has no readable record"
    if not isinstance(record, dict) or record.get("images") != n:
        return f"was made for other images (record {record_path.name} does not say {n} images)"
    shapes = {}
    for name, path in paths.items():
        entry = record.get(name)
        if not isinstance(entry, dict) or not path.is_file():
            return f"lacks its {name} file"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            return f"has an unreadable {name} file ({e})"
        if list(arr.shape) != entry.get("shape") or str(arr.dtype) != entry.get("dtype"):
            return f"has a {name} file of shape {arr.shape} {arr.dtype}, not the recorded one"
        if arr.dtype != np.float32 or len(arr) != n:
            return f"has a {name} file of {arr.dtype} {arr.shape}, not float32 for {n} images"
        if hashes.digest(path) != entry.get("sha256"):
            return f"has a {name} file whose content changed since it was written (checksum)"
        if not np.isfinite(arr).all():
            return f"has non-finite values in its {name} file"
        shapes[name] = arr.shape
    if shapes["final"][0] != shapes["blocks"][0] or len(shapes["blocks"]) != 3:
        return "has files of inconsistent shapes"
    return None


def _digest(record_path: Path) -> str:
    record = json.loads(record_path.read_text())
    return fingerprint(record["final"]["sha256"], record["blocks"]["sha256"])


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)

"""Expert targets for the unsupervised objective, computed once and cached on disk.

For each task the trainer needs, per training image, the expert's final feature (e,) and, for
SurgeryV2, the token mean of every block output (L, d). They never change during training, so
they are computed in one pass and written as ``.npy`` files that are memory-mapped when read,
with a record of their shapes and checksums: a damaged cache is rebuilt, never trained on.

In a distributed job (:mod:`surgery_edge.distributed`) the work is split by task and image:
every missing entry is cut into chunks of ``batch_size`` images (the chunks one process computes
too, so the numbers are the same bit for bit), the ranks compute contiguous runs of chunks (so
each loads only a few experts), and the writer (rank 0) streams them into the entries'
temporary files and publishes each entry whole: its two ``.npy`` files, then its record. A job
that loses a rank publishes nothing more; what it left are hidden temporary files that the next
writer of the same entry removes.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from surgery_edge.data.transforms import to_model_input
from surgery_edge.distributed import World
from surgery_edge.errors import CheckpointError
from surgery_edge.io import HashCache, atomic_path, fingerprint, write_json_atomic
from surgery_edge.models.encoder import ImageEncoder

BATCH = 256  # images per forward pass, and per unit of distributed work


@torch.no_grad()
def _chunk(encoder: ImageEncoder, images: np.ndarray, device: torch.device):
    """(final (n, e), block token means (n, L, d)) of one chunk of uint8 images."""
    x = to_model_input(images, encoder.arch, device)
    final, outs = encoder.forward_with_blocks(x)
    return final.float(), torch.stack([o.mean(dim=1) for o in outs], dim=1).float()


@torch.no_grad()
def representations(
    encoder: ImageEncoder, images: np.ndarray, device: torch.device, batch_size: int = BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """(final (N, e), block token means (N, L, d)) of uint8 images through a plain encoder."""
    encoder.eval()
    parts = [
        _chunk(encoder, images[i : i + batch_size], device)
        for i in range(0, len(images), batch_size)
    ]
    return (
        torch.cat([f.cpu() for f, _ in parts]).numpy(),
        torch.cat([b.cpu() for _, b in parts]).numpy(),
    )


class Representations(NamedTuple):
    """An expert's cached representations of some images, and the content hash of the cache."""

    final: np.ndarray  # (N, e) float32, memory-mapped
    blocks: np.ndarray  # (N, L, d) float32, memory-mapped
    digest: str  # identity of both files' content (for the provenance of adapters)


class Request(NamedTuple):
    """One cache entry to load or build."""

    key: str  # identifies the encoder and the images (content hashes, never paths)
    encoder_fn: Callable[[], ImageEncoder]  # called only where the entry must be computed
    images: np.ndarray  # (N, H, W, 3) uint8


class _Unit(NamedTuple):
    entry: int  # index into the requests
    start: int
    stop: int


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
    request = Request(key, encoder_fn, images)
    return cached_representations_many(cache_dir, [request], device, hashes, warn)[0]


def cached_representations_many(
    cache_dir: str | Path,
    requests: Sequence[Request],
    device: torch.device,
    hashes: HashCache | None = None,
    warn: Callable[[str], Any] | None = None,
    world: World | None = None,
    batch_size: int = BATCH,
    fresh: bool = False,
) -> list[Representations]:
    """:func:`cached_representations` for several entries, computed by every rank of ``world``.

    The writer decides which entries must be (re)built and tells the others; every rank computes
    its share of their chunks; the writer assembles and publishes them; then every rank opens
    every entry. One process (``world`` None) does all of it itself, writing the same files.

    Args:
        fresh: check the entries' checksums against their bytes, not the hash cache's stat
            (before training adapters that will be published from them).

    Raises:
        CheckpointError: an expert gives non-finite representations (nothing is published).
        DistributedError: a rank was lost (nothing partial is published).
    """
    world = world or World.single(device)
    cache = Path(cache_dir)
    hashes = hashes or HashCache()
    missing = []
    if world.is_writer:
        for i, request in enumerate(requests):
            paths, record_path = _paths(cache, request.key)
            if any(p.exists() for p in [record_path, *paths.values()]):
                problem = _cache_problem(record_path, paths, len(request.images), hashes, fresh)
                if problem is None:
                    continue
                (warn or _warn)(
                    f"Representation cache {record_path.with_suffix('')}.* {problem}; rebuilt."
                )
            missing.append(i)
    missing = world.broadcast(missing, "deciding which representations to compute")
    if missing:
        _build(cache, requests, missing, world, hashes, batch_size)
        world.barrier("publishing the representation cache")
    out = []
    for request in requests:
        paths, record_path = _paths(cache, request.key)
        final, blocks = (np.load(paths[k], mmap_mode="r") for k in ("final", "blocks"))
        out.append(Representations(final, blocks, _digest(record_path)))
    return out


def _paths(cache: Path, key: str) -> tuple[dict[str, Path], Path]:
    paths = {"final": cache / f"{key}.final.npy", "blocks": cache / f"{key}.blocks.npy"}
    return paths, cache / f"{key}.json"


def _build(
    cache: Path,
    requests: Sequence[Request],
    missing: list[int],
    world: World,
    hashes: HashCache,
    batch_size: int,
) -> None:
    """Compute the ``missing`` entries across ``world``; the writer publishes each one whole."""
    units = [
        _Unit(i, start, min(start + batch_size, len(requests[i].images)))
        for i in missing
        for start in range(0, len(requests[i].images), batch_size)
    ]
    loaded: dict[int, ImageEncoder] = {}  # the expert of the entry this rank is computing

    def compute(unit: _Unit) -> tuple[torch.Tensor, torch.Tensor]:
        if unit.entry not in loaded:
            loaded.clear()  # a rank's share is contiguous: one expert at a time
            loaded[unit.entry] = requests[unit.entry].encoder_fn().eval()
        images = requests[unit.entry].images[unit.start : unit.stop]
        return _chunk(loaded[unit.entry], images, world.device)

    with contextlib.ExitStack() as stack:
        writers = {i: _EntryWriter(cache, requests[i], hashes) for i in missing}
        if world.is_writer:
            for w in writers.values():
                stack.enter_context(w)

        def deliver(unit: _Unit, arrays: list[np.ndarray]) -> None:
            writers[unit.entry].write(unit.start, unit.stop, arrays)

        world.exchange(units, compute, deliver, what="computing the expert representations")
    loaded.clear()


class _EntryWriter:
    """Streams one entry's chunks into temporary files; publishes them when all have come."""

    def __init__(self, cache: Path, request: Request, hashes: HashCache):
        self.request, self.hashes = request, hashes
        self.paths, self.record_path = _paths(cache, request.key)
        self.n = len(request.images)
        self.done = 0
        self._stack = contextlib.ExitStack()
        self._arrays: dict[str, np.memmap] = {}
        self._tmp: dict[str, Path] = {}

    def __enter__(self) -> _EntryWriter:
        self._stack.__enter__()
        for name, path in self.paths.items():
            self._tmp[name] = self._stack.enter_context(atomic_path(path))
        return self

    def __exit__(self, *exc) -> bool:
        self._arrays.clear()  # close the memory maps before the temporary files go
        return self._stack.__exit__(*exc)

    def write(self, start: int, stop: int, arrays: list[np.ndarray]) -> None:
        if not all(np.isfinite(a).all() for a in arrays):
            raise CheckpointError(
                f"The expert behind cache entry {self.request.key} gives non-finite "
                "representations (NaN or infinity) for its images: its checkpoint is broken. "
                "Re-create it."
            )
        for name, chunk in zip(("final", "blocks"), arrays):
            if name not in self._arrays:
                self._arrays[name] = np.lib.format.open_memmap(
                    self._tmp[name], mode="w+", dtype=np.float32, shape=(self.n, *chunk.shape[1:])
                )
            self._arrays[name][start:stop] = chunk
        self.done += stop - start
        if self.done == self.n:
            self._publish()

    def _publish(self) -> None:
        for array in self._arrays.values():
            array.flush()
        self._arrays.clear()
        record: dict[str, Any] = {"key": self.request.key, "images": self.n}
        shapes = {}
        for name, tmp in self._tmp.items():
            arr = np.load(tmp, mmap_mode="r")
            shapes[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
            del arr
        self._stack.close()  # renames both files onto their final names
        for name, path in self.paths.items():
            record[name] = {**shapes[name], "sha256": self.hashes.digest(path)}
        write_json_atomic(self.record_path, record)  # last: an entry without its record is rebuilt


def _cache_problem(
    record_path: Path, paths: dict[str, Path], n: int, hashes: HashCache, fresh: bool = False
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
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            return f"has an unreadable {name} file ({type(e).__name__}: {e})"
        if list(arr.shape) != entry.get("shape") or str(arr.dtype) != entry.get("dtype"):
            return f"has a {name} file of shape {arr.shape} {arr.dtype}, not the recorded one"
        if arr.dtype != np.float32 or len(arr) != n:
            return f"has a {name} file of {arr.dtype} {arr.shape}, not float32 for {n} images"
        if hashes.digest(path, fresh=fresh) != entry.get("sha256"):
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

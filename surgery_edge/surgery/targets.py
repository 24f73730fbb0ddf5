"""Expert targets for the unsupervised objective, computed once and cached on disk.

For each task the trainer needs, per training image, the expert's final feature (e,) and, for
SurgeryV2, the token mean of every block output (L, d). They never change during training, so
they are computed in one pass and written as ``.npy`` files that are memory-mapped when read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from surgery_edge.data.transforms import to_model_input
from surgery_edge.io import atomic_path
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


def fingerprint(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    """Cheap identity of a checkpoint file: path, size and modification time."""
    st = Path(path).stat()
    return fingerprint(Path(path).resolve(), st.st_size, st.st_mtime_ns)


def cached_representations(
    cache_dir: str | Path, key: str, encoder_fn, images: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Load ``key``'s representations from ``cache_dir`` (memory-mapped) or compute and save.

    Args:
        key: identifies the encoder and the images (e.g. a checkpoint fingerprint and split).
        encoder_fn: called only on a cache miss; returns the :class:`ImageEncoder`.
    """
    cache = Path(cache_dir)
    final_p, blocks_p = cache / f"{key}.final.npy", cache / f"{key}.blocks.npy"
    if final_p.exists() and blocks_p.exists():
        final = np.load(final_p, mmap_mode="r")
        blocks = np.load(blocks_p, mmap_mode="r")
        if len(final) == len(images) == len(blocks):
            return final, blocks
    final, blocks = representations(encoder_fn(), images, device)
    for p, arr in ((final_p, final), (blocks_p, blocks)):
        with atomic_path(p) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    return np.load(final_p, mmap_mode="r"), np.load(blocks_p, mmap_mode="r")

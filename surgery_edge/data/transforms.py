"""Turning uint8 images into model input, using the architecture's size, mean and std."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from surgery_edge.models.archs import ArchSpec


def to_model_input(
    images: np.ndarray | torch.Tensor,  # (N, H, W, 3) uint8
    arch: ArchSpec,
    device: str | torch.device = "cpu",
) -> torch.Tensor:  # (N, 3, S, S) float32, normalised
    """Scale to [0, 1], resize to ``arch.image_size`` if needed, normalise with mean/std."""
    if isinstance(images, torch.Tensor):
        x = images.to(device)
    else:
        arr = np.asarray(images)
        if not arr.flags.writeable:  # a memory-mapped cache: read this batch into memory
            arr = np.array(arr)
        x = torch.from_numpy(arr).to(device)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != arch.image_size or x.shape[-2] != arch.image_size:
        x = F.interpolate(
            x,
            size=(arch.image_size, arch.image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    mean = torch.tensor(arch.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(arch.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std

"""Turning uint8 images into model input, using the architecture's size, mean and std.

Images of another size go through the runtime's preprocessing (:mod:`surgery_edge.runtime.
preprocess`, open_clip's eval transform), one implementation for training, evaluation and every
exported engine.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from surgery_edge.models.archs import ArchSpec
from surgery_edge.runtime.preprocess import resize_crop


def to_model_input(
    images: np.ndarray | torch.Tensor,  # (N, H, W, 3) uint8
    arch: ArchSpec,
    device: str | torch.device = "cpu",
) -> torch.Tensor:  # (N, 3, S, S) float32, normalised
    """Scale to [0, 1], resize to ``arch.image_size`` if needed, normalise with mean/std."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {tuple(images.shape)}")
    size = arch.image_size
    if tuple(images.shape[1:3]) != (size, size):
        pre = arch.preprocessing
        arrays = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
        images = np.stack(
            [
                resize_crop(Image.fromarray(np.asarray(a)), size, pre.resize, pre.interpolation)
                for a in arrays
            ]
        )
    if isinstance(images, torch.Tensor):
        x = images.to(device)
    else:
        arr = np.asarray(images)
        if not arr.flags.writeable:  # a memory-mapped cache: read this batch into memory
            arr = np.array(arr)
        x = torch.from_numpy(arr).to(device)
    # torchvision's arithmetic (x / 255, then (x - mean) / std), as the runtime's normalise
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(arch.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(arch.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std

"""Representation bias: how far the merged model's representations are from each expert's.

For task t and site s, the bias is the mean L1 distance (mean absolute difference over the
feature dimension, averaged over test images) between the merged model's representation
(after surgery, if any) and expert t's representation. Blocks are compared by the token mean
of their output, exactly the quantities the SurgeryV2 objective pulls together; ``final`` is
the projected image feature. The reported value per site is the mean over tasks.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery_edge.data.transforms import to_model_input
from surgery_edge.surgery.model import MultiTaskModel


@torch.no_grad()
def representation_bias(
    model: MultiTaskModel,
    images: dict[str, np.ndarray],  # task -> (N, H, W, 3) uint8
    expert_reps: dict[str, tuple[np.ndarray, np.ndarray]],  # task -> (final (N,e), blocks (N,L,d))
    device: torch.device,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean over tasks of the per-site L1 distance; keys ``block.0`` ... ``final``."""
    model.eval()
    arch = model.encoder.arch
    sums = np.zeros(arch.layers + 1)
    for t, task in enumerate(model.tasks):
        x_all = images[task]
        final_e, blocks_e = expert_reps[task]
        task_sum = np.zeros(arch.layers + 1)
        for i in range(0, len(x_all), batch_size):
            x = to_model_input(x_all[i : i + batch_size], arch, device)
            ids = torch.full((len(x),), t, dtype=torch.long, device=device)
            final, means = model.representations(x, ids)
            for layer, m in enumerate(means):
                ref = torch.from_numpy(np.array(blocks_e[i : i + batch_size, layer])).to(device)
                task_sum[layer] += (m - ref).abs().mean(-1).sum().item()
            ref = torch.from_numpy(np.array(final_e[i : i + batch_size])).to(device)
            task_sum[-1] += (final - ref).abs().mean(-1).sum().item()
        sums += task_sum / len(x_all)
    sums /= len(model.tasks)
    return {site: float(v) for site, v in zip(arch.sites, sums)}

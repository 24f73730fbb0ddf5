"""The surgery adapter's formula in plain PyTorch: ``z - W_up · ReLU(W_down · z)``.

The one definition of what an adapter computes: the Triton kernels' references
(``*_ref``) and every PyTorch path (the AdapterBank, through
:mod:`surgery_edge.surgery.functional`, and with it every exporter) call these functions.
Batched matrix products broadcast, so one formula covers one task, one task per row, a batch laid
out in runs of one task each, and every task at once; it computes in the inputs' dtype. It lives
with the kernels, which import nothing from ``surgery/`` (``surgery/`` builds on the kernels, not
the other way round).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def surgery_correction(
    z: torch.Tensor,  # (..., n, d)
    down: torch.Tensor,  # (..., r, d), broadcast against z's leading dimensions
    up: torch.Tensor,  # (..., d, r)
) -> torch.Tensor:  # (..., n, d)
    """``z - relu(z @ down^T) @ up^T``: every row of ``z`` corrected by its adapter."""
    # transpose(-1, -2), not .mT: the TorchScript ONNX exporter (the fallback) lacks aten::mT
    return z - F.relu(z @ down.transpose(-1, -2)) @ up.transpose(-1, -2)


def routed_correction(
    z: torch.Tensor,  # (B, N, d) or (B, d); row b belongs to task task_ids[b]
    task_ids: torch.Tensor,  # (B,) integer
    down: torch.Tensor,  # (T, r, d)
    up: torch.Tensor,  # (T, d, r)
) -> torch.Tensor:  # like z
    """Each image corrected by its own task's adapter (a gather, then one batched product)."""
    x = z.unsqueeze(1) if z.ndim == 2 else z
    out = surgery_correction(x, down[task_ids], up[task_ids])
    return out.squeeze(1) if z.ndim == 2 else out


def all_tasks_correction(
    z: torch.Tensor,  # (B, d)
    down: torch.Tensor,  # (T, r, d)
    up: torch.Tensor,  # (T, d, r)
) -> torch.Tensor:  # (T, B, d)
    """Every row corrected by every task's adapter."""
    return surgery_correction(z.unsqueeze(0), down, up)

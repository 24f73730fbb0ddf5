"""The surgery adapter as one function: ``z - W_up · ReLU(W_down · z)``.

Everything that applies an adapter calls :func:`surgery_correction`: the AdapterBank (routed and
all-tasks), the Triton kernels' PyTorch references, and through the bank every exporter. Batched
matrix products broadcast, so one formula covers one task, one task per row, a batch laid out
in runs of one task each, and every task at once; it computes in the inputs' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class TaskGroups:
    """A batch laid out by task: ``len(tasks)`` runs of ``rows`` consecutive rows, run ``g``
    belonging to task ``tasks[g]`` (as training builds its batches). It routes like per-row task
    ids, ``tasks.repeat_interleave(rows)``, but each run takes its adapter once: one product per
    run instead of a gathered copy of the adapter for every row, and no scatter of per-row
    gradients back into the bank."""

    tasks: torch.Tensor  # (G,) integer
    rows: int

    def task_ids(self) -> torch.Tensor:
        """The same routing as one task id per row."""
        return self.tasks.repeat_interleave(self.rows)


def grouped_correction(
    z: torch.Tensor,  # (G * rows, N, d) or (G * rows, d)
    groups: TaskGroups,
    down: torch.Tensor,  # (T, r, d)
    up: torch.Tensor,  # (T, d, r)
) -> torch.Tensor:  # like z
    """Each run of rows corrected by its task's adapter, all of a run's tokens in one product."""
    G = groups.tasks.shape[0]
    if z.shape[0] != G * groups.rows:
        raise ValueError(f"{z.shape[0]} rows are not {G} runs of {groups.rows}")
    out = surgery_correction(z.reshape(G, -1, z.shape[-1]), down[groups.tasks], up[groups.tasks])
    return out.view(z.shape)


def all_tasks_correction(
    z: torch.Tensor,  # (B, d)
    down: torch.Tensor,  # (T, r, d)
    up: torch.Tensor,  # (T, d, r)
) -> torch.Tensor:  # (T, B, d)
    """Every row corrected by every task's adapter."""
    return surgery_correction(z.unsqueeze(0), down, up)

"""The surgery adapter as one function: ``z - W_up · ReLU(W_down · z)``.

Everything that applies an adapter calls :func:`surgery_correction`: the AdapterBank (routed and
all-tasks), the Triton kernels' PyTorch references, and through the bank every exporter. The
formula itself is defined with the kernels (:mod:`surgery_edge.kernels.reference`, which imports
nothing from here); this module adds the task-grouped layout training uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery_edge.kernels.reference import (
    all_tasks_correction,
    routed_correction,
    surgery_correction,
)

__all__ = [
    "TaskGroups",
    "all_tasks_correction",
    "grouped_correction",
    "routed_correction",
    "surgery_correction",
]


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

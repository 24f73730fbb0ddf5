"""Surgery training's two update schedules (``SurgeryConfig.schedule``): which batches each
optimiser step draws, and, for ``reference``, Adam as the authors' loop drives it under torch
1.10 (see :mod:`~surgery_edge.surgery.trainer`).
"""

from __future__ import annotations

import numpy as np
import torch

from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.settings import SurgeryConfig

REFERENCE_VISIT = 2  # batches of one task per visit in the authors' loop


def reference_batch_indices(
    seed: int, iteration: int, task: int, n: int, batch: int, visit_batch: int
) -> torch.Tensor:
    """Batch ``visit_batch`` (0 or 1) of ``task`` in iteration ``iteration`` of the authors'
    loop: the first batches of a fresh shuffle of the task's ``n`` images (drawn without
    replacement; a task with fewer than two batches of images wraps round its shuffle)."""
    g = torch.Generator().manual_seed(((seed * 1_000_033 + iteration) * 1013 + task) % (2**63))
    order = torch.randperm(n, generator=g)
    need = (visit_batch + 1) * batch
    if need > n:
        order = order.repeat(-(-need // n))
    return order[visit_batch * batch : need]


def _batch_indices(seed: int, step: int, task: int, n: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + task) % (2**63))
    return torch.randint(0, n, (batch,), generator=g)


def schedule_length(cfg: SurgeryConfig, num_tasks: int) -> int:
    """Optimiser steps of a training run: ``steps``, or ``T x steps`` for ``reference``."""
    return cfg.steps * (num_tasks if cfg.schedule == "reference" else 1)


def schedule_draws(
    cfg: SurgeryConfig, update: int, sizes: list[int]
) -> list[tuple[int, np.ndarray]]:
    """The batches of optimiser step ``update``: ``[(task index, image indices), ...]``.

    ``joint``: one batch of every task. ``reference``: one batch of one task; iteration ``k``
    visits the tasks in order and takes ``REFERENCE_VISIT`` batches of each (fewer in a last,
    partial iteration when ``steps`` is not a multiple of it).
    """
    B, T = cfg.batch_size, len(sizes)
    if cfg.schedule == "joint":
        return [(i, _batch_indices(cfg.seed, update, i, n, B).numpy()) for i, n in enumerate(sizes)]
    full, per_iter = cfg.steps // REFERENCE_VISIT, T * REFERENCE_VISIT
    if update < full * per_iter:
        iteration, r = divmod(update, per_iter)
        task, b = divmod(r, REFERENCE_VISIT)
    else:  # the last, partial iteration: one batch of each task
        iteration, task, b = full, update - full * per_iter, 0
    idx = reference_batch_indices(cfg.seed, iteration, task, sizes[task], B, b)
    return [(task, idx.numpy())]


class ReferenceAdam:
    """torch.optim.Adam as the authors' loop drives it under torch 1.10.

    The reference keeps one module per task, so Adam holds one parameter per (task, site,
    weight): here a leaf per row of the bank's stacked tensors. A step copies the gradient of
    the tasks in the batch into their leaves; ``zero_grad`` zeroes gradients instead of freeing
    them, so a leaf that has had a gradient once takes part in every later step (moved by its
    momentum alone), while one that never had one is skipped, as torch's Adam skips a None
    gradient. The leaves are copied back into the bank after each step.
    """

    def __init__(self, bank: AdapterBank, lr: float):
        self.bank = bank
        self.rows = [(p, t) for p in bank.parameters() for t in range(p.shape[0])]
        self.leaves = [torch.nn.Parameter(p.detach()[t].clone()) for p, t in self.rows]
        self.opt = torch.optim.Adam(self.leaves, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 (as torch 1.10)
        for p in self.bank.parameters():
            p.grad = None
        for leaf in self.leaves:
            if leaf.grad is not None:
                leaf.grad.zero_()

    def step(self, tasks: set[int]) -> None:
        for (p, t), leaf in zip(self.rows, self.leaves):
            if t in tasks:  # the reference's graph reaches only these tasks' adapters
                if leaf.grad is None:
                    leaf.grad = p.grad[t].detach().clone()
                else:
                    leaf.grad.copy_(p.grad[t])
        self.opt.step()
        self._to_bank()

    @torch.no_grad()
    def _to_bank(self) -> None:
        for (p, t), leaf in zip(self.rows, self.leaves):
            p[t].copy_(leaf)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Adam's state, for adapters already loaded into the bank: the leaves take the bank's
        values, and every leaf Adam has stepped gets its zero gradient back."""
        with torch.no_grad():
            for (p, t), leaf in zip(self.rows, self.leaves):
                leaf.copy_(p[t])
                leaf.grad = None
        self.opt.load_state_dict(state)
        for leaf in self.leaves:
            if self.opt.state.get(leaf):
                leaf.grad = torch.zeros_like(leaf)

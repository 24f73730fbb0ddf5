"""AdaMerging: merge coefficients learned by entropy minimisation (Yang et al., ICLR 2024).

``merged = pretrained + sum_t lambda_t * tau_t``, with one ``lambda`` per task (task-wise) or one
per task and state-dict tensor (layer-wise). The coefficients start at ``init`` and are
learned with Adam so that the merged model is confident on unlabelled images of every task: the
loss of one step is ``sum_t mean_x H(softmax(head_t(encoder_merged(x))))`` over one batch per task.

Differences from the reference code, on purpose:

- The reference hard-codes coefficients learned earlier; here they are learned every time.
- The reference clamps the coefficients to [0, 1] in its forward pass; nothing is clamped here.
- The reference sums the loss of two batches of 16 per task per step; here one batch of
  ``context.batch_size`` per task (``batch_size=32`` is the same data per step, at half the loss
  scale, which Adam is insensitive to).
- The reference recomputes everything per step; here the task vectors are stacked once on the
  device and every task's batch goes through the encoder in a single call when shapes allow.

In a distributed job (``context.world``) every rank draws the same batches, keeps its share of
each batch's rows and weights its loss so that the gradient DistributedDataParallel averages is
the one-process gradient: every rank ends with the coefficients one process learns.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from surgery_edge.distributed import World
from surgery_edge.errors import ConfigError, MergeError, TrainingError
from surgery_edge.merging.base import (
    AdaMergingContext,
    MergeResult,
    StateDict,
    assemble,
    check_compatible,
    float_keys,
    task_vector,
)
from surgery_edge.merging.registry import Param, register


class _Coefficients(torch.nn.Module):
    """The merge coefficients as a module, so DistributedDataParallel can average their grads."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = torch.nn.Parameter(values)


class _Step(torch.nn.Module):
    """One step's loss as the forward of the module that owns the coefficients."""

    def __init__(self, coefficients: _Coefficients, loss: Callable[[int], torch.Tensor]):
        super().__init__()
        self.coefficients, self._loss = coefficients, loss

    def forward(self, step: int) -> torch.Tensor:
        return self._loss(step)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits), per row. logits: (B, C) -> (B,)."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def _check_context(
    method: str, pretrained: StateDict, tasks: list[str], context: AdaMergingContext | None
) -> None:
    if context is None:
        raise ConfigError(
            f"Merge method {method!r} learns its merge coefficients from unlabelled images of "
            "every task, so it needs an AdaMergingContext (encoder, heads, images); pass "
            "context=... (the CLI builds one from the task data), or use a method with fixed "
            "coefficients such as 'task_arithmetic'."
        )
    for field, mapping in (("heads", context.heads), ("images", context.images)):
        missing = [t for t in tasks if t not in mapping]
        if missing:
            raise ConfigError(
                f"Merge method {method!r}: the context has no {field} for task(s) "
                f"{', '.join(map(repr, missing))} (it has: "
                f"{', '.join(map(repr, mapping)) or 'none'}); give {field} for every expert."
            )
    for task in tasks:
        images = context.images[task]
        array_like = context.transform is not None and hasattr(images, "shape")
        if not (isinstance(images, torch.Tensor) or array_like) or not len(images.shape):
            images = None
        if images is None or images.shape[0] == 0:
            raise ConfigError(
                f"Merge method {method!r}: the adaptation images of task {task!r} must be a "
                "non-empty tensor (N, 3, H, W); give at least one image."
            )
    encoder_keys = set(context.encoder.state_dict())
    missing = [k for k in pretrained if k not in encoder_keys]
    unexpected = sorted(encoder_keys - set(pretrained))
    if missing or unexpected:
        raise MergeError(
            f"Merge method {method!r}: the context encoder's state-dict keys differ from the "
            f"pretrained keys (missing: {missing[:5]}, unexpected: {unexpected[:5]}); build the "
            "encoder with the pretrained architecture."
        )


@dataclass(frozen=True)
class _Settings:
    """One AdaMerging job's settings: which method, and its optimisation (see :data:`PARAMS`)."""

    method: str
    layerwise: bool  # one coefficient per task and floating-point tensor, or one per task
    steps: int
    batch_size: int
    lr: float
    init: float


@dataclass(frozen=True)
class _Problem:
    """What does not change between steps, built once on the device by :func:`_prepare`."""

    tasks: list[str]  # T of them, in the experts' order
    keys: list[str]  # the floating-point keys, the only ones merged: L of them
    device: torch.device
    pre: StateDict  # every pretrained tensor, on the device
    pre32: StateDict  # float key -> the pretrained tensor in fp32
    stacked: StateDict  # float key -> (T, numel) fp32 task vectors
    images: dict[str, Any]  # task -> images: on the device, or as given to a transform
    heads: dict[str, tuple[torch.nn.Module, StateDict]]  # task -> (head, detached weights)
    same_shape: bool  # every task's images have one shape and dtype: one encoder call per step

    def merged(self, coef: torch.Tensor, layerwise: bool) -> StateDict:
        """``pretrained + sum_t coef_t * tau_t`` for the floating-point keys, the other keys as
        they are. coef: (T, L) layer-wise, (T, 1) task-wise."""
        out = dict(self.pre)
        for i, k in enumerate(self.keys):
            c = coef[:, i] if layerwise else coef[:, 0]  # (T,)
            delta = (c @ self.stacked[k]).view(self.pre[k].shape)
            out[k] = (self.pre32[k] + delta).to(self.pre[k].dtype)
        return out


def _prepare(
    pretrained: StateDict, experts: Mapping[str, StateDict], context: AdaMergingContext
) -> _Problem:
    """The pretrained weights, the stacked task vectors, the images and the heads' weights on
    ``context.device`` (images that a transform reads stay where they are)."""
    device = torch.device(context.device)
    tasks, keys = list(experts), float_keys(pretrained)
    pre = {k: v.to(device) for k, v in pretrained.items()}
    stacked = {  # key -> (T, numel) fp32 task vectors
        k: torch.stack([task_vector(pre, e, k).reshape(-1) for e in experts.values()]) for k in keys
    }
    if context.transform is None:
        images = {t: context.images[t].to(device) for t in tasks}
    else:
        images = dict(context.images)
    heads = {}  # frozen, and no .grad on their weights
    for t in tasks:
        head = context.heads[t]
        heads[t] = (head, {n: v.detach().to(device) for n, v in head.state_dict().items()})
    return _Problem(
        tasks=tasks,
        keys=keys,
        device=device,
        pre=pre,
        pre32={k: pre[k].float() for k in keys},
        stacked=stacked,
        images=images,
        heads=heads,
        same_shape=len({(x.shape[1:], x.dtype) for x in images.values()}) == 1,
    )


@dataclass(frozen=True)
class _Loss:
    """One step's loss as this rank computes it: what :class:`_Step` runs.

    Every rank draws the same batches (one generator, seeded alike) and keeps its share of each
    batch's rows; its loss is weighted so that the gradient DistributedDataParallel averages is
    the one-process gradient.
    """

    problem: _Problem
    settings: _Settings
    context: AdaMergingContext
    world: World
    coefficients: torch.Tensor  # (T, L) or (T, 1), being learned
    generator: torch.Generator
    per_task: dict[str, torch.Tensor]  # the last step's terms, for the metrics log

    def __call__(self, step: int) -> torch.Tensor:
        """This rank's share of one step's loss: the sum over tasks of the batch-mean entropy."""
        batches, sizes = self.draw()
        params = self.problem.merged(self.coefficients, self.settings.layerwise)
        return self.entropy(self.features(params, batches), sizes)

    def draw(self) -> tuple[list[torch.Tensor], list[int]]:
        """One batch of every task: this rank's rows of it, and the whole batch's size."""
        batches, sizes = [], []
        for t in self.problem.tasks:
            images = self.problem.images[t]
            idx = torch.randperm(images.shape[0], generator=self.generator)  # same on every rank
            idx = idx[: self.settings.batch_size]
            sizes.append(len(idx))
            share = self.world.share(len(idx))
            idx = idx[share.start : share.stop]
            if self.context.transform is None:
                batches.append(images[idx.to(self.problem.device)])
            else:
                batches.append(self.context.transform(images[idx.numpy()]))
        return batches, sizes

    def features(self, params: StateDict, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The merged encoder's features of each batch, (b_t, e) per task: in one call when
        every task's images have one shape and dtype."""
        encoder = self.context.encoder
        if self.problem.same_shape:
            feats = functional_call(encoder, params, (torch.cat(batches),))
            return list(feats.split([b.shape[0] for b in batches]))
        return [functional_call(encoder, params, (b,)) for b in batches]

    def entropy(self, features: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
        """The sum over tasks of the mean entropy of each head's predictions over its whole
        batch (this rank's rows' share of it in a distributed job); each term kept for the log."""
        world = self.world
        loss = torch.zeros((), device=self.problem.device)
        self.per_task.clear()
        for t, f, size in zip(self.problem.tasks, features, sizes, strict=True):
            head, head_params = self.problem.heads[t]
            entropy = _entropy(functional_call(head, head_params, (f,)))
            term = entropy.sum() / size if world.distributed else entropy.mean()
            self.per_task[t] = term.detach()
            loss = loss + term
        return loss * world.size if world.distributed else loss


def _initial(settings: _Settings, problem: _Problem) -> _Coefficients:
    """Every coefficient at ``init``: (T, L) layer-wise, (T, 1) task-wise, fp32 on the device."""
    shape = (len(problem.tasks), len(problem.keys) if settings.layerwise else 1)
    values = torch.full(shape, float(settings.init), dtype=torch.float32)
    return _Coefficients(values).to(problem.device)


@contextlib.contextmanager
def _eval_mode(modules: list[torch.nn.Module]) -> Iterator[None]:
    """The modules in eval mode (no dropout: the coefficients are learned for inference); every
    submodule's own training flag restored afterwards."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


def _learn(learned: _Coefficients, loss: _Loss, world: World) -> None:
    """Learn the coefficients with Adam, ``steps`` steps on ``loss`` (none when nothing is
    floating-point), each step reported; TrainingError once the loss is not finite."""
    settings = loss.settings
    steps = settings.steps if loss.problem.keys else 0  # nothing floating-point: nothing to learn
    if steps == 0:
        return
    optimizer = torch.optim.Adam([learned.values], lr=settings.lr)
    objective = world.wrap(_Step(learned, loss))
    for step in range(steps):
        total = objective(step)
        value = world.mean(total.detach(), f"{settings.method} (sharing the loss)").item()
        if not math.isfinite(value):  # every rank sees the same value and stops
            raise TrainingError(
                f"Merge method {settings.method!r}: the entropy loss became {value} at step "
                f"{step}; lower its lr (now {settings.lr}) or check the adaptation images."
            )
        optimizer.zero_grad(set_to_none=True)
        with world.lost(f"{settings.method} (averaging the gradients)"):
            total.backward()
        optimizer.step()
        _report(step, value, loss, world)


def _report(step: int, value: float, loss: _Loss, world: World) -> None:
    """A finished step's loss to ``context.progress``, and with each task's term and the lr to
    ``context.metrics`` (each rank's term is its rows' share of the task's batch mean)."""
    context, method = loss.context, loss.settings.method
    if context.progress is not None:
        context.progress(step, value)
    if context.metrics is not None:
        what = f"{method} (sharing the per-task losses)"
        losses = {
            t: (world.mean(v, what) * world.size).item() if world.distributed else v.item()
            for t, v in loss.per_task.items()
        }
        context.metrics.write(step, loss=value, loss_per_task=losses, lr=loss.settings.lr)


def _recipe(settings: _Settings, seed: int, problem: _Problem, values: torch.Tensor) -> dict:
    """The merge recipe: the settings, the seed and the learned coefficients, {task: value}
    task-wise, {task: [value per key]} and the keys layer-wise. values: (T, L) or (T, 1)."""
    recipe: dict = {
        "method": settings.method,
        "init": float(settings.init),
        "steps": settings.steps,
        "lr": float(settings.lr),
        "batch_size": settings.batch_size,
        "seed": seed,
    }
    tasks = problem.tasks
    if settings.layerwise:
        recipe["coefficients"] = {t: values[i].tolist() for i, t in enumerate(tasks)}
        recipe["keys"] = problem.keys
    else:
        recipe["coefficients"] = {t: float(values[i, 0]) for i, t in enumerate(tasks)}
    return recipe


def _adamerging(
    settings: _Settings,
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    context: AdaMergingContext | None,
) -> MergeResult:
    """AdaMerging as both methods run it: check the input, learn the coefficients, merge."""
    check_compatible(pretrained, experts)
    _check_context(settings.method, pretrained, list(experts), context)
    assert context is not None
    problem = _prepare(pretrained, experts, context)
    world = context.world or World.single(problem.device)
    world.require_rows(settings.batch_size, f"Merge method {settings.method!r}: batch_size")
    learned = _initial(settings, problem)
    generator = torch.Generator().manual_seed(context.seed)
    loss = _Loss(problem, settings, context, world, learned.values, generator, per_task={})
    with _eval_mode([context.encoder, *(h for h, _ in problem.heads.values())]):
        _learn(learned, loss, world)
    values = learned.values.detach()
    with torch.no_grad():
        final = problem.merged(values, settings.layerwise)
    merged = {k: final[k] for k in problem.keys}
    recipe = _recipe(settings, context.seed, problem, values.cpu())
    return MergeResult(assemble(pretrained, merged), recipe)


# The reference's settings: 500 steps of Adam at 1e-3, one batch of 16 per task, init 0.3.
PARAMS = (
    Param("steps", 500, "Adam steps, each on one batch of every task", low=0),
    Param("batch_size", 16, "unlabelled images per task and step", low=1),
    Param("lr", 1e-3, "Adam learning rate", low=0, low_open=True),
    Param("init", 0.3, "initial value of every coefficient"),
)


@register("adamerging_taskwise", params=PARAMS, needs_data=True)
def adamerging_taskwise(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    context: AdaMergingContext | None = None,
    steps: int,
    batch_size: int,
    lr: float,
    init: float,
) -> MergeResult:
    """AdaMerging with one coefficient per task, learned by entropy minimisation.

    Args:
        pretrained: the pretrained state dict.
        experts: task -> fine-tuned state dict.
        context: encoder, heads and unlabelled images (required).
        steps, batch_size, lr, init: the optimisation (see :data:`PARAMS`).

    Returns:
        The merged weights; recipe with ``method``, ``init``, ``steps``, ``lr``, ``batch_size``,
        ``seed`` and ``coefficients`` ({task: value}).

    Raises:
        ConfigError: no context, or a context missing a task's head or images.
        TrainingError: the loss became non-finite.
    """
    settings = _Settings("adamerging_taskwise", False, steps, batch_size, lr, init)
    return _adamerging(settings, pretrained, experts, context)


@register("adamerging_layerwise", params=PARAMS, needs_data=True)
def adamerging_layerwise(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    context: AdaMergingContext | None = None,
    steps: int,
    batch_size: int,
    lr: float,
    init: float,
) -> MergeResult:
    """AdaMerging with one coefficient per task and tensor ("layer"), by entropy minimisation.

    Args:
        pretrained: the pretrained state dict.
        experts: task -> fine-tuned state dict.
        context: encoder, heads and unlabelled images (required).
        steps, batch_size, lr, init: the optimisation (see :data:`PARAMS`).

    Returns:
        The merged weights; recipe with ``method``, ``init``, ``steps``, ``lr``, ``batch_size``,
        ``seed``, ``keys`` (the merged floating-point keys, in state-dict order) and
        ``coefficients`` ({task: [one value per key in ``keys``]}).

    Raises:
        ConfigError: no context, or a context missing a task's head or images.
        TrainingError: the loss became non-finite.
    """
    settings = _Settings("adamerging_layerwise", True, steps, batch_size, lr, init)
    return _adamerging(settings, pretrained, experts, context)

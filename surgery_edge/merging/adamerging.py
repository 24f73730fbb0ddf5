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

import math
from collections.abc import Callable, Mapping

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


def _adamerging(
    method: str,
    layerwise: bool,
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    context: AdaMergingContext | None,
    steps: int,
    batch_size: int,
    lr: float,
    init: float,
) -> MergeResult:
    check_compatible(pretrained, experts)
    tasks = list(experts)
    _check_context(method, pretrained, tasks, context)
    assert context is not None
    device = torch.device(context.device)
    keys = float_keys(pretrained)

    # Everything that does not change between steps is built once, on the device.
    pre = {k: v.to(device) for k, v in pretrained.items()}
    pre32 = {k: pre[k].float() for k in keys}
    stacked = {  # key -> (T, numel) fp32 task vectors
        k: torch.stack([task_vector(pre, e, k).reshape(-1) for e in experts.values()]) for k in keys
    }
    if context.transform is None:
        images = {t: context.images[t].to(device) for t in tasks}
    else:
        images = dict(context.images)
    heads = {}  # task -> (head, detached weights on the device): frozen, and no .grad on them
    for t in tasks:
        head = context.heads[t]
        heads[t] = (head, {n: v.detach().to(device) for n, v in head.state_dict().items()})
    world = context.world or World.single(device)
    world.require_rows(batch_size, f"Merge method {method!r}: batch_size")
    learned = _Coefficients(
        torch.full((len(tasks), len(keys) if layerwise else 1), float(init), dtype=torch.float32)
    ).to(device)
    coefficients = learned.values  # (T, L) or (T, 1)
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    generator = torch.Generator().manual_seed(context.seed)
    same_shape = len({(x.shape[1:], x.dtype) for x in images.values()}) == 1

    def merged_params(coef: torch.Tensor) -> StateDict:
        out = dict(pre)
        for i, k in enumerate(keys):
            c = coef[:, i] if layerwise else coef[:, 0]  # (T,)
            delta = (c @ stacked[k]).view(pre[k].shape)
            out[k] = (pre32[k] + delta).to(pre[k].dtype)
        return out

    modules = [context.encoder, *(h for h, _ in heads.values())]
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()  # no dropout: the coefficients are learned for inference
    learn = steps if keys else 0  # nothing floating-point: nothing to learn

    per_task: dict[str, torch.Tensor] = {}  # the last step's terms, for the metrics log

    def step_loss(step: int) -> torch.Tensor:
        """This rank's share of one step's loss: the sum over tasks of the batch-mean entropy."""
        batches, sizes = [], []
        for t in tasks:
            n = images[t].shape[0]
            idx = torch.randperm(n, generator=generator)[:batch_size]  # the same on every rank
            sizes.append(len(idx))
            share = world.share(len(idx))
            idx = idx[share.start : share.stop]
            if context.transform is None:
                batches.append(images[t][idx.to(device)])
            else:
                batches.append(context.transform(images[t][idx.numpy()]))
        params_now = merged_params(coefficients)
        if same_shape:
            feats = functional_call(context.encoder, params_now, (torch.cat(batches),))
            features = feats.split([b.shape[0] for b in batches])
        else:
            features = [functional_call(context.encoder, params_now, (b,)) for b in batches]
        loss = torch.zeros((), device=device)
        per_task.clear()
        for t, f, size in zip(tasks, features, sizes, strict=True):
            head, head_params = heads[t]
            entropy = _entropy(functional_call(head, head_params, (f,)))
            term = entropy.sum() / size if world.distributed else entropy.mean()
            per_task[t] = term.detach()
            loss = loss + term
        return loss * world.size if world.distributed else loss

    objective = world.wrap(_Step(learned, step_loss)) if learn else None
    try:
        for step in range(learn):
            loss = objective(step)
            value = world.mean(loss.detach(), f"{method} (sharing the loss)").item()
            if not math.isfinite(value):  # every rank sees the same value and stops
                raise TrainingError(
                    f"Merge method {method!r}: the entropy loss became {value} at step "
                    f"{step}; lower its lr (now {lr}) or check the adaptation images."
                )
            optimizer.zero_grad(set_to_none=True)
            with world.lost(f"{method} (averaging the gradients)"):
                loss.backward()
            optimizer.step()
            if context.progress is not None:
                context.progress(step, value)
            if context.metrics is not None:
                what = f"{method} (sharing the per-task losses)"
                losses = {  # each rank's term is its rows' share of the task's batch mean
                    t: (world.mean(v, what) * world.size).item() if world.distributed else v.item()
                    for t, v in per_task.items()
                }
                context.metrics.write(step, loss=value, loss_per_task=losses, lr=lr)
    finally:
        for m, mode in modes:
            m.train(mode)

    with torch.no_grad():
        final = merged_params(coefficients.detach())
    merged = {k: final[k] for k in keys}
    values = coefficients.detach().cpu()
    recipe: dict = {
        "method": method,
        "init": float(init),
        "steps": steps,
        "lr": float(lr),
        "batch_size": batch_size,
        "seed": context.seed,
    }
    if layerwise:
        recipe["coefficients"] = {t: values[i].tolist() for i, t in enumerate(tasks)}
        recipe["keys"] = keys
    else:
        recipe["coefficients"] = {t: float(values[i, 0]) for i, t in enumerate(tasks)}
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
    return _adamerging(
        "adamerging_taskwise", False, pretrained, experts, context, steps, batch_size, lr, init
    )


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
    return _adamerging(
        "adamerging_layerwise", True, pretrained, experts, context, steps, batch_size, lr, init
    )

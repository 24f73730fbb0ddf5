"""Shared types and checks for the merge methods.

Every merge method takes the pretrained state dict and the experts' state dicts (fine-tuned from
it), and returns a :class:`MergeResult`. A *task vector* is ``expert - pretrained`` for one
expert. Only floating-point tensors are merged; integer and bool buffers must be identical in all
checkpoints and are copied from the pretrained one. Arithmetic is done in fp32 and each merged
tensor is cast back to the pretrained tensor's dtype. Methods never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from surgery_edge.distributed import World
from surgery_edge.errors import MergeError
from surgery_edge.progress import MetricsLog

StateDict = dict[str, torch.Tensor]

_MAX_LISTED_KEYS = 5


@dataclass(frozen=True)
class MergeResult:
    """The merged weights and how they were made.

    Attributes:
        state_dict: merged weights, with the pretrained keys, shapes and dtypes.
        recipe: JSON-serialisable description: ``{"method": name, **params}``, plus the learned
            coefficients for AdaMerging.
    """

    state_dict: StateDict
    recipe: dict


@dataclass
class AdaMergingContext:
    """The data AdaMerging learns its merge coefficients from (its settings are parameters).

    Attributes:
        encoder: a module whose ``state_dict()`` keys are exactly the pretrained keys; called as
            ``encoder(images) -> features`` (B, e) through ``torch.func.functional_call`` with
            the merged weights, so its own weights are never used or changed (non-persistent
            buffers, which are not in the state dict, must already be on ``device``). It and the
            heads run in eval mode; their training flags are restored afterwards.
        heads: task -> frozen head; ``head(features) -> logits`` (B, C_task).
        images: task -> unlabelled adaptation images (N, 3, H, W), already normalised; or, with
            ``transform``, any array indexable by an index array (e.g. a memory-mapped uint8
            (N, H, W, 3) array too large to hold as float tensors).
        seed: seeds the generator that samples the batches.
        device: where the coefficients are learned.
        progress: called as ``progress(step, loss)`` after every step.
        metrics: a metrics log (:class:`~surgery_edge.progress.MetricsLog`) that gets every
            step's ``loss``, ``loss_per_task`` (each task's batch-mean entropy) and ``lr``. In
            a distributed job every rank passes one (``MetricsLog(None)`` writes nothing): the
            per-task values are summed over the ranks.
        transform: turns ``images[t][idx]`` into the encoder's input on ``device``, per batch.
        world: the ranks of a distributed job (None: this process alone). Every rank draws the
            same batches and computes the loss of its share of their rows; the coefficients'
            gradients are averaged (DistributedDataParallel), so every rank learns the
            coefficients one process learns.
    """

    encoder: torch.nn.Module
    heads: dict[str, torch.nn.Module]
    images: dict[str, torch.Tensor]
    seed: int = 0
    device: str | torch.device = "cpu"
    progress: Callable[[int, float], None] | None = None
    transform: Callable[[Any], torch.Tensor] | None = None
    world: World | None = None
    metrics: MetricsLog | None = None


def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" (and {more} more)" if more > 0 else "")


def check_compatible(pretrained: StateDict, experts: Mapping[str, StateDict]) -> None:
    """Check that the experts can be merged onto ``pretrained``.

    Every expert must have exactly the pretrained keys, with the same shapes; a tensor that is
    floating-point in the pretrained checkpoint must be floating-point in every expert, and
    integer/bool tensors must be equal in all checkpoints (they are copied, not merged).

    Raises:
        MergeError: naming the expert and the offending keys, shapes or values.
    """
    if len(experts) == 0:
        raise MergeError(
            "No experts to merge: pass at least one fine-tuned checkpoint of the pretrained model."
        )
    for key, value in pretrained.items():
        if not isinstance(value, torch.Tensor):
            raise MergeError(
                f"The pretrained state dict holds a {type(value).__name__} at key {key!r}, not a "
                "tensor; pass a plain state dict (name -> tensor)."
            )
    pre_keys = set(pretrained)
    for name, expert in experts.items():
        if not isinstance(name, str):
            raise MergeError(f"Expert names must be strings (task names), got {name!r}.")
        missing = [k for k in pretrained if k not in expert]
        unexpected = [k for k in expert if k not in pre_keys]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} key(s): {_listed(missing)}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} key(s): {_listed(unexpected)}")
            raise MergeError(
                f"Expert {name!r} does not have the pretrained model's keys ({'; '.join(parts)}). "
                "Every expert must be a fine-tune of the same pretrained architecture; check that "
                "the expert checkpoint belongs to this model."
            )
        for key, pre in pretrained.items():
            value = expert[key]
            if not isinstance(value, torch.Tensor):
                raise MergeError(
                    f"Expert {name!r} holds a {type(value).__name__} at key {key!r}, not a tensor; "
                    "pass a plain state dict (name -> tensor)."
                )
            if value.shape != pre.shape:
                raise MergeError(
                    f"Expert {name!r} has shape {tuple(value.shape)} at key {key!r}, but the "
                    f"pretrained model has {tuple(pre.shape)}. Every expert must be a fine-tune of "
                    "the same pretrained architecture."
                )
            if pre.is_floating_point() != value.is_floating_point():
                raise MergeError(
                    f"Expert {name!r} has dtype {value.dtype} at key {key!r}, but the pretrained "
                    f"model has {pre.dtype}; floating-point tensors can only be merged with "
                    "floating-point tensors."
                )
            if not pre.is_floating_point() and not torch.equal(value.to(pre.device), pre):
                raise MergeError(
                    f"Expert {name!r} differs from the pretrained model at the non-floating-point "
                    f"tensor {key!r} ({pre.dtype}); integer and bool buffers cannot be merged and "
                    "must be equal in all checkpoints. Check that the expert was fine-tuned from "
                    "this pretrained checkpoint."
                )


def float_keys(pretrained: StateDict) -> list[str]:
    """The keys that are merged (floating-point tensors), in state-dict order."""
    return [k for k, v in pretrained.items() if v.is_floating_point()]


def task_vector(pretrained: StateDict, expert: StateDict, key: str) -> torch.Tensor:
    """``expert[key] - pretrained[key]`` in fp32 on the pretrained tensor's device."""
    pre = pretrained[key]
    return expert[key].to(device=pre.device, dtype=torch.float32) - pre.float()


def task_vectors(pretrained: StateDict, experts: Mapping[str, StateDict]) -> dict[str, StateDict]:
    """Check the experts and return their task vectors.

    Returns:
        task -> {key: expert - pretrained} for the floating-point keys only (the others are equal
        by construction), in fp32 on each pretrained tensor's device.
    """
    check_compatible(pretrained, experts)
    keys = float_keys(pretrained)
    return {
        name: {k: task_vector(pretrained, expert, k) for k in keys}
        for name, expert in experts.items()
    }


def iter_stacked_task_vectors(
    pretrained: StateDict, experts: Mapping[str, StateDict]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tvs)`` with ``tvs`` (T, *shape) fp32, one floating-point key at a time.

    Builds one key's task vectors at a time, so no full copy of all task vectors is held.
    """
    for key in float_keys(pretrained):
        yield key, torch.stack([task_vector(pretrained, e, key) for e in experts.values()])


def assemble(pretrained: StateDict, merged_float: Mapping[str, torch.Tensor]) -> StateDict:
    """Full state dict in pretrained key order: merged floating-point tensors cast to the
    pretrained dtype, the other tensors cloned from ``pretrained``."""
    out: StateDict = {}
    for key, pre in pretrained.items():
        if key in merged_float:
            out[key] = merged_float[key].to(device=pre.device, dtype=pre.dtype)
        else:
            out[key] = pre.clone()
    return out

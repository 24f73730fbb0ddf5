"""Weight averaging: the mean of the experts."""

from __future__ import annotations

from collections.abc import Mapping

from surgery_edge.merging.base import (
    AdaMergingContext,
    MergeResult,
    StateDict,
    assemble,
    check_compatible,
    iter_stacked_task_vectors,
)
from surgery_edge.merging.registry import register

NAME = "weight_averaging"


@register(NAME)
def weight_averaging(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    context: AdaMergingContext | None = None,
) -> MergeResult:
    """Weight averaging: the mean of all experts' weights (``pretrained + mean_t(tau_t)``).

    Every expert is averaged. The Representation Surgery reference code zips the task list with
    a list one element shorter and so silently drops the last task; that bug is not reproduced.

    Args:
        pretrained: the pretrained state dict.
        experts: task -> fine-tuned state dict.
        context: unused (accepted so every method has one signature).

    Returns:
        The merged weights; recipe ``{"method": "weight_averaging"}``.
    """
    check_compatible(pretrained, experts)
    merged = {
        k: pretrained[k].float() + tvs.mean(0)
        for k, tvs in iter_stacked_task_vectors(pretrained, experts)
    }
    return MergeResult(assemble(pretrained, merged), {"method": NAME})

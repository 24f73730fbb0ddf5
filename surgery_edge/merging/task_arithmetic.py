"""Task arithmetic: add a scaled sum of the task vectors to the pretrained weights."""

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
from surgery_edge.merging.registry import Param, register

NAME = "task_arithmetic"


@register(NAME, params=(Param("lam", 0.3, "scaling of the summed task vectors"),))
def task_arithmetic(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    context: AdaMergingContext | None = None,
    lam: float,
) -> MergeResult:
    """Task arithmetic: the pretrained weights plus ``lam`` times the sum of the task vectors.

    Args:
        pretrained: the pretrained state dict.
        experts: task -> fine-tuned state dict.
        context: unused (accepted so every method has one signature).
        lam: the scaling coefficient.

    Returns:
        The merged weights; recipe ``{"method": "task_arithmetic", "lam": lam}``.
    """
    check_compatible(pretrained, experts)
    merged = {
        k: pretrained[k].float() + lam * tvs.sum(0)
        for k, tvs in iter_stacked_task_vectors(pretrained, experts)
    }
    return MergeResult(assemble(pretrained, merged), {"method": NAME, "lam": lam})

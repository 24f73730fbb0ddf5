"""Task arithmetic: add a scaled sum of the task vectors to the pretrained weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from surgery_edge.merging.base import (
    AdaMergingContext,
    MergeResult,
    StateDict,
    assemble,
    check_compatible,
    check_real,
    iter_stacked_task_vectors,
    parse_params,
)
from surgery_edge.merging.registry import register

NAME = "task_arithmetic"


@register(NAME)
def task_arithmetic(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    context: AdaMergingContext | None = None,
    **params: Any,
) -> MergeResult:
    """``pretrained + lam * sum_t(tau_t)``.

    Args:
        pretrained: the pretrained state dict.
        experts: task -> fine-tuned state dict.
        context: unused (accepted so every method has one signature).
        params: ``lam`` (default 0.3), the scaling coefficient.

    Returns:
        The merged weights; recipe ``{"method": "task_arithmetic", "lam": lam}``.
    """
    p = parse_params(NAME, params, {"lam": 0.3})
    lam = check_real(NAME, "lam", p["lam"])
    check_compatible(pretrained, experts)
    merged = {
        k: pretrained[k].float() + lam * tvs.sum(0)
        for k, tvs in iter_stacked_task_vectors(pretrained, experts)
    }
    return MergeResult(assemble(pretrained, merged), {"method": NAME, "lam": lam})

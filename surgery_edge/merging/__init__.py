"""Merge methods: turn a pretrained checkpoint and its fine-tuned experts into one model.

Each method lives in its own module and registers itself, with its parameters, by name::

    from surgery_edge.merging import get
    result = get("ties_merging")(pretrained, experts, k=0.2, lam=0.3)
    result.state_dict, result.recipe

``get(name).params`` lists a method's parameters and ``get(name).needs_data`` says whether it
learns from unlabelled images (AdaMerging, through an :class:`AdaMergingContext`).
"""

# The method modules register themselves on import.
from surgery_edge.merging import adamerging, task_arithmetic, ties_merging, weight_averaging
from surgery_edge.merging.base import (
    AdaMergingContext,
    MergeResult,
    StateDict,
    check_compatible,
    task_vectors,
)
from surgery_edge.merging.registry import (
    MERGE_METHODS,
    MergeSpec,
    Param,
    available,
    get,
    register,
)

__all__ = [
    "MERGE_METHODS",
    "AdaMergingContext",
    "MergeResult",
    "MergeSpec",
    "Param",
    "StateDict",
    "adamerging",
    "available",
    "check_compatible",
    "get",
    "register",
    "task_arithmetic",
    "task_vectors",
    "ties_merging",
    "weight_averaging",
]

"""TIES-merging: trim, elect sign, disjoint mean (Yadav et al., 2023)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from surgery_edge.merging.base import (
    AdaMergingContext,
    MergeResult,
    StateDict,
    assemble,
    check_compatible,
    float_keys,
    iter_stacked_task_vectors,
    task_vector,
)
from surgery_edge.merging.registry import Param, register

NAME = "ties_merging"


def _thresholds(pretrained: StateDict, experts: Mapping[str, StateDict], k: float) -> torch.Tensor:
    """Per task, the magnitude of its ``n_keep``-th largest entry over the whole task vector.

    Returns:
        (T,) fp32 thresholds.
    """
    keys = float_keys(pretrained)
    device = pretrained[keys[0]].device
    n_total = sum(pretrained[key].numel() for key in keys)
    # The small epsilon keeps e.g. 0.29 * 100 from flooring to 28.
    n_keep = max(1, min(n_total, int(k * n_total + 1e-6)))
    out = []
    for expert in experts.values():
        magnitudes = torch.cat(
            [task_vector(pretrained, expert, key).abs().flatten().to(device) for key in keys]
        )
        out.append(torch.kthvalue(magnitudes, n_total - n_keep + 1).values)
        del magnitudes
    return torch.stack(out)


def _disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the non-zero entries whose sign equals ``sign``; 0 where none does.

    Args:
        trimmed: (T, *shape) trimmed task vectors.
        sign: (*shape) elected sign in {-1, 0, 1}.
    """
    agree = trimmed * sign > 0
    total = torch.where(agree, trimmed, 0.0).sum(0)
    return total / agree.sum(0).clamp(min=1)


@register(
    NAME,
    params=(
        Param("k", 0.2, "fraction of each task vector kept; 0.2 keeps 20%", 0, 1, low_open=True),
        Param("lam", 0.3, "scaling of the merged task vector"),
    ),
)
def ties_merging(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    context: AdaMergingContext | None = None,
    k: float,
    lam: float,
) -> MergeResult:
    """TIES-merging: trim, elect sign, disjoint mean (as the AdaMerging / Surgery code does).

    1. Trim: in each task vector keep the ``k`` fraction of entries with the largest magnitude,
       ranked over the whole task vector (all floating-point tensors concatenated), zero the rest.
       ``n_keep = max(1, floor(k * P))`` for P merged entries; the threshold is the ``n_keep``-th
       largest magnitude and every entry with magnitude ``>=`` it is kept, so ties at the
       threshold are all kept (a few more than ``n_keep`` entries can survive). The reference
       code's ``kthvalue(P - floor(k * P))`` keeps one entry more than ``n_keep``; we keep the
       stated fraction.
    2. Elect: per entry, the sign of the sum of the trimmed values ("dis-sum"). Where that sum is
       exactly zero the sign of the sum of all elected signs (the majority) is used, as in the
       reference; if that is zero too the entry is 0.
    3. Disjoint mean: per entry, the mean of the non-zero trimmed values whose sign agrees with
       the elected one (0 if none).

    The merged weights are ``pretrained + lam * merged_task_vector``. Unlike the reference, which
    builds one (T, P) matrix of all task vectors, this works one tensor at a time (plus one
    flattened task vector at a time to find the thresholds), so extra memory is O(P), not O(T P).

    Args:
        pretrained: the pretrained state dict.
        experts: task -> fine-tuned state dict.
        context: unused (accepted so every method has one signature).
        k: the kept fraction, in (0, 1].
        lam: the scaling of the merged task vector.

    Returns:
        The merged weights; recipe ``{"method": "ties_merging", "k": k, "lam": lam}``.
    """
    check_compatible(pretrained, experts)
    recipe = {"method": NAME, "k": k, "lam": lam}
    if sum(pretrained[key].numel() for key in float_keys(pretrained)) == 0:
        return MergeResult(assemble(pretrained, {}), recipe)

    thresholds = _thresholds(pretrained, experts, k)
    merged_tv: dict[str, torch.Tensor] = {}
    # Entries whose summed trimmed value is exactly 0 but not all trimmed values are 0: their
    # sign is only known once the majority sign over all entries is.
    pending: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    sign_total = torch.zeros((), dtype=torch.float64, device=thresholds.device)
    for key, tvs in iter_stacked_task_vectors(pretrained, experts):  # tvs: (T, *shape)
        thr = thresholds.to(tvs.device).view(-1, *([1] * (tvs.dim() - 1)))
        trimmed = torch.where(tvs.abs() >= thr, tvs, 0.0)
        sign = torch.sign(trimmed.sum(0))
        merged_tv[key] = _disjoint_mean(trimmed, sign)
        sign_total += sign.sum(dtype=torch.float64).to(sign_total.device)
        undecided = (sign == 0) & (trimmed != 0).any(0)
        if undecided.any():
            sub = trimmed[:, undecided]  # (T, n_undecided)
            ones = torch.ones(sub.shape[1], dtype=sub.dtype, device=sub.device)
            pending.append((key, undecided, _disjoint_mean(sub, ones), _disjoint_mean(sub, -ones)))

    majority = int(torch.sign(sign_total).item())
    for key, undecided, if_positive, if_negative in pending:
        if majority != 0:
            merged_tv[key][undecided] = if_positive if majority > 0 else if_negative

    merged = {key: pretrained[key].float() + lam * tv for key, tv in merged_tv.items()}
    return MergeResult(assemble(pretrained, merged), recipe)

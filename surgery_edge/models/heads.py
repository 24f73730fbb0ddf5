"""Classification heads: a linear map on L2-normalised features, as in the task_vectors code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationHead(nn.Module):
    """``logits = W · normalize(z) + b``; ``W`` absorbs the logit scale, as in CLIP zero-shot heads.

    Args:
        weight: (C, embed_dim).
        bias: (C,) or None.
        normalize: L2-normalise the feature before the linear map (the paper's heads do).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, normalize=True):
        super().__init__()
        self.normalize = normalize
        self.weight = nn.Parameter(weight.detach().clone())
        b = torch.zeros(weight.shape[0]) if bias is None else bias.detach().clone()
        self.bias = nn.Parameter(b)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, e) -> (B, C)
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return F.linear(features, self.weight, self.bias)


def normalize_per_task(
    z: torch.Tensor, flags: torch.Tensor | None, uniform: bool | None
) -> torch.Tensor:
    """Each head's own choice of L2 normalisation, for stacked heads.

    Args:
        z: features, last dim ``e``.
        flags: bool, broadcastable against ``z[..., 0]``: whether the row's head normalises.
        uniform: True or False when every head decides alike (then ``flags`` is not read, and
            the graph holds no select), None when the heads differ.
    """
    if uniform is None:
        return torch.where(flags.unsqueeze(-1), F.normalize(z, dim=-1), z)
    return F.normalize(z, dim=-1) if uniform else z


def uniform_normalize(heads) -> bool | None:
    """True if every head normalises, False if none does, None if they differ."""
    flags = {bool(h.normalize) for h in heads}
    return flags.pop() if len(flags) == 1 else None


@torch.no_grad()
def prototype_head(
    features: torch.Tensor,  # (N, e)
    labels: torch.Tensor,  # (N,)
    num_classes: int,
    logit_scale: float = 20.0,
) -> ClassificationHead:
    """A head whose rows are the normalised class means of ``features``, times ``logit_scale``.

    The analogue of a CLIP zero-shot head when there is no text tower: a sensible starting point
    that fine-tuning then refines.
    """
    feats = F.normalize(features.float(), dim=-1)
    weight = torch.zeros(num_classes, feats.shape[1])
    weight.index_add_(0, labels, feats)
    weight = F.normalize(weight, dim=-1) * logit_scale
    return ClassificationHead(weight, torch.zeros(num_classes))

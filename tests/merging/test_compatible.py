"""What a merge refuses before it starts (``merging/base.py``), with the whole message a user
reads: which expert, which key, what differs and what to check."""

from __future__ import annotations

import pytest
import torch

from surgery_edge.errors import MergeError
from surgery_edge.merging.base import check_compatible

PRE = {"w": torch.zeros(2, 3), "steps": torch.tensor([4])}
KEYS = {f"k{i}": torch.zeros(1) for i in range(7)}


@pytest.mark.parametrize(
    ("pretrained", "experts", "message"),
    [
        (
            PRE,
            {},
            "No experts to merge: pass at least one fine-tuned checkpoint of the pretrained model.",
        ),
        (
            {"w": [1.0]},
            {"a": {"w": [1.0]}},
            "The pretrained state dict holds a list at key 'w', not a tensor; pass a plain state "
            "dict (name -> tensor).",
        ),
        (PRE, {3: PRE}, "Expert names must be strings (task names), got 3."),
        (
            KEYS,
            {"a": {}},
            "Expert 'a' does not have the pretrained model's keys (missing 7 key(s): 'k0', 'k1', "
            "'k2', 'k3', 'k4' (and 2 more)). Every expert must be a fine-tune of the same "
            "pretrained architecture; check that the expert checkpoint belongs to this model.",
        ),
        (
            {k: v for k, v in list(KEYS.items())[:5]},
            {"a": {**KEYS, "x": torch.zeros(1)}},
            "Expert 'a' does not have the pretrained model's keys (unexpected 3 key(s): 'k5', "
            "'k6', 'x'). Every expert must be a fine-tune of the same pretrained architecture; "
            "check that the expert checkpoint belongs to this model.",
        ),
        (
            {"k0": torch.zeros(1), "k1": torch.zeros(1)},
            {"a": {"k1": torch.zeros(1), "k9": torch.zeros(1)}},
            "Expert 'a' does not have the pretrained model's keys (missing 1 key(s): 'k0'; "
            "unexpected 1 key(s): 'k9'). Every expert must be a fine-tune of the same pretrained "
            "architecture; check that the expert checkpoint belongs to this model.",
        ),
        (
            PRE,
            {"a": {**PRE, "w": "weights"}},
            "Expert 'a' holds a str at key 'w', not a tensor; pass a plain state dict "
            "(name -> tensor).",
        ),
        (
            PRE,
            {"a": {**PRE, "w": torch.zeros(3, 2)}},
            "Expert 'a' has shape (3, 2) at key 'w', but the pretrained model has (2, 3). Every "
            "expert must be a fine-tune of the same pretrained architecture.",
        ),
        (
            PRE,
            {"a": {**PRE, "w": torch.zeros(2, 3, dtype=torch.int64)}},
            "Expert 'a' has dtype torch.int64 at key 'w', but the pretrained model has "
            "torch.float32; floating-point tensors can only be merged with floating-point "
            "tensors.",
        ),
        (
            PRE,
            {"a": PRE, "b": {**PRE, "steps": torch.tensor([5])}},
            "Expert 'b' differs from the pretrained model at the non-floating-point tensor "
            "'steps' (torch.int64); integer and bool buffers cannot be merged and must be equal "
            "in all checkpoints. Check that the expert was fine-tuned from this pretrained "
            "checkpoint.",
        ),
    ],
)
def test_incompatible_experts_are_refused_naming_what_differs(pretrained, experts, message):
    with pytest.raises(MergeError) as e:
        check_compatible(pretrained, experts)
    assert str(e.value) == message


def test_five_keys_are_listed_whole():
    with pytest.raises(MergeError, match=r"'k4'\)\. Every"):  # no "(and 0 more)"
        check_compatible(dict(list(KEYS.items())[:5]), {"a": {}})
    with pytest.raises(MergeError, match=r"'k4' \(and 1 more\)\)"):
        check_compatible(dict(list(KEYS.items())[:6]), {"a": {}})
    check_compatible(PRE, {"a": {k: v.clone() for k, v in PRE.items()}})  # compatible: no error

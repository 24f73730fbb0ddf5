"""AdaMerging's objective and the context it refuses, with the whole message a user reads
(the learning itself is tested in test_merging.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from surgery_edge.errors import ConfigError, MergeError
from surgery_edge.merging import get
from surgery_edge.merging.adamerging import _entropy
from surgery_edge.merging.base import AdaMergingContext

TASKS = ["cats", "dogs"]


def test_the_objective_is_each_rows_prediction_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, -30.0]], dtype=torch.float16)
    got = _entropy(logits)  # (B, C) -> (B,): one entropy per image, over its classes
    assert got.shape == (2,) and got.dtype == torch.float32
    p = np.array([2 / 3, 1 / 3])
    np.testing.assert_allclose(got.numpy(), [math.log(3), -(p * np.log(p)).sum()], rtol=1e-3)


def _context(**images) -> tuple[dict, dict, AdaMergingContext]:
    encoder = nn.Linear(4, 3)
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    experts = {t: {k: v + 0.1 for k, v in pretrained.items()} for t in TASKS}
    heads = {t: nn.Linear(3, 2) for t in TASKS}
    given = {t: torch.randn(4, 4) for t in TASKS}
    return pretrained, experts, AdaMergingContext(encoder, heads, {**given, **images})


def _refused(context, pretrained=None, experts=None, error=ConfigError) -> str:
    p, e, _ = _context()
    with pytest.raises(error) as raised:
        get("adamerging_taskwise")(pretrained or p, experts or e, context=context, steps=1)
    return str(raised.value)


def test_a_context_without_heads_images_or_the_encoder_is_refused_whole():
    pretrained, experts, context = _context()
    with pytest.raises(ConfigError) as e:
        get("adamerging_layerwise")(pretrained, experts)
    assert str(e.value) == (
        "Merge method 'adamerging_layerwise' learns its merge coefficients from unlabelled images "
        "of every task, so it needs an AdaMergingContext (encoder, heads, images); pass "
        "context=... (the CLI builds one from the task data), or use a method with fixed "
        "coefficients such as 'task_arithmetic'."
    )
    del context.heads["dogs"]
    assert _refused(context) == (
        "Merge method 'adamerging_taskwise': the context has no heads for task(s) 'dogs' (it "
        "has: 'cats'); give heads for every expert."
    )
    context.heads, context.images = {t: nn.Linear(3, 2) for t in TASKS}, {}
    assert _refused(context) == (
        "Merge method 'adamerging_taskwise': the context has no images for task(s) 'cats', "
        "'dogs' (it has: none); give images for every expert."
    )


@pytest.mark.parametrize(
    "images",
    [torch.zeros(0, 4), torch.tensor(1.0), [[1.0, 2.0, 3.0, 4.0]], np.zeros((3, 4), np.float32)],
)
def test_images_that_are_not_a_non_empty_tensor_are_refused(images):
    _, _, context = _context(dogs=images)
    assert _refused(context) == (
        "Merge method 'adamerging_taskwise': the adaptation images of task 'dogs' must be a "
        "non-empty tensor (N, 3, H, W); give at least one image."
    )


def test_an_array_with_a_transform_is_accepted_and_an_empty_one_refused():
    pretrained, experts, context = _context(dogs=np.zeros((3, 4), np.float32))
    context.transform = lambda x: torch.as_tensor(np.asarray(x, np.float32))
    merged = get("adamerging_taskwise")(pretrained, experts, context=context, steps=1)
    assert set(merged.state_dict) == set(pretrained)
    context.images["dogs"] = np.zeros((0, 4), np.float32)
    assert "task 'dogs' must be a non-empty tensor" in _refused(context)


def test_an_encoder_of_another_architecture_is_refused_naming_the_keys():
    pretrained, experts, context = _context()
    context.encoder = nn.Sequential(nn.Linear(4, 3))  # keys 0.weight, 0.bias
    message = _refused(context, pretrained, experts, MergeError)
    assert message == (
        "Merge method 'adamerging_taskwise': the context encoder's state-dict keys differ from "
        "the pretrained keys (missing: ['weight', 'bias'], unexpected: ['0.bias', '0.weight']); "
        "build the encoder with the pretrained architecture."
    )
    context.encoder = nn.Linear(4, 3)
    context.encoder.register_buffer("extra", torch.zeros(1))
    assert "(missing: [], unexpected: ['extra'])" in _refused(
        context, pretrained, experts, MergeError
    )


def test_the_tasks_a_context_lacks_and_those_it_has_are_named():
    pretrained, experts, context = _context()
    experts["birds"] = experts["cats"]
    context.images["birds"] = torch.randn(4, 4)
    assert _refused(context, pretrained, experts) == (
        "Merge method 'adamerging_taskwise': the context has no heads for task(s) 'birds' (it "
        "has: 'cats', 'dogs'); give heads for every expert."
    )


def test_the_keys_that_differ_are_listed_up_to_five_each():
    layers = nn.Sequential(*(nn.Linear(4, 4) for _ in range(3)))  # 0.weight ... 2.bias
    pretrained = {k: v.detach().clone() for k, v in layers.state_dict().items()}
    experts = {t: dict(pretrained) for t in TASKS}
    heads = {t: nn.Linear(4, 2) for t in TASKS}
    context = AdaMergingContext(nn.Sequential(layers), heads, {t: torch.randn(4, 4) for t in TASKS})
    assert (
        "(missing: ['0.weight', '0.bias', '1.weight', '1.bias', '2.weight'], unexpected: "
        "['0.0.bias', '0.0.weight', '0.1.bias', '0.1.weight', '0.2.bias'])"
    ) in _refused(context, pretrained, experts, MergeError)

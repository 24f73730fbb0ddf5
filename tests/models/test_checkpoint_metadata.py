"""Every checkpoint's metadata is validated field by field; non-finite weights are refused."""

from __future__ import annotations

import re

import pytest
import torch

from surgery_edge.errors import CheckpointError
from surgery_edge.models import (
    ClassificationHead,
    build_encoder,
    get_arch,
    load_encoder,
    load_head,
    save_encoder,
    save_head,
)
from surgery_edge.models.checkpoint import load_tensors, save_tensors

ARCH = get_arch("micro-vit-16")


@pytest.fixture
def encoder_file(tmp_path):
    return save_encoder(tmp_path / "enc.safetensors", ARCH, build_encoder(ARCH).state_dict())


@pytest.fixture
def head_file(tmp_path):
    head = ClassificationHead(torch.randn(3, ARCH.embed_dim), torch.zeros(3))
    return save_head(tmp_path / "head.safetensors", ARCH, "shapes", ["a", "b", "c"], head)


def _edit(path, change):
    tensors, meta = load_tensors(path, finite=False)
    change(tensors, meta)
    save_tensors(path, tensors, meta)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda t, m: m.pop("arch"), "arch: Field required"),
        (lambda t, m: m["arch"].pop("width"), "arch.width: Field required"),
        (lambda t, m: m["arch"].update(width="32"), "arch.width: Input should be a valid integer"),
        (lambda t, m: m["arch"].update(width=10**6), "arch.width: Input should be less than"),
        (lambda t, m: m["arch"].update(mean=[0.5, 0.5]), "arch.mean"),
        (lambda t, m: m["arch"].update(patch_size=5), "not a multiple of patch_size"),
        (lambda t, m: m["arch"].update(colour="blue"), "arch.colour: Extra inputs"),
        (lambda t, m: m.update(task=7), "task: Input should be a valid string"),
    ],
)
def test_malformed_encoder_metadata_names_file_and_field(encoder_file, change, pattern):
    _edit(encoder_file, change)
    with pytest.raises(CheckpointError, match=re.escape(str(encoder_file))) as e:
        load_encoder(encoder_file)
    assert re.search(pattern, str(e.value)), str(e.value)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda t, m: m.update(class_names="abc"), "class_names: Input should be a valid list"),
        (lambda t, m: m.update(class_names=[]), "class_names: List should have at least 1"),
        (lambda t, m: m.update(class_names=["a", 2, "c"]), r"class_names\.1"),
        (lambda t, m: m.update(normalize="yes"), "normalize: Input should be a valid boolean"),
        (lambda t, m: m.update(class_names=["a", "b"]), "3 classes but 2 class names"),
    ],
)
def test_malformed_head_metadata_names_file_and_field(head_file, change, pattern):
    _edit(head_file, change)
    with pytest.raises(CheckpointError, match=pattern):
        load_head(head_file)


def test_non_finite_weights_are_refused_at_load(encoder_file, head_file):
    _edit(encoder_file, lambda t, m: t["visual.proj"].view(-1)[0].fill_(float("inf")))
    with pytest.raises(CheckpointError, match="'visual.proj' holds 1 non-finite value"):
        load_encoder(encoder_file)
    _edit(head_file, lambda t, m: t["weight"].view(-1)[3].fill_(float("nan")))
    with pytest.raises(CheckpointError, match="'weight' holds 1 non-finite value"):
        load_head(head_file)


def test_metadata_that_is_not_an_object_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"surgery_edge": "[1, 2]"})
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_encoder(path)

"""Adapter files that cannot be read back: each refusal names the file and what to do
(the round trip and the other refusals are in test_adapter_bank.py)."""

from __future__ import annotations

import re

import pytest
import torch

from surgery_edge.errors import AdapterError
from surgery_edge.models import get_arch
from surgery_edge.models.checkpoint import load_tensors, save_tensors
from surgery_edge.surgery.adapters import AdapterBank

ARCH = get_arch("micro-vit-16")
TASKS = ["a", "b"]


@pytest.fixture
def saved(tmp_path):
    return AdapterBank(TASKS, ARCH, "surgeryv2", 4).save(tmp_path / "a.safetensors")


def _rewrite(path, tensors=None, meta=None):
    found, found_meta = load_tensors(path)
    out = path.with_name("bad.safetensors")
    return save_tensors(
        out, tensors(found) if tensors else found, meta(found_meta) if meta else found_meta
    )


def _refusal(path) -> str:
    with pytest.raises(AdapterError) as e:
        AdapterBank.load(path)
    return str(e.value)


@pytest.mark.parametrize("rank", ["four", None])
def test_malformed_metadata_is_refused_naming_the_file(saved, rank):
    path = _rewrite(saved, meta=lambda m: {**m, "rank": rank})
    message = _refusal(path)
    assert str(path) in message and "rank" in message and message.endswith("Re-train the adapters.")


def test_a_rank_the_architecture_cannot_take_is_refused(saved):
    path = _rewrite(saved, meta=lambda m: {**m, "rank": 1000})  # wider than the model
    message = _refusal(path)
    assert message.startswith(f"Adapters {path}: ") and message.endswith(" Re-train them.")


def test_at_most_four_missing_tensors_are_named(saved):
    path = _rewrite(saved, tensors=lambda t: {k: v for k, v in t.items() if k.startswith("b/")})
    message = _refusal(path)
    assert message.startswith(f"Adapter file {path} does not match its metadata: missing [")
    listed = re.search(r"missing (\[.*?\])", message).group(1)
    assert listed.count("'") == 8 and message.endswith("unexpected [].")


def test_a_tensor_of_another_shape_names_the_rank_and_width(saved):
    d = ARCH.site_dim("final")
    path = _rewrite(saved, tensors=lambda t: {**t, "b/final/up": t["b/final/up"][:, :3].clone()})
    assert _refusal(path) == (
        f"Adapter {path}: b/final/up has shape ({d}, 3), expected ({d}, 4) (rank 4, width {d})."
    )


def test_diverged_adapters_are_never_written(tmp_path):
    bank = AdapterBank(TASKS, ARCH, "surgery", 2)
    with torch.no_grad():
        bank.up["final"][1, 0, 0] = float("nan")
    with pytest.raises(AdapterError) as e:
        bank.save(tmp_path / "x.safetensors")
    assert str(e.value) == (
        f"Refusing to write {tmp_path / 'x.safetensors'}: the adapters hold NaN or infinity "
        "(training diverged)."
    )
    assert list(tmp_path.iterdir()) == []


def test_the_default_rank_is_16():
    assert AdapterBank(TASKS, ARCH, "surgery").rank == 16

"""The AdapterBank on its own (``surgery/adapters.py``, ``surgery/functional.py``): its rank
bounds, initialisation, state-dict layout, and each way an adapter file can be wrong, refused
with a message naming what is wrong (fast, no run)."""

from __future__ import annotations

import math

import pytest
import torch

from surgery_edge.errors import AdapterError
from surgery_edge.models import get_arch
from surgery_edge.models.checkpoint import load_tensors, save_tensors
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.functional import routed_correction

ARCH = get_arch("micro-vit-16")
TASKS = ["a", "b"]


def test_rank_runs_from_1_to_the_narrowest_corrected_width():
    widest = min(ARCH.site_dim(s) for s in AdapterBank(TASKS, ARCH, "surgeryv2", 1).sites)
    assert AdapterBank(TASKS, ARCH, "surgeryv2", widest).rank == widest
    for bad in (0, widest + 1, True, 2.0):
        with pytest.raises(AdapterError, match=rf"integer from 1 to {widest} .* got {bad!r}"):
            AdapterBank(TASKS, ARCH, "surgeryv2", bad)
    with pytest.raises(AdapterError, match="nope"):
        AdapterBank(TASKS, ARCH, "nope", 4)


def test_down_starts_as_nn_linear_does_and_up_at_zero_in_one_tensor_per_site():
    torch.manual_seed(0)
    bank = AdapterBank(TASKS, ARCH, "surgeryv2", 4)
    names = [f"{kind}.{s.replace('.', '_')}" for kind in ("down", "up") for s in bank.sites]
    assert sorted(bank.state_dict()) == sorted(names)
    for site in bank.sites:
        down, up = bank.weights(site)
        d = ARCH.site_dim(site)
        assert down.shape == (2, 4, d) and up.shape == (2, d, 4) and not up.any()
        bound = 1 / math.sqrt(d)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(d), 1/sqrt(d))
        assert down.abs().max() <= bound and down.abs().max() > 0.8 * bound
        assert not torch.equal(down[0], down[1])  # each task drawn on its own


def test_one_token_per_image_keeps_its_token_axis():
    z = torch.randn(3, 1, 8)  # (B, N=1, d)
    down, up = torch.randn(2, 4, 8), torch.randn(2, 8, 4)
    out = routed_correction(z, torch.tensor([0, 1, 0]), down, up)
    assert out.shape == (3, 1, 8)
    assert routed_correction(z[:, 0], torch.tensor([0, 1, 0]), down, up).shape == (3, 8)


@pytest.fixture
def saved(tmp_path):
    bank = AdapterBank(TASKS, ARCH, "surgeryv2", 4)
    return bank.save(tmp_path / "a.safetensors", extra={"note": "x"})


def _rewrite(path, tensors=None, meta=None):
    found, found_meta = load_tensors(path)
    out = path.with_name("bad.safetensors")
    return save_tensors(
        out, tensors(found) if tensors else found, meta(found_meta) if meta else found_meta
    )


def test_a_bank_reads_back_as_written(saved):
    bank, meta = AdapterBank.load(saved, ARCH, TASKS, "surgeryv2", 4)
    assert bank.sites == AdapterBank(TASKS, ARCH, "surgeryv2", 4).sites
    assert meta["kind"] == "adapters" and meta["note"] == "x" and meta["sites"] == list(bank.sites)


def test_another_kind_of_file_is_refused_naming_its_kind(saved):
    path = _rewrite(saved, meta=lambda m: {**m, "kind": "encoder"})
    with pytest.raises(AdapterError, match=r"bad\.safetensors holds a 'encoder' file, not surgery"):
        AdapterBank.load(path)


def test_adapters_of_the_other_method_are_refused(saved):
    with pytest.raises(
        AdapterError, match=r"are 'surgeryv2' adapters, not 'surgery' ones.*--surgery"
    ):
        AdapterBank.load(saved, method="surgery")


def test_sites_that_disagree_with_the_method_are_refused(saved):
    path = _rewrite(saved, meta=lambda m: {**m, "sites": ["final"]})
    with pytest.raises(AdapterError, match=r"record sites \['final'\], but surgeryv2 adapters of"):
        AdapterBank.load(path)


def test_missing_and_unexpected_tensors_are_named(saved):
    def swap(t):
        t = dict(t)
        t["c/final/down"] = t.pop("a/final/down")
        return t

    with pytest.raises(
        AdapterError, match=r"missing \['a/final/down'\], unexpected \['c/final/down'\]"
    ):
        AdapterBank.load(_rewrite(saved, tensors=swap))


def test_a_tensor_of_another_shape_is_named_with_both_shapes(saved):
    def narrow(t):
        return {**t, "b/final/up": t["b/final/up"][:, :3].clone()}

    d = ARCH.site_dim("final")
    with pytest.raises(
        AdapterError, match=rf"b/final/up has shape \({d}, 3\), expected \({d}, 4\)"
    ):
        AdapterBank.load(_rewrite(saved, tensors=narrow))

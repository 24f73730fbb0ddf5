"""The magnitude checks before an export (``export/modules.py``) on a micro model: what is
refused, at which bound, and how the file and tensor are named (the trained models' margins
are in test_export.py)."""

from __future__ import annotations

import pytest
import torch

from surgery_edge.errors import ExportError
from surgery_edge.export.modules import MAGNITUDE_FACTOR, WeightFiles, check_magnitudes
from surgery_edge.models import ClassificationHead, build_encoder, get_arch
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.model import MultiTaskModel

ARCH = get_arch("micro-vit-16")
CLASSES = (3, 5)
FILES = WeightFiles("merged.st", "adapters.st", ["a.st", "b.st"])


def _model() -> tuple[MultiTaskModel, float]:
    """A micro model with small adapters and heads, and its backbone's largest |weight|."""
    torch.manual_seed(0)
    encoder = build_encoder(ARCH)
    heads = [ClassificationHead(0.01 * torch.randn(c, ARCH.embed_dim)) for c in CLASSES]
    model = MultiTaskModel(encoder, heads, ["a", "b"], AdapterBank(["a", "b"], ARCH, "surgery", 2))
    scale = max(float(p.detach().abs().max()) for p in encoder.parameters())
    return model.eval(), scale


def _message(model, **kwargs) -> str:
    with pytest.raises(ExportError) as e:
        check_magnitudes(model, **kwargs)
    return str(e.value)


def test_adapters_and_heads_up_to_the_bound_pass_and_beyond_it_are_named():
    model, scale = _model()
    check_magnitudes(model, half=True, files=FILES)
    up = model.bank.weights("final")[1]  # (T, d, r)
    with torch.no_grad():
        up[1, 0, 0] = MAGNITUDE_FACTOR * scale  # at the bound: passes
        check_magnitudes(model, files=FILES)
        up[1, 0, 0] = 1.01 * MAGNITUDE_FACTOR * scale
    assert _message(model, files=FILES) == (
        f"adapters.st: tensor b/final/up holds values up to {1.01 * MAGNITUDE_FACTOR * scale:.3g}, "
        f"{1.01 * MAGNITUDE_FACTOR:.3g} times the backbone's largest weight ({scale:.3g}); "
        f"trained adapters stay within {MAGNITUDE_FACTOR:g} times it. The file is damaged or was "
        "not made by training, so no engine was exported: re-create it (re-train the adapters, "
        "or restore the checkpoint)."
    )
    assert _message(model).startswith("the adapters: tensor b/final/up holds")


def test_a_head_is_named_by_its_file_or_task_and_its_padding_is_ignored():
    model, scale = _model()
    with torch.no_grad():
        model.head_weight[0, CLASSES[0] :] = 1e9  # padding rows of task a: not a weight
    check_magnitudes(model, files=FILES)
    with torch.no_grad():
        model.head_bias[1, 4] = 2e3 * scale
    message = _message(model, files=FILES)
    assert message.startswith("b.st: tensor bias holds values up to") and "trained heads" in message
    assert _message(model).startswith("the head of task 'b': tensor bias holds")


def test_non_finite_weights_are_named_wherever_they_are():
    model, _ = _model()
    with torch.no_grad():
        model.bank.weights("final")[0][0, 1, 0] = float("nan")
    assert _message(model, files=FILES) == (
        "adapters.st: tensor a/final/down holds NaN or infinity; no engine was exported. "
        "Re-create the file (re-train the adapters, or restore the checkpoint)."
    )
    model, _ = _model()
    name, weight = next(iter(model.encoder.named_parameters()))
    with torch.no_grad():
        weight.view(-1)[0] = float("inf")
    assert _message(model).startswith(f"the merged backbone: tensor {name} holds NaN or infinity")


def test_fp16_needs_every_weight_within_its_range():
    model, _ = _model()
    name, weight = next(iter(model.encoder.named_parameters()))
    with torch.no_grad():
        weight.view(-1)[0] = 7e4  # beyond 65504; the adapters' bound grows with it
    check_magnitudes(model, files=FILES)  # fp32 holds it
    assert _message(model, half=True, files=FILES) == (
        f"merged.st: tensor {name} holds values up to 7e+04, beyond what fp16 holds (+-65504): "
        "an fp16 engine would compute with infinity, so none was exported. Export at fp32 "
        "(--precision fp32), or re-create the file."
    )
    with torch.no_grad():
        weight.view(-1)[0] = 65504.0
    check_magnitudes(model, half=True, files=FILES)

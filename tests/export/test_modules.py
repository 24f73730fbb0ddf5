"""The graphs the exporters trace (``export/modules.py``), run in PyTorch: no export, no run.

What an engine answers is decided here, so a change that routes a row to another task, drops the
-inf padding or leaves a half graph's outputs in half must fail a test without an export.
"""

from __future__ import annotations

import pytest
import torch

from surgery_edge.engine_format import EngineMode, Precision
from surgery_edge.export.modules import AllTasksEngine, RoutedEngine, engine_module, example_inputs
from surgery_edge.models import ClassificationHead, build_encoder, get_arch
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.model import MultiTaskModel

ARCH = get_arch("micro-vit-16")
CLASSES = (3, 5, 2)


def _model(method: str) -> MultiTaskModel:
    torch.manual_seed(0)
    encoder = build_encoder(ARCH)
    tasks = ["a", "b", "c"]
    heads = [ClassificationHead(torch.randn(c, ARCH.embed_dim), normalize=True) for c in CLASSES]
    bank = AdapterBank(tasks, ARCH, method, 4) if method != "none" else None
    if bank is not None:
        for p in bank.up.values():
            torch.nn.init.normal_(p, std=0.3)  # adapters that change the answers
    return MultiTaskModel(encoder, heads, tasks, bank).eval()


@pytest.mark.parametrize("method", ["surgery", "surgeryv2", "none"])
def test_routed_engine_answers_each_row_for_its_task_padded_with_minus_inf(method):
    model = _model(method)
    images, ids = torch.randn(4, 3, 16, 16), torch.tensor([1, 0, 2, 1])
    with torch.no_grad():
        logits, probs = RoutedEngine(model)(images, ids)
        for row, t in enumerate(ids.tolist()):
            alone = model(images[row : row + 1], torch.tensor([t]))[0, : CLASSES[t]]
            torch.testing.assert_close(logits[row, : CLASSES[t]], alone, rtol=1e-5, atol=1e-5)
            assert torch.isneginf(logits[row, CLASSES[t] :]).all()
            assert (probs[row, CLASSES[t] :] == 0).all()
    assert logits.shape == probs.shape == (4, max(CLASSES))
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


@pytest.mark.parametrize("method", ["surgery", "surgeryv2", "none"])
def test_all_tasks_engine_answers_every_task_as_routing_would(method):
    model = _model(method)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        outputs = AllTasksEngine(model)(images)
        assert [o.shape for o in outputs] == [(3, c) for c in CLASSES]
        for t, out in enumerate(outputs):
            routed = RoutedEngine(model)(images, torch.full((3,), t))[0][:, : CLASSES[t]]
            torch.testing.assert_close(out, routed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", list(EngineMode))
def test_the_half_graph_takes_and_returns_float32_and_leaves_the_model_alone(mode):
    model = _model("surgeryv2")
    module = engine_module(model, mode, Precision.FP16)
    inputs = example_inputs(model, mode, batch=3)
    assert inputs[0].shape == (3, 3, 16, 16) and inputs[0].dtype == torch.float32
    if mode == "routed":
        assert inputs[1].tolist() == [0, 1, 2]  # every task traced
    assert next(module.model.parameters()).dtype == torch.float16
    assert not module.model.fused and not module.training
    assert next(model.parameters()).dtype == torch.float32  # a copy was converted
    with torch.no_grad():
        outputs = module(*inputs)
        reference = engine_module(model, mode)(*inputs)
    for half, full in zip(outputs, reference):
        assert half.dtype == torch.float32
        finite = torch.isfinite(full)
        torch.testing.assert_close(half[finite], full[finite], rtol=0.05, atol=0.05)

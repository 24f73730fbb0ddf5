"""The fused (Triton) path of MultiTaskModel against the reference path, on CPU via the Triton
interpreter (``make test`` sets TRITON_INTERPRET=1)."""

import subprocess
import sys

import pytest
import torch

from surgery_edge import kernels
from surgery_edge.data.transforms import to_model_input
from surgery_edge.errors import ConfigError
from surgery_edge.surgery.fused import export_mode, fuse, fuse_

needs_kernels = pytest.mark.skipif(
    not kernels.can_launch("cpu"), reason="needs TRITON_INTERPRET=1 (or a GPU)"
)


def _model(tiny_run, method):
    from surgery_edge.run.pipeline import Run

    run = Run.open(tiny_run[0], log=lambda *a: None)
    run.require_experts()
    run.find_merges()
    run.find_adapters()
    merged = run.merged["task_arithmetic"]
    return run, run.model(merged, run.adapters[("task_arithmetic", method)])


def _test_batch(run):
    xs = [to_model_input(run.suite.task(t).test_x, run.arch) for t in run.tasks]
    ids = [torch.full((len(x),), i) for i, x in enumerate(xs)]
    return torch.cat(xs), torch.cat(ids)


@needs_kernels
def test_fused_v2_matches_reference_on_the_test_split(tiny_run):
    run, model = _model(tiny_run, "surgeryv2")
    x, ids = _test_batch(run)
    with torch.no_grad():
        ref = model(x, ids)
        fused_model = fuse(model)
        out = fused_model(x, ids)
    assert not model.fused and fused_model.fused
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(out))
    assert (out[finite] - ref[finite]).abs().max() <= 1e-4
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    # one state-dict layout for both paths
    assert fused_model.state_dict().keys() == model.state_dict().keys()


@needs_kernels
def test_fused_v1_all_tasks_matches_reference(tiny_run):
    run, model = _model(tiny_run, "surgery")
    x, _ = _test_batch(run)
    with torch.no_grad():
        ref = model.forward_all_tasks(x)
        out = fuse(model).forward_all_tasks(x)
    for r, o in zip(ref, out, strict=True):
        assert (o - r).abs().max() <= 1e-4
        assert torch.equal(o.argmax(-1), r.argmax(-1))


@needs_kernels
def test_export_mode_switches_the_fused_path_off(tiny_run):
    _, model = _model(tiny_run, "surgeryv2")
    fuse_(model)
    with export_mode(model) as m:
        assert not m.fused
    assert model.fused


def test_fuse_refuses_when_kernels_cannot_run(tiny_run, monkeypatch):
    _, model = _model(tiny_run, "surgeryv2")
    monkeypatch.setattr(kernels, "can_launch", lambda device: False)
    with pytest.raises(ConfigError, match="reference path"):
        fuse_(model)
    assert not model.fused


def test_importing_the_package_does_not_import_triton():
    code = (
        "import sys, surgery_edge, surgery_edge.surgery.model, surgery_edge.run.pipeline, "
        "surgery_edge.kernels; assert 'triton' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

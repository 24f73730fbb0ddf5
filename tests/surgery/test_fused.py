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
    from surgery_edge.run.state import Run

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
        "import sys, surgery_edge, surgery_edge.surgery.model, surgery_edge.run.state, "
        "surgery_edge.kernels; assert 'triton' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# GPU: the fused model against its reference path at ViT-B/32 width (compiled kernels)
# ---------------------------------------------------------------------------------------------
ON_GPU = pytest.mark.skipif(
    not torch.cuda.is_available() or kernels.triton_interpreter_enabled(),
    reason="needs a CUDA device and compiled kernels (TRITON_INTERPRET unset)",
)
# the fused error may be twice PyTorch's own same-dtype error plus this, against float64
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _vit_b32_model(method: str):
    """ViT-B/32 (width 768, 12 blocks) with random weights, the paper's eight class counts,
    and trained-looking adapters (W_up not zero)."""
    from surgery_edge.models import ClassificationHead, build_encoder, get_arch
    from surgery_edge.surgery.adapters import AdapterBank
    from surgery_edge.surgery.model import MultiTaskModel

    torch.manual_seed(0)
    arch = get_arch("ViT-B-32")
    classes = (397, 196, 45, 10, 10, 43, 10, 47)
    tasks = [f"task{t}" for t in range(len(classes))]
    heads = [
        ClassificationHead(torch.randn(c, arch.embed_dim) * arch.embed_dim**-0.5) for c in classes
    ]
    bank = AdapterBank(tasks, arch, method, rank=16)
    with torch.no_grad():
        for site in bank.sites:
            bank.weights(site)[1].normal_(0.0, 0.02)
    return MultiTaskModel(build_encoder(arch), heads, tasks, bank).eval()


def _assert_fused_within_torch_error(fused, same_dtype, reference):
    for f, s, r in zip(fused, same_dtype, reference, strict=True):
        finite = torch.isfinite(r)
        assert torch.equal(finite, torch.isfinite(f))
        fused_err = (f.double() - r)[finite].abs().max().item()
        torch_err = (s.double() - r)[finite].abs().max().item()
        assert fused_err <= 2 * torch_err + ATOL[f.dtype], (fused_err, torch_err)
        agree = (f.argmax(-1) == s.argmax(-1)).float().mean().item()
        assert agree >= 0.98, agree


@pytest.mark.gpu
@ON_GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_fused_v2_routed_matches_eager_at_vit_b32_width(dtype):
    model = _vit_b32_model("surgeryv2")
    images = torch.randn(24, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(24) % model.num_tasks
    with torch.inference_mode():
        reference = model.double().cuda()(images.double().cuda(), ids.cuda())
        model = model.to(dtype)
        x = images.to("cuda", dtype)
        same_dtype = model(x, ids.cuda())
        fused = fuse(model)(x, ids.cuda())
    assert fused.dtype == dtype
    _assert_fused_within_torch_error([fused], [same_dtype], [reference])


@pytest.mark.gpu
@ON_GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_fused_v1_all_tasks_matches_eager_at_vit_b32_width(dtype):
    model = _vit_b32_model("surgery")
    images = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = model.double().cuda().forward_all_tasks(images.double().cuda())
        model = model.to(dtype)
        x = images.to("cuda", dtype)
        same_dtype = model.forward_all_tasks(x)
        fused = fuse(model).forward_all_tasks(x)
    _assert_fused_within_torch_error(fused, same_dtype, reference)

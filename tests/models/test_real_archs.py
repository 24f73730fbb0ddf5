"""Real open_clip ViT sizes (random weights) through merge and SurgeryV2 training on CPU: no code
path may depend on a width, depth or token count."""

import numpy as np
import pytest
import torch

from surgery_edge.merging import get
from surgery_edge.models import ClassificationHead, build_encoder, get_arch
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.model import MultiTaskModel
from surgery_edge.surgery.targets import representations
from surgery_edge.surgery.trainer import SurgeryConfig, TaskTargets, TrainingHooks, train_surgery


def _perturbed(state, seed, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _run(name, rank, tmp_path):
    arch = get_arch(name)
    torch.manual_seed(0)
    pre = build_encoder(arch).state_dict()
    experts = {"a": _perturbed(pre, 1), "b": _perturbed(pre, 2)}
    merged_state = get("task_arithmetic")(pre, experts, lam=0.3).state_dict
    merged = build_encoder(arch)
    merged.load_state_dict(merged_state)
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    targets = {}
    for t, sd in experts.items():
        enc = build_encoder(arch)
        enc.load_state_dict(sd)
        targets[t] = TaskTargets(images, *representations(enc, images, torch.device("cpu")))
    heads = [ClassificationHead(torch.randn(c, arch.embed_dim)) for c in (3, 5)]
    cfg = SurgeryConfig(method="surgeryv2", rank=rank, steps=2, batch_size=1, checkpoint_every=0)
    losses = []
    bank = train_surgery(
        merged,
        heads,
        ["a", "b"],
        targets,
        cfg,
        tmp_path / "a.safetensors",
        torch.device("cpu"),
        hooks=TrainingHooks(on_step=lambda s, v: losses.append(v)),
    )
    assert len(losses) == 2 and all(np.isfinite(losses))
    down, up = bank.weights(f"block.{arch.layers - 1}")
    assert down.shape == (2, rank, arch.width) and up.shape == (2, arch.width, rank)
    assert bank.weights("final")[0].shape == (2, rank, arch.embed_dim)
    loaded, _ = AdapterBank.load(tmp_path / "a.safetensors", arch=arch, tasks=["a", "b"])
    model = MultiTaskModel(merged, heads, ["a", "b"], loaded).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        routed = model(x, torch.tensor([0, 1]))
        all_tasks = model.forward_all_tasks(x)
    assert routed.shape == (2, 5) and torch.isinf(routed[0, 3:]).all()
    torch.testing.assert_close(all_tasks[1][1], routed[1], rtol=1e-4, atol=1e-4)


def test_vit_b32_merge_and_surgeryv2(tmp_path):
    _run("ViT-B-32", 16, tmp_path)


@pytest.mark.slow
def test_vit_l14_merge_and_surgeryv2(tmp_path):
    _run("ViT-L-14", 4, tmp_path)

"""Importers: open_clip weights, task_vectors pickles (restricted unpickler), HF CLIP vision.

Every checkpoint here is written by the test itself in the real format: the task_vectors files
are whole pickled ``src.modeling.ImageEncoder`` / ``ClassificationHead`` objects (a fake
``src.modeling`` module exists only while they are saved), the HF files use HF's key names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checkpoint_formats import micro_clip, task_vectors_classes

from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.models import build_encoder, get_arch, load_encoder, load_head
from surgery_edge.models.convert.hf import (
    arch_from_hf,
    hf_clip_to_open_clip,
    hf_vision_config,
    load_hf_clip_vision,
    open_clip_to_hf,
)
from surgery_edge.models.convert.open_clip import load_open_clip_image_tower
from surgery_edge.models.convert.sandbox import (
    ALLOWED_GLOBALS,
    load_pickle_restricted,
    original_class,
)
from surgery_edge.models.convert.task_vectors import import_task_vectors
from surgery_edge.models.convert.towers import check_tower, with_activation

MICRO = get_arch("micro-vit-16")
MICRO_QUICK = with_activation(MICRO, True)
TASKS = {"EuroSATVal": 5, "MNIST": 3}  # task folder -> classes; EuroSAT's head is head_EuroSAT.pt


def _quiet(*_args):
    return None


def micro_state(quick_gelu: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    return {f"visual.{k}": v for k, v in micro_clip(quick_gelu, seed).visual.state_dict().items()}


def encoder_from(arch, state):
    enc = build_encoder(arch)
    enc.load_state_dict(state)
    return enc.eval()


@pytest.fixture(scope="module")
def tv(tmp_path_factory):
    """A task_vectors tree ``<root>/micro-vit-16/`` written by the real classes' pickling."""
    root = tmp_path_factory.mktemp("tv")
    model_dir = root / "micro-vit-16"
    x = torch.randn(3, 3, 16, 16)
    features, heads = {}, {}
    with task_vectors_classes() as modeling:
        for i, name in enumerate(["pretrained", *TASKS]):
            enc = modeling.ImageEncoder(micro_clip(quick_gelu=True, seed=i))  # OpenAI-style
            with torch.no_grad():
                features[name] = enc(x)
            path = (
                model_dir / "zeroshot.pt"
                if name == "pretrained"
                else model_dir / name / "finetuned.pt"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(enc, path)
        for task, classes in TASKS.items():
            head = modeling.ClassificationHead(True, torch.randn(classes, 24), torch.randn(classes))
            heads[task] = head
            torch.save(head, model_dir / f"head_{task.removesuffix('Val')}.pt")
    return types.SimpleNamespace(
        root=root, model_dir=model_dir, x=x, features=features, heads=heads
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# task_vectors layout
# ---------------------------------------------------------------------------------------------


def test_micro_clip_is_the_micro_arch():
    clip = micro_clip(quick_gelu=False, seed=0)
    check_tower("micro CLIP", micro_state(), MICRO)
    assert clip.visual.transformer.resblocks[0].attn.num_heads == MICRO.heads == 2


def test_import_reproduces_features_and_heads(tv, tmp_path):
    assert "src.modeling" not in sys.modules  # loading must not depend on the original classes
    out = tmp_path / "ckpt"
    summary = import_task_vectors(tv.root, "micro-vit-16", out, trust_pickle=True, log=_quiet)

    # OpenAI-style checkpoints use QuickGELU: the arch is adapted, and says so.
    assert summary.arch == MICRO_QUICK and summary.arch.name == "micro-vit-16-quickgelu"
    assert any("QuickGELU" in n for n in summary.notes)
    assert set(summary.experts) == set(TASKS)
    for name, path in [("pretrained", summary.pretrained), *summary.experts.items()]:
        ckpt = load_encoder(path, summary.arch)
        assert ckpt.meta["task"] == (None if name == "pretrained" else name)
        assert ckpt.meta["source"]["format"] == "task_vectors"
        with torch.no_grad():
            ours = ckpt.build()(tv.x)
        torch.testing.assert_close(ours, tv.features[name], rtol=1e-5, atol=1e-6)
    for task, original in tv.heads.items():
        loaded = load_head(summary.heads[task], summary.arch)
        assert loaded.task == task and loaded.head.normalize is True
        assert loaded.class_names == [f"class_{i}" for i in range(TASKS[task])]
        assert torch.equal(loaded.head.weight, original.weight)
        assert torch.equal(loaded.head.bias, original.bias)
        with torch.no_grad():
            f = tv.features[task]
            torch.testing.assert_close(loaded.head(f), original(f))
    written = json.loads((out / "import.json").read_text())
    assert written["arch"]["quick_gelu"] is True and set(written["heads"]) == set(TASKS)
    assert leftovers(tmp_path) == []


def test_task_subset_and_class_names(tv, tmp_path):
    names = ["zero", "one", "two"]
    summary = import_task_vectors(
        tv.root,
        "micro-vit-16",
        tmp_path / "o",
        True,
        tasks=["MNIST"],
        class_names={"MNIST": names},
        log=_quiet,
    )
    assert list(summary.experts) == ["MNIST"]
    assert load_head(summary.heads["MNIST"]).class_names == names
    with pytest.raises(ConfigError, match="2 class names given for task 'MNIST'.*3 classes"):
        import_task_vectors(
            tv.root,
            "micro-vit-16",
            tmp_path / "o2",
            True,
            tasks=["MNIST"],
            class_names={"MNIST": names[:2]},
            log=_quiet,
        )
    assert not (tmp_path / "o2").exists() and leftovers(tmp_path) == []
    with pytest.raises(CheckpointError, match=r"tasks \['Cars'\].*found \['EuroSATVal', 'MNIST'\]"):
        import_task_vectors(tv.root, "micro-vit-16", tmp_path / "o3", True, tasks=["Cars"])


def test_pickles_are_refused_without_trust(tv, tmp_path):
    with pytest.raises(CheckpointError, match="arbitrary code.*--trust-pickle") as e:
        import_task_vectors(tv.root, "micro-vit-16", tmp_path / "out", trust_pickle=False)
    assert "zeroshot.pt" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unexpected_class_is_named_and_never_called(tv, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tv.root, root)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = root / "micro-vit-16" / "MNIST" / "finetuned.pt"
    torch.save({"model": Evil()}, evil)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"'posix\.mkdir'.*not on the allow-list") as e:
        import_task_vectors(root, "micro-vit-16", out, trust_pickle=True, log=_quiet)
    assert str(evil) in str(e.value)
    assert not marker.exists()
    assert not out.exists() and leftovers(tmp_path) == []  # the pretrained file was not kept

    torch.save(Counter(a=1), evil)
    with pytest.raises(CheckpointError, match=r"'collections\.Counter'"):
        load_pickle_restricted(evil)


def test_wrong_object_in_a_head_file(tv, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tv.root, root)
    shutil.copy(root / "micro-vit-16" / "zeroshot.pt", root / "micro-vit-16" / "head_MNIST.pt")
    with pytest.raises(CheckpointError, match="head_MNIST.pt holds a src.modeling.ImageEncoder"):
        import_task_vectors(root, "micro-vit-16", tmp_path / "out", True, log=_quiet)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_another_architecture_is_refused(tv, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tv.model_dir, root / "tiny-vit-32")
    with pytest.raises(CheckpointError, match="zeroshot.pt.*width 32.*'tiny-vit-32' has width 128"):
        import_task_vectors(root, "tiny-vit-32", tmp_path / "out", True, log=_quiet)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_layout_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="ViT-B-32 is not a directory.*zeroshot.pt"):
        import_task_vectors(tmp_path, "ViT-B-32", tmp_path / "out", True)
    (tmp_path / "ViT-B-32" / "Cars").mkdir(parents=True)
    (tmp_path / "ViT-B-32" / "zeroshot.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no <Task>/finetuned.pt"):
        import_task_vectors(tmp_path, "ViT-B-32", tmp_path / "out", True)
    (tmp_path / "ViT-B-32" / "Cars" / "finetuned.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"No classification head for tasks \['Cars'\]"):
        import_task_vectors(tmp_path, "ViT-B-32", tmp_path / "out", True)
    (tmp_path / "ViT-B-32" / "head_Cars.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="zeroshot.pt is not a readable PyTorch checkpoint"):
        import_task_vectors(tmp_path, "ViT-B-32", tmp_path / "out", True, log=_quiet)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tv, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ConfigError, match="out already exists and is not empty"):
        import_task_vectors(tv.root, "micro-vit-16", out, True, tasks=["MNIST"], log=_quiet)
    import_task_vectors(
        tv.root, "micro-vit-16", out, True, tasks=["MNIST"], overwrite=True, log=_quiet
    )
    assert not (out / "old.txt").exists() and (out / "experts" / "MNIST.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_allow_list_is_small_and_explicit():
    assert "builtins.eval" not in ALLOWED_GLOBALS and "posix.system" not in ALLOWED_GLOBALS
    assert ALLOWED_GLOBALS["src.modeling.ImageEncoder"] == "module"
    assert ALLOWED_GLOBALS["open_clip.model.VisualTransformer"] == "module"  # open_clip < 2.1
    assert {k for k, v in ALLOWED_GLOBALS.items() if v == "real"} == {
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "collections.OrderedDict",
        "builtins.set",
    }


# ---------------------------------------------------------------------------------------------
# open_clip weights from disk
# ---------------------------------------------------------------------------------------------


def test_open_clip_state_dict_formats(tmp_path):
    from safetensors.torch import save_file

    clip = micro_clip(quick_gelu=False, seed=3)
    full = clip.state_dict()
    visual = {k: v for k, v in full.items() if k.startswith("visual.")}
    assert any(k.startswith("transformer.") for k in full)  # text tower present, then dropped
    save_file({k: v.contiguous() for k, v in full.items()}, tmp_path / "clip.safetensors")
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in full.items()}},
        tmp_path / "epoch_3.pt",
    )
    torch.save({k: v.half() for k, v in full.items()}, tmp_path / "open_clip_pytorch_model.bin")
    for name in ("clip.safetensors", "epoch_3.pt", "open_clip_pytorch_model.bin"):
        state = load_open_clip_image_tower(tmp_path / name, MICRO)
        assert state.keys() == visual.keys()
        assert all(v.dtype == torch.float32 for v in state.values())
        exact = not name.endswith(".bin")
        for k, v in visual.items():
            assert torch.equal(state[k], v) if exact else torch.equal(state[k], v.half().float())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = encoder_from(
            MICRO, load_open_clip_image_tower(tmp_path / "clip.safetensors", MICRO)
        )(x)
        torch.testing.assert_close(ours, clip.encode_image(x), rtol=1e-5, atol=1e-6)


def test_pickled_model_objects_need_trust(tv):
    zeroshot = tv.model_dir / "zeroshot.pt"
    with pytest.raises(
        CheckpointError, match="references src.modeling.ImageEncoder.*arbitrary code"
    ):
        load_open_clip_image_tower(zeroshot, MICRO_QUICK)
    state = load_open_clip_image_tower(zeroshot, MICRO_QUICK, trust_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder_from(MICRO_QUICK, state)(tv.x), tv.features["pretrained"]
        )
    with pytest.raises(CheckpointError, match="QuickGELU.*quick_gelu=False"):
        load_open_clip_image_tower(zeroshot, MICRO, trust_pickle=True)
    four_heads = dataclasses.replace(MICRO_QUICK, heads=4)  # same shapes, another function
    with pytest.raises(CheckpointError, match="2 attention heads per block.*has 4"):
        load_open_clip_image_tower(zeroshot, four_heads, trust_pickle=True)
    obj = load_pickle_restricted(zeroshot)
    assert original_class(obj) == "src.modeling.ImageEncoder"
    assert original_class(obj.val_preprocess) == "torchvision.transforms.transforms.Compose"


def test_open_clip_loader_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        load_open_clip_image_tower(tmp_path / "nope.pt", MICRO)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt is not a readable PyTorch checkpoint"):
        load_open_clip_image_tower(tmp_path / "bad.pt", MICRO)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="bad.safetensors is not a readable safetensors"):
        load_open_clip_image_tower(tmp_path / "bad.safetensors", MICRO)
    torch.save(open_clip_to_hf(micro_state(), MICRO), tmp_path / "hf.bin")
    with pytest.raises(CheckpointError, match="no open_clip image-tower keys.*Hugging Face"):
        load_open_clip_image_tower(tmp_path / "hf.bin", MICRO)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt does not hold a state dict"):
        load_open_clip_image_tower(tmp_path / "list.pt", MICRO)
    torch.save(micro_state(), tmp_path / "micro.pt")
    with pytest.raises(
        CheckpointError, match=r"micro.pt does not match.*shape mismatches.*width 32"
    ):
        load_open_clip_image_tower(tmp_path / "micro.pt", get_arch("tiny-vit-32"))
    partial = micro_state()
    del partial["visual.proj"]
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"1 missing keys.*visual\.proj"):
        load_open_clip_image_tower(tmp_path / "partial.pt", MICRO)


# ---------------------------------------------------------------------------------------------
# Hugging Face CLIP vision
# ---------------------------------------------------------------------------------------------


def hf_keys(layers: int) -> set[str]:
    """The keys of HF's CLIPVisionModelWithProjection state dict (current transformers)."""
    p = "vision_model."
    keys = {
        f"{p}embeddings.class_embedding",
        f"{p}embeddings.patch_embedding.weight",
        f"{p}embeddings.position_embedding.weight",
        "visual_projection.weight",
    }
    keys |= {
        f"{p}{ln}.{w}" for ln in ("pre_layrnorm", "post_layernorm") for w in ("weight", "bias")
    }
    for i in range(layers):
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm1",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        ):
            keys |= {f"{p}encoder.layers.{i}.{m}.weight", f"{p}encoder.layers.{i}.{m}.bias"}
    return keys


def hf_reference_forward(sd, images, heads: int, quick_gelu: bool):  # (B, 3, H, W) -> (B, e)
    """HF CLIPVisionModelWithProjection's computation, written from HF's names alone."""
    p = "vision_model."

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    def act(t):
        return t * torch.sigmoid(1.702 * t) if quick_gelu else F.gelu(t)

    patch = sd[f"{p}embeddings.patch_embedding.weight"]
    x = F.conv2d(images, patch, stride=patch.shape[-1]).flatten(2).transpose(1, 2)
    cls = sd[f"{p}embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd[f"{p}embeddings.position_embedding.weight"]
    x = ln(x, f"{p}pre_layrnorm")
    b, n, d = x.shape
    i = 0
    while f"{p}encoder.layers.{i}.layer_norm1.weight" in sd:
        layer = f"{p}encoder.layers.{i}."

        def lin(t, name, layer=layer):
            return F.linear(t, sd[f"{layer}{name}.weight"], sd[f"{layer}{name}.bias"])

        h = ln(x, f"{layer}layer_norm1")
        q, k, v = (
            lin(h, f"self_attn.{c}_proj").view(b, n, heads, d // heads).transpose(1, 2)
            for c in "qkv"
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1) @ v
        x = x + lin(attn.transpose(1, 2).reshape(b, n, d), "self_attn.out_proj")
        x = x + lin(act(lin(ln(x, f"{layer}layer_norm2"), "mlp.fc1")), "mlp.fc2")
        i += 1
    return ln(x[:, 0], f"{p}post_layernorm") @ sd["visual_projection.weight"].t()


def test_hf_round_trip_is_exact_and_keys_are_hf_keys():
    state = micro_state(seed=5)
    hf = open_clip_to_hf(state, MICRO)
    assert set(hf) == hf_keys(MICRO.layers)
    p = "vision_model."
    assert hf["visual_projection.weight"].shape == (24, 32)
    assert hf[f"{p}embeddings.position_embedding.weight"].shape == (MICRO.num_tokens, 32)
    assert hf[f"{p}encoder.layers.1.self_attn.k_proj.weight"].shape == (32, 32)
    assert hf[f"{p}encoder.layers.1.mlp.fc1.weight"].shape == (64, 32)
    assert torch.equal(
        hf[f"{p}encoder.layers.0.self_attn.v_proj.bias"],
        state["visual.transformer.resblocks.0.attn.in_proj_bias"][64:],
    )
    back = hf_clip_to_open_clip(hf, MICRO)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_hf_weights_give_the_same_features(quick_gelu):
    arch = with_activation(MICRO, quick_gelu)
    state = micro_state(quick_gelu, seed=6)
    hf = open_clip_to_hf(state, arch)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        original = encoder_from(arch, state)(x)
        reference = hf_reference_forward(hf, x, heads=arch.heads, quick_gelu=quick_gelu)
        converted = encoder_from(arch, hf_clip_to_open_clip(hf, arch))(x)
    torch.testing.assert_close(reference, original, rtol=1e-4, atol=1e-5)
    assert torch.equal(converted, original)


def test_hf_matches_transformers_if_installed():
    transformers = pytest.importorskip("transformers")
    arch = MICRO_QUICK
    state = micro_state(True, seed=7)
    config = transformers.CLIPVisionConfig(
        **{k: v for k, v in hf_vision_config(arch).items() if k != "model_type"}
    )
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    model.load_state_dict(open_clip_to_hf(state, arch), strict=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        theirs = model(pixel_values=x).image_embeds
        ours = encoder_from(arch, state)(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    back = hf_clip_to_open_clip(model.state_dict(), arch)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_arch_is_read_off_hf_weights():
    hf = open_clip_to_hf(micro_state(), MICRO)
    assert arch_from_hf(hf, heads=2, quick_gelu=False) == MICRO
    custom = arch_from_hf(hf, heads=4, quick_gelu=False)
    assert custom.name == "hf-clip-vit-w32-p8-l2" and custom.heads == 4
    b32 = get_arch("ViT-B-32")
    with torch.device("meta"):  # real ViT-B/32 shapes, no memory
        hf_b32 = open_clip_to_hf(build_encoder(b32).state_dict(), b32)
    assert arch_from_hf(hf_b32, heads=12) == get_arch("ViT-B-32-quickgelu")
    assert arch_from_hf(hf_b32, heads=12, quick_gelu=False) == b32
    with pytest.raises(ConfigError, match="5 attention heads do not divide the width 32"):
        arch_from_hf(hf, heads=5)


def test_hf_conversion_errors():
    hf = open_clip_to_hf(micro_state(), MICRO)
    no_proj = {k: v for k, v in hf.items() if k != "visual_projection.weight"}
    with pytest.raises(
        CheckpointError,
        match="model.safetensors has no 'visual_projection.weight'.*CLIPVisionModel",
    ):
        hf_clip_to_open_clip(no_proj, MICRO, where="model.safetensors")
    gap = {k: v for k, v in hf.items() if ".layers.0." not in k}
    with pytest.raises(CheckpointError, match=r"lacks encoder layers \[0\]"):
        hf_clip_to_open_clip(gap, MICRO)
    extra = {**hf, "vision_model.encoder.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(CheckpointError, match="q_norm.*not a standard CLIP vision tower"):
        hf_clip_to_open_clip(extra, MICRO)
    partial = {k: v for k, v in hf.items() if "layers.1.mlp.fc2.bias" not in k}
    with pytest.raises(CheckpointError, match=r"lacks 1 vision keys.*layers\.1\.mlp\.fc2\.bias"):
        hf_clip_to_open_clip(partial, MICRO)
    with pytest.raises(CheckpointError, match="does not match its architecture.*tiny-vit-32"):
        hf_clip_to_open_clip(hf, get_arch("tiny-vit-32"))
    ignored = {
        **hf,
        "text_model.embeddings.token_embedding.weight": torch.ones(3, 4),
        "logit_scale": torch.ones(()),
        "vision_model.embeddings.position_ids": torch.arange(5)[None],
    }
    assert hf_clip_to_open_clip(ignored, MICRO).keys() == micro_state().keys()


def test_load_hf_clip_vision_folders_and_files(tmp_path):
    from safetensors.torch import save_file

    state = micro_state(seed=8)
    hf = open_clip_to_hf(state, MICRO)
    text = {"text_model.final_layer_norm.weight": torch.ones(32), "logit_scale": torch.ones(())}
    folder = tmp_path / "clip"
    folder.mkdir()
    save_file({**hf, **text}, folder / "model.safetensors")
    config = {"model_type": "clip", "projection_dim": 24, "vision_config": hf_vision_config(MICRO)}
    (folder / "config.json").write_text(json.dumps(config))
    arch, loaded = load_hf_clip_vision(folder)
    assert arch == MICRO and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert load_hf_clip_vision(folder, MICRO)[0] == MICRO
    with pytest.raises(
        CheckpointError, match=r"does not fit architecture 'micro-vit-16-quickgelu'.*quick_gelu"
    ):
        load_hf_clip_vision(folder, MICRO_QUICK)
    with pytest.raises(ConfigError, match=r"disagree with .*config.json.*'heads': \(4, 2\)"):
        load_hf_clip_vision(folder, heads=4)

    # A single .bin file without config.json: heads must be given; quick_gelu defaults to True.
    torch.save(hf, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pass heads="):
        load_hf_clip_vision(tmp_path / "pytorch_model.bin")
    arch, _ = load_hf_clip_vision(tmp_path / "pytorch_model.bin", heads=2)
    assert dataclasses.replace(arch, name=MICRO_QUICK.name) == MICRO_QUICK

    # Sharded checkpoints are read through their index.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(hf)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, ks in shards.items():
        save_file({k: hf[k].contiguous() for k in ks}, sharded / name)
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text(json.dumps(hf_vision_config(MICRO)))
    assert load_hf_clip_vision(sharded)[0] == MICRO

    bad = {**hf_vision_config(MICRO), "hidden_act": "gelu_new"}
    (sharded / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="hidden_act='gelu_new'"):
        load_hf_clip_vision(sharded)
    wrong = {**hf_vision_config(MICRO), "num_hidden_layers": 3}
    (sharded / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(
        CheckpointError, match=r"config.json disagrees.*'num_hidden_layers': \(3, 2\)"
    ):
        load_hf_clip_vision(sharded)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty holds none of"):
        load_hf_clip_vision(tmp_path / "empty")


def test_legacy_torch_format_and_malformed_trees(tv, tmp_path):
    from open_clip.model import CLIP

    clip = micro_clip(quick_gelu=False, seed=9)
    torch.save(clip, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    state = load_open_clip_image_tower(tmp_path / "legacy.pt", MICRO, trust_pickle=True)
    assert all(torch.equal(state[f"visual.{k}"], v) for k, v in clip.visual.state_dict().items())

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save(Evil(), tmp_path / "evil.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(
        CheckpointError, match=r"evil.pt contains a pickled reference to 'posix\.mkdir'"
    ):
        load_pickle_restricted(tmp_path / "evil.pt")
    assert not marker.exists()

    assert isinstance(clip, CLIP)
    clip.visual._modules["junk"] = {1, 2}  # an allowed object where a module belongs
    torch.save(clip, tmp_path / "junk.pt")
    with pytest.raises(
        CheckpointError,
        match=r"junk.pt: .*VisionTransformer has _modules\['junk'\] of type set",
    ):
        load_open_clip_image_tower(tmp_path / "junk.pt", MICRO, trust_pickle=True)

"""Zero-shot heads through the real open_clip path: a registered micro config, real tokenizer.

The config is written to a temporary folder and registered with ``open_clip.add_model_config``
under a name no other test uses, so ``create_model`` and ``get_tokenizer`` run unmodified.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.models.templates import (
    GENERIC_TEMPLATES,
    PAPER_CLASS_NAMES,
    PAPER_TASKS,
    TALL14_TASKS,
    TALL20_TASKS,
    TEMPLATES,
    paper_class_names,
    templates_for,
)
from surgery_edge.models.zeroshot import build_zeroshot_heads, load_clip, zeroshot_head

NAME = "Test-Micro-ViT-16"
CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {
        "image_size": 16,
        "patch_size": 8,
        "width": 32,
        "layers": 2,
        "head_width": 16,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = ["zebra crossing", "cat", "red and white circle 20 kph speed limit", "7"]
PROMPTS = ("a photo of a {}.", "a blurry photo of the {}.", 'the number: "{}".')


def _quiet(*_args):
    return None


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """(reference model, tokenizer, {format: weights file}) for the registered micro config."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("zeroshot")
    (root / f"{NAME}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(root / f"{NAME}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, pretrained=None).eval()
    with torch.no_grad():  # a logit scale that is not CLIP's default, so using it is checked
        model.logit_scale.fill_(3.0)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    files = {"safetensors": root / "clip.safetensors", "pt": root / "clip.pt"}
    save_file(state, str(files["safetensors"]))
    torch.save(state, files["pt"])
    return model, open_clip.get_tokenizer(NAME), files


def reference_weight(model, tokenizer, class_names, templates):
    """The task_vectors recipe, written out: per class normalise, mean, normalise, scale."""
    rows = []
    with torch.no_grad():
        for name in class_names:
            emb = model.encode_text(tokenizer([t.format(name) for t in templates]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(dim=0)
            rows.append(emb / emb.norm())
        return torch.stack(rows) * model.logit_scale.exp()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_head_matches_the_task_vectors_recipe(clip_files, fmt):
    ref_model, tokenizer, files = clip_files
    model = load_clip(NAME, files[fmt])
    assert not model.training
    head = zeroshot_head(model, tokenizer, CLASSES, PROMPTS, batch_size=5)  # 12 prompts: 3 calls
    expected = reference_weight(ref_model, tokenizer, CLASSES, PROMPTS)
    assert head.weight.shape == (len(CLASSES), CONFIG["embed_dim"])
    assert head.weight.device.type == "cpu" and head.weight.dtype == torch.float32
    torch.testing.assert_close(head.weight, expected, rtol=0, atol=1e-5)
    assert torch.all(head.bias == 0) and head.normalize
    # Rows are unit vectors times the model's (non-default) logit scale.
    torch.testing.assert_close(head.weight.norm(dim=-1), torch.full((4,), 3.0).exp())


def test_head_logits_equal_clips_own_zero_shot_logits(clip_files):
    ref_model, tokenizer, files = clip_files
    model = load_clip(NAME, files["safetensors"])
    head = zeroshot_head(model, tokenizer, CLASSES, ["a photo of a {}."])
    torch.manual_seed(1)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        image_logits, _ = ref_model.get_logits(
            images, tokenizer([f"a photo of a {c}." for c in CLASSES])
        )
        features = ref_model.encode_image(images)
        logits = head(features)
    torch.testing.assert_close(logits, image_logits, rtol=0, atol=1e-4)
    # And with several templates: logit_scale.exp() * cos(feature, mean prompt embedding).
    head = zeroshot_head(model, tokenizer, CLASSES, PROMPTS)
    features = torch.randn(5, CONFIG["embed_dim"])
    text = F.normalize(reference_weight(ref_model, tokenizer, CLASSES, PROMPTS), dim=-1)
    expected = ref_model.logit_scale.exp() * F.normalize(features, dim=-1) @ text.T
    torch.testing.assert_close(head(features), expected.detach(), rtol=0, atol=1e-4)


def test_class_order_is_kept(clip_files):
    _, tokenizer, files = clip_files
    model = load_clip(NAME, files["safetensors"])
    forward = zeroshot_head(model, tokenizer, CLASSES, PROMPTS)
    backward = zeroshot_head(model, tokenizer, CLASSES[::-1], PROMPTS)
    torch.testing.assert_close(backward.weight, forward.weight.flip(0))


def test_wrapped_and_prefixed_pt(clip_files, tmp_path):
    ref_model, tokenizer, files = clip_files
    state = torch.load(files["pt"], weights_only=True)
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_clip(NAME, path)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_build_zeroshot_heads(clip_files):
    _, tokenizer, files = clip_files
    messages = []
    names = {"MNIST": [str(i) for i in range(10)], "Shapes": ["circle", "square"]}
    heads = build_zeroshot_heads(
        NAME, files["pt"], names, templates={"Shapes": ["a drawing of a {}."]}, log=messages.append
    )
    assert list(heads) == ["MNIST", "Shapes"]
    model = load_clip(NAME, files["pt"])
    mnist = zeroshot_head(model, tokenizer, names["MNIST"], TEMPLATES["MNIST"])
    shapes = zeroshot_head(model, tokenizer, names["Shapes"], ["a drawing of a {}."])
    torch.testing.assert_close(heads["MNIST"].weight, mnist.weight)
    torch.testing.assert_close(heads["Shapes"].weight, shapes.weight)
    assert len(messages) == 2 and "MNIST" in messages[0]
    with pytest.raises(ConfigError, match="Cars"):
        build_zeroshot_heads(NAME, files["pt"], names, templates={"Cars": ["{}"]}, log=_quiet)


# --------------------------------------------------------------------------------------------
# Templates and class names
# --------------------------------------------------------------------------------------------


def test_templates_for_matching():
    assert templates_for("mnist") == TEMPLATES["MNIST"] == ('a photo of the number: "{}".',)
    assert templates_for("EuroSATVal") == TEMPLATES["EuroSAT"]
    assert templates_for("resisc45val") == TEMPLATES["RESISC45"]
    assert templates_for("flowers102") == ("a photo of a {}, a type of flower.",)
    assert templates_for("Country211") == GENERIC_TEMPLATES
    assert paper_class_names("gtsrbVal") == PAPER_CLASS_NAMES["GTSRB"]
    assert paper_class_names("Cars") is None


def test_every_template_formats():
    # Every task of the 8-, 14- and 20-task suites has its templates, and nothing else does.
    assert set(TEMPLATES) == set(TALL20_TASKS)
    assert len(PAPER_TASKS) == 8 and len(TALL14_TASKS) == 14 and len(TALL20_TASKS) == 20
    assert TALL20_TASKS[:14] == TALL14_TASKS and TALL14_TASKS[:8] == PAPER_TASKS
    assert len(set(TALL20_TASKS)) == 20
    for task, templates in {**TEMPLATES, "generic": GENERIC_TEMPLATES}.items():
        assert templates and len(set(templates)) == len(templates), task
        for t in templates:
            assert t.count("{}") == 1, (task, t)
            assert t.format("zebra").count("zebra") == 1
    assert len(TEMPLATES["RESISC45"]) == 18 and len(TEMPLATES["Cars"]) == 8
    assert len(TEMPLATES["DTD"]) == 8 and len(TEMPLATES["GTSRB"]) == 3
    assert len(TEMPLATES["CIFAR100"]) == 18 and len(TEMPLATES["FER2013"]) == 6


def test_paper_class_names():
    sizes = {"MNIST": 10, "SVHN": 10, "EuroSAT": 10, "GTSRB": 43, "RESISC45": 45, "PCAM": 2}
    sizes["FER2013"] = 7
    assert {k: len(v) for k, v in PAPER_CLASS_NAMES.items()} == sizes
    for names in PAPER_CLASS_NAMES.values():
        assert len(set(names)) == len(names)
    assert PAPER_CLASS_NAMES["MNIST"] == tuple("0123456789")
    assert PAPER_CLASS_NAMES["EuroSAT"][0] == "annual crop land"
    assert PAPER_CLASS_NAMES["EuroSAT"][-1] == "lake or sea"
    assert PAPER_CLASS_NAMES["GTSRB"][0] == "red and white circle 20 kph speed limit"
    assert PAPER_CLASS_NAMES["GTSRB"][14] == "stop"
    fer = PAPER_CLASS_NAMES["FER2013"]
    assert fer[3] == "happy" and fer[6] == "neutral"
    resisc = PAPER_CLASS_NAMES["RESISC45"]
    assert list(resisc) == sorted(resisc) and resisc[:3] == (
        "airplane",
        "airport",
        "baseball diamond",
    )


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_file(clip_files, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip(NAME, tmp_path / "nope.safetensors")


def test_image_tower_only_file(clip_files, tmp_path):
    from safetensors.torch import save_file

    _, _, files = clip_files
    state = torch.load(files["pt"], weights_only=True)
    path = tmp_path / "visual.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("visual.")}, str(path))
    with pytest.raises(CheckpointError, match="text tower") as e:
        load_clip(NAME, path)
    assert str(path) in str(e.value) and "zeroshot.pt" in str(e.value)


def test_weights_of_another_config(clip_files, tmp_path):
    import open_clip

    cfg = json.loads(json.dumps(CONFIG))
    cfg["vision_cfg"]["width"] = 48
    other = open_clip.model.CLIP(**cfg)
    path = tmp_path / "wide.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        load_clip(NAME, path)
    assert str(path) in str(e.value) and "visual.conv1.weight" in str(e.value)
    state = dict(torch.load(clip_files[2]["pt"], weights_only=True))
    state["extra.weight"] = state.pop("ln_final.weight")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing keys.*ln_final.weight.*unexpected.*extra"):
        load_clip(NAME, path)


def test_unknown_or_textless_model_name(clip_files):
    _, _, files = clip_files
    with pytest.raises(ConfigError, match="No-Such-ViT"):
        load_clip("No-Such-ViT", files["pt"])
    with pytest.raises(ConfigError, match="no text tower"):
        load_clip("micro-vit-16", files["pt"])


def test_bad_class_names_or_templates(clip_files):
    _, tokenizer, files = clip_files
    model = load_clip(NAME, files["pt"])
    with pytest.raises(ConfigError, match="class names"):
        zeroshot_head(model, tokenizer, [], PROMPTS)
    with pytest.raises(ConfigError, match="placeholder"):
        zeroshot_head(model, tokenizer, CLASSES, ["a photo of a cat."])
    with pytest.raises(ConfigError, match="templates"):
        zeroshot_head(model, tokenizer, CLASSES, [])
    with pytest.raises(ConfigError, match="MNIST"):
        build_zeroshot_heads(NAME, files["pt"], {"MNIST": []}, log=_quiet)

import pytest
import torch

from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.models import (
    ClassificationHead,
    build_encoder,
    get_arch,
    load_encoder,
    load_head,
    save_encoder,
    save_head,
)


def test_open_clip_configs_are_read_not_hard_coded():
    b32, l14 = get_arch("ViT-B-32"), get_arch("ViT-L-14")
    assert (b32.width, b32.layers, b32.embed_dim, b32.num_tokens) == (768, 12, 512, 50)
    assert (l14.width, l14.layers, l14.embed_dim, l14.num_tokens) == (1024, 24, 768, 257)
    assert b32.sites[-1] == "final" and len(b32.sites) == 13


def test_unknown_arch_names_the_value():
    with pytest.raises(ConfigError, match="ViT-Q-99"):
        get_arch("ViT-Q-99")


def test_encoder_matches_open_clip_forward():
    arch = get_arch("micro-vit-16")
    enc = build_encoder(arch).eval()
    x = torch.randn(3, 3, arch.image_size, arch.image_size)
    with torch.no_grad():
        ours, blocks = enc.forward_with_blocks(x)
        theirs = enc.visual(x)  # open_clip's own VisionTransformer.forward
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert len(blocks) == arch.layers and blocks[0].shape == (3, arch.num_tokens, arch.width)


def test_state_dict_keys_are_open_clip_visual_keys():
    keys = build_encoder(get_arch("micro-vit-16")).state_dict().keys()
    assert "visual.conv1.weight" in keys and "visual.proj" in keys
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in keys


def test_checkpoint_round_trip(tmp_path):
    arch = get_arch("micro-vit-16")
    sd = build_encoder(arch).state_dict()
    path = save_encoder(tmp_path / "e.safetensors", arch, sd, task="digits")
    ckpt = load_encoder(path, arch)
    assert ckpt.meta["task"] == "digits" and ckpt.arch == arch
    for k, v in sd.items():
        assert torch.equal(ckpt.state_dict[k], v)
    head = ClassificationHead(torch.randn(4, arch.embed_dim), torch.randn(4))
    hp = save_head(tmp_path / "h.safetensors", arch, "t", ["a", "b", "c", "d"], head)
    loaded = load_head(hp, arch)
    assert loaded.class_names == ["a", "b", "c", "d"]
    assert torch.equal(loaded.head.weight, head.weight)


def test_wrong_architecture_is_refused_with_the_difference(tmp_path):
    micro, tiny = get_arch("micro-vit-16"), get_arch("tiny-vit-32")
    path = save_encoder(tmp_path / "e.safetensors", micro, build_encoder(micro).state_dict())
    with pytest.raises(CheckpointError, match="micro-vit-16.*tiny-vit-32.*width"):
        load_encoder(path, tiny)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="bad.safetensors.*corrupt"):
        load_encoder(bad)


def test_shape_mismatch_is_listed(tmp_path):
    arch = get_arch("micro-vit-16")
    sd = build_encoder(arch).state_dict()
    sd["visual.proj"] = torch.zeros(3, 3)
    del sd["visual.ln_post.bias"]
    path = save_encoder(tmp_path / "e.safetensors", arch, sd)
    with pytest.raises(CheckpointError, match=r"missing keys.*ln_post.bias.*visual.proj: \(3, 3\)"):
        load_encoder(path)


def test_atomic_writes_have_normal_permissions(tmp_path):
    import os
    import stat

    from surgery_edge.io import write_text_atomic

    path = write_text_atomic(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_arch_takes_normalisation_from_the_open_clip_config(tmp_path):
    import json

    import open_clip

    from surgery_edge.models import get_arch

    config = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    (tmp_path / "Test-Norm-ViT-16.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "Test-Norm-ViT-16.json")
    arch = get_arch("Test-Norm-ViT-16")
    assert arch.mean == (0.5, 0.5, 0.5) and arch.std == (0.25, 0.25, 0.25)
    assert arch.image_size == 16 and arch.width == 32 and arch.embed_dim == 24
    assert get_arch("ViT-B-32").mean == (0.48145466, 0.4578275, 0.40821073)


def test_a_sequence_first_tower_is_refused(monkeypatch):
    """open_clip < 2.26 builds attention sequence-first: fed batch-first it mixes images."""
    from open_clip.transformer import Transformer

    from surgery_edge.errors import ConfigError
    from surgery_edge.models import encoder

    real = Transformer.__init__

    def sequence_first(self, *args, **kwargs):
        real(self, *args, **{**kwargs, "batch_first": False})

    monkeypatch.setattr(Transformer, "__init__", sequence_first)
    with pytest.raises(ConfigError, match="Block 0 .* sequence-first.*open_clip_torch>=2.26"):
        encoder.ImageEncoder(get_arch("micro-vit-16"))

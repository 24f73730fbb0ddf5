"""Hugging Face CLIP vision weights <-> open_clip image-tower weights.

Hugging Face's ``CLIPVisionModelWithProjection`` (and the vision half of ``CLIPModel``) computes
exactly what open_clip's ``VisionTransformer`` computes; only the names and the attention layout
differ. The mapping (``{i}`` is the block index)::

    vision_model.embeddings.patch_embedding.weight     visual.conv1.weight
    vision_model.embeddings.class_embedding            visual.class_embedding
    vision_model.embeddings.position_embedding.weight  visual.positional_embedding
    vision_model.pre_layrnorm.*  (HF's spelling)       visual.ln_pre.*
    vision_model.encoder.layers.{i}.layer_norm1.*      visual.transformer.resblocks.{i}.ln_1.*
    ...layers.{i}.self_attn.{q,k,v}_proj.{weight,bias} ...resblocks.{i}.attn.in_proj_{weight,bias}
                                                        (= cat(q, k, v) along dim 0)
    ...layers.{i}.self_attn.out_proj.*                 ...resblocks.{i}.attn.out_proj.*
    ...layers.{i}.layer_norm2.*                        ...resblocks.{i}.ln_2.*
    ...layers.{i}.mlp.fc1.*                            ...resblocks.{i}.mlp.c_fc.*
    ...layers.{i}.mlp.fc2.*                            ...resblocks.{i}.mlp.c_proj.*
    vision_model.post_layernorm.*                      visual.ln_post.*
    visual_projection.weight  (embed, width), no bias  visual.proj = its transpose (width, embed)

The weights do not record the number of attention heads or the MLP activation; they come from the
model's ``config.json`` (``num_attention_heads``, ``hidden_act``). HF CLIP's default activation is
``quick_gelu``, as in OpenAI's release: such weights need an ArchSpec with ``quick_gelu=True``
(open_clip's ``ViT-B-32-quickgelu``, not ``ViT-B-32``). ``vision_model.embeddings.position_ids``
(a buffer older transformers versions saved) and every text-tower key are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.models.archs import TINY_ARCHS, ArchSpec, get_arch
from surgery_edge.models.convert.archives import check_archive, import_budget
from surgery_edge.models.convert.sandbox import check_tensor_storage
from surgery_edge.models.convert.towers import check_tower

HF = "vision_model."
HF_PROJ = "visual_projection.weight"
HF_IGNORED = ("vision_model.embeddings.position_ids",)
HF_LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm uses torch's default eps

# Renamed one to one: (open_clip name, HF name).
_GLOBAL = (
    ("visual.conv1.weight", f"{HF}embeddings.patch_embedding.weight"),
    ("visual.class_embedding", f"{HF}embeddings.class_embedding"),
    ("visual.positional_embedding", f"{HF}embeddings.position_embedding.weight"),
    ("visual.ln_pre.weight", f"{HF}pre_layrnorm.weight"),
    ("visual.ln_pre.bias", f"{HF}pre_layrnorm.bias"),
    ("visual.ln_post.weight", f"{HF}post_layernorm.weight"),
    ("visual.ln_post.bias", f"{HF}post_layernorm.bias"),
)
_BLOCK = tuple(
    (f"{oc}.{p}", f"{hf}.{p}")
    for oc, hf in (
        ("ln_1", "layer_norm1"),
        ("attn.out_proj", "self_attn.out_proj"),
        ("ln_2", "layer_norm2"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
    )
    for p in ("weight", "bias")
)
_QKV = ("q_proj", "k_proj", "v_proj")


def _oc_block(i: int) -> str:
    return f"visual.transformer.resblocks.{i}."


def _hf_block(i: int) -> str:
    return f"{HF}encoder.layers.{i}."


def hf_layer_count(hf_state: Mapping[str, torch.Tensor], where: str = "state dict") -> int:
    """The number of encoder layers in a HF CLIP vision state dict (checked to be 0..L-1)."""
    found = {
        int(m.group(1))
        for k in hf_state
        if (m := re.match(rf"{re.escape(HF)}encoder\.layers\.(\d+)\.", k))
    }
    if not found:
        raise CheckpointError(
            f"{where} has no '{HF}encoder.layers.*' keys: not a Hugging Face CLIP vision model "
            f"(found e.g. {sorted(hf_state)[:5]})."
        )
    if found != set(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise CheckpointError(f"{where} lacks encoder layers {missing}.")
    return len(found)


def open_clip_to_hf(state: Mapping[str, torch.Tensor], arch: ArchSpec) -> dict[str, torch.Tensor]:
    """Convert an open_clip image tower (``visual.*``) to ``CLIPVisionModelWithProjection`` keys.

    Args:
        state: this project's encoder state dict (open_clip's image-tower keys).
        arch: its architecture (validated).

    Returns:
        ``vision_model.*`` and ``visual_projection.weight`` tensors.
    """
    check_tower("open_clip image tower", state, arch)
    out = {hf: state[oc] for oc, hf in _GLOBAL}
    out[HF_PROJ] = state["visual.proj"].t().contiguous()
    for i in range(arch.layers):
        oc, hf = _oc_block(i), _hf_block(i)
        out.update({hf + h: state[oc + o] for o, h in _BLOCK})
        for kind in ("weight", "bias"):
            q, k, v = state[f"{oc}attn.in_proj_{kind}"].chunk(3, dim=0)
            for name, t in zip(_QKV, (q, k, v)):
                out[f"{hf}self_attn.{name}.{kind}"] = t.contiguous()
    return out


def hf_clip_to_open_clip(
    hf_state: Mapping[str, torch.Tensor],
    arch: ArchSpec,
    where: str = "Hugging Face CLIP state dict",
) -> dict[str, torch.Tensor]:
    """Convert a HF ``CLIPVisionModelWithProjection`` / ``CLIPModel`` state dict to ``visual.*``.

    Text-tower keys are ignored. Tensors are returned as fp32.

    Args:
        hf_state: the HF state dict.
        arch: the architecture the result must fit (see :func:`arch_from_hf`).
        where: names the source in error messages (a file path).

    Raises:
        CheckpointError: keys missing (e.g. a ``CLIPVisionModel`` has no ``visual_projection``),
            unexpected vision keys, or a result that does not fit ``arch``.
    """
    if HF_PROJ not in hf_state:
        raise CheckpointError(
            f"{where} has no '{HF_PROJ}': a CLIPVisionModel without projection. Use the weights "
            "of CLIPVisionModelWithProjection or CLIPModel, whose projection gives the feature "
            "the heads consume."
        )
    layers = hf_layer_count(hf_state, where)
    pairs = list(_GLOBAL)
    for i in range(layers):
        pairs += [(_oc_block(i) + o, _hf_block(i) + h) for o, h in _BLOCK]
    qkv = [
        (
            f"{_oc_block(i)}attn.in_proj_{kind}",
            [f"{_hf_block(i)}self_attn.{n}.{kind}" for n in _QKV],
        )
        for i in range(layers)
        for kind in ("weight", "bias")
    ]
    needed = [hf for _, hf in pairs] + [k for _, names in qkv for k in names]
    missing = [k for k in needed if k not in hf_state]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} vision keys (e.g. {missing[:5]}).")
    consumed = {*needed, HF_PROJ, *HF_IGNORED}
    unexpected = sorted(k for k in hf_state if k.startswith(HF) and k not in consumed)
    if unexpected:
        raise CheckpointError(
            f"{where} has {len(unexpected)} vision keys this converter does not know (e.g. "
            f"{unexpected[:5]}): not a standard CLIP vision tower."
        )
    out = {oc: hf_state[hf] for oc, hf in pairs}
    for oc, names in qkv:
        out[oc] = torch.cat([hf_state[n] for n in names], dim=0)
    out["visual.proj"] = hf_state[HF_PROJ].t().contiguous()
    out = {k: v.float().contiguous() for k, v in out.items()}
    check_tower(where, out, arch)
    return out


def open_clip_name(spec: ArchSpec) -> str | None:
    """The tiny or open_clip config name whose ArchSpec equals ``spec`` up to its name, if any."""
    import open_clip  # deferred: importing open_clip takes seconds and loads Triton

    names = [*TINY_ARCHS, *(n for n in open_clip.list_models() if n.startswith("ViT-"))]
    for name in names:
        try:
            known = get_arch(name)
        except ConfigError:
            continue
        if dataclasses.replace(spec, name=name) == known:
            return name
    return None


def arch_from_hf(
    hf_state: Mapping[str, torch.Tensor],
    *,
    heads: int,
    quick_gelu: bool = True,
    name: str | None = None,
    where: str = "Hugging Face CLIP state dict",
) -> ArchSpec:
    """Read the architecture off HF CLIP vision weights.

    Args:
        hf_state: the HF state dict.
        heads: attention heads per block (``num_attention_heads``; not in the weights).
        quick_gelu: ``hidden_act == "quick_gelu"`` (HF CLIP's default and OpenAI's weights).
        name: the ArchSpec's name; default: the matching open_clip config name
            (``ViT-B-32-quickgelu``), else ``hf-clip-vit-w{width}-p{patch}-l{layers}``.
        where: names the source in error messages.
    """
    try:
        cls = hf_state[f"{HF}embeddings.class_embedding"]
        patch = hf_state[f"{HF}embeddings.patch_embedding.weight"]
        pos = hf_state[f"{HF}embeddings.position_embedding.weight"]
        fc1 = hf_state[f"{HF}encoder.layers.0.mlp.fc1.weight"]
        proj = hf_state.get(HF_PROJ)
    except KeyError as e:
        raise CheckpointError(f"{where} lacks {e}: not a Hugging Face CLIP vision model.") from None
    if proj is None:
        raise CheckpointError(f"{where} has no '{HF_PROJ}' (a CLIPVisionModel without projection).")
    width, p = cls.shape[0], patch.shape[-1]
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid + 1 != pos.shape[0] or patch.shape != (width, 3, p, p):
        raise CheckpointError(
            f"{where} has position embeddings {tuple(pos.shape)} and patch embedding "
            f"{tuple(patch.shape)}: not a square-grid CLIP ViT with a class token."
        )
    if heads <= 0 or width % heads:
        raise ConfigError(f"{heads} attention heads do not divide the width {width} of {where}.")
    layers = hf_layer_count(hf_state, where)
    spec = ArchSpec(
        name="",
        image_size=grid * p,
        patch_size=p,
        width=width,
        layers=layers,
        heads=heads,
        mlp_ratio=fc1.shape[0] / width,
        embed_dim=proj.shape[0],
        quick_gelu=quick_gelu,
    )
    name = name or open_clip_name(spec) or f"hf-clip-vit-w{width}-p{p}-l{layers}"
    return dataclasses.replace(spec, name=name)


def hf_vision_config(arch: ArchSpec) -> dict[str, Any]:
    """A ``CLIPVisionConfig`` (as a dict) describing ``arch``, for writing HF checkpoints."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": arch.width,
        "intermediate_size": round(arch.width * arch.mlp_ratio),
        "num_hidden_layers": arch.layers,
        "num_attention_heads": arch.heads,
        "num_channels": 3,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "projection_dim": arch.embed_dim,
        "hidden_act": "quick_gelu" if arch.quick_gelu else "gelu",
        "layer_norm_eps": HF_LAYER_NORM_EPS,
    }


# What config.json holds when a value equals CLIPVisionConfig's default (transformers omits it).
_HF_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}


def _vision_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    vision = config.get("vision_config", config) or {}
    if not isinstance(vision, Mapping):
        raise CheckpointError(f"{where}: 'vision_config' is not an object.")
    vision = {**_HF_DEFAULTS, **vision}
    act = vision["hidden_act"]
    if act not in _ACTIVATIONS:
        raise ConfigError(
            f"{where} uses hidden_act={act!r}; surgery-edge supports 'quick_gelu' and 'gelu'."
        )
    if not math.isclose(float(vision["layer_norm_eps"]), HF_LAYER_NORM_EPS):
        raise ConfigError(
            f"{where} uses layer_norm_eps={vision['layer_norm_eps']}; open_clip towers use "
            f"{HF_LAYER_NORM_EPS}."
        )
    return vision


def _check_config_geometry(vision: Mapping[str, Any], arch: ArchSpec, where: str) -> None:
    expected = hf_vision_config(arch)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size")
    wrong = {k: (vision[k], expected[k]) for k in keys if k in vision and vision[k] != expected[k]}
    if wrong:
        raise CheckpointError(
            f"{where} disagrees with the weights (config value, weights): {wrong}."
        )


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read only the vision tensors of a HF checkpoint file, or of a sharded one's index."""
    wanted = (HF, HF_PROJ)
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is not a sharded-checkpoint index ({e}).") from None
        shards = sorted({f for k, f in weight_map.items() if k.startswith(wanted)})
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_hf_weights(path.parent / shard))
        return state
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Check the path.")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)}
        check_archive(path)
        with import_budget(path):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt files raise many exception types
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {e}). Hugging Face "
            "checkpoints are plain state dicts; anything else is refused."
        ) from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    state = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith(wanted)}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: {key} holds a {type(tensor).__name__}, not a tensor.")
        check_tensor_storage(f"{path}: {key}", tensor)
    return state


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def load_hf_clip_vision(
    path: str | os.PathLike,
    arch: ArchSpec | None = None,
    *,
    heads: int | None = None,
    quick_gelu: bool | None = None,
) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
    """Load a Hugging Face CLIP checkpoint's image tower as open_clip weights.

    Args:
        path: a model folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` or
            their sharded ``*.index.json``), or one weights file (a ``config.json`` beside it is
            read if present).
        arch: the architecture the weights must fit; default: read off the weights and config.
        heads: attention heads per block, when there is no ``config.json``.
        quick_gelu: the activation, when there is no ``config.json`` (default True, HF's default).

    Returns:
        ``(arch, state)``: the architecture and the fp32 ``visual.*`` state dict.
    """
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path} holds none of {list(_WEIGHT_FILES)}.")
        config_path = path / "config.json"
    else:
        weights, config_path = path, path.parent / "config.json"
    hf_state = _read_hf_weights(weights)
    where = str(weights)
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path} is not valid JSON ({e}).") from None
        vision = _vision_config(config, str(config_path))
        from_config = {
            "heads": int(vision["num_attention_heads"]),
            "quick_gelu": _ACTIVATIONS[vision["hidden_act"]],
        }
        given = {"heads": heads, "quick_gelu": quick_gelu}
        clash = {
            k: (v, from_config[k]) for k, v in given.items() if v not in (None, from_config[k])
        }
        if clash:
            raise ConfigError(f"Arguments disagree with {config_path} (argument, config): {clash}.")
        heads, quick_gelu = from_config["heads"], from_config["quick_gelu"]
    else:
        vision = None
        if heads is None and arch is None:
            raise ConfigError(
                f"{weights} has no config.json beside it, and the weights do not record the "
                "number of attention heads: pass heads= (num_attention_heads) or an architecture."
            )
    if arch is None:
        arch = arch_from_hf(
            hf_state,
            heads=heads,
            quick_gelu=True if quick_gelu is None else quick_gelu,
            where=where,
        )
    else:
        facts = {"heads": heads, "quick_gelu": quick_gelu}
        wrong = {
            k: (v, getattr(arch, k)) for k, v in facts.items() if v not in (None, getattr(arch, k))
        }
        if wrong:
            raise CheckpointError(
                f"{where} does not fit architecture {arch.name!r} (checkpoint, architecture): "
                f"{wrong}."
            )
    if vision is not None:
        _check_config_geometry(vision, arch, str(config_path))
    return arch, hf_clip_to_open_clip(hf_state, arch, where)


__all__ = [
    "arch_from_hf",
    "hf_clip_to_open_clip",
    "hf_layer_count",
    "hf_vision_config",
    "load_hf_clip_vision",
    "open_clip_name",
    "open_clip_to_hf",
]

"""Image-tower checks shared by every source (open_clip, task_vectors, Hugging Face).

Shapes are checked against the encoder this project builds for an :class:`ArchSpec`
(:func:`check_tower`); what shapes cannot tell, the attention heads and the MLP activation, is
read off an unpickled module tree when there is one (:func:`tower_facts`, :func:`check_facts`).
:func:`with_activation` names the QuickGELU / GELU variant of an architecture as open_clip does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.models.archs import ArchSpec, get_arch
from surgery_edge.models.checkpoint import check_state_dict
from surgery_edge.models.convert.sandbox import StandInModule, original_class, stand_in_child
from surgery_edge.models.encoder import build_encoder


def expected_tower_state(arch: ArchSpec) -> dict[str, torch.Tensor]:
    """The encoder's state dict for ``arch`` on the meta device: keys and shapes, no memory."""
    with torch.device("meta"):
        return build_encoder(arch).state_dict()


def describe_tower(state: Mapping[str, torch.Tensor]) -> str:
    """Geometry read off an open_clip image tower's weights, for error messages."""
    try:
        conv = state["visual.conv1.weight"]
        tokens = state["visual.positional_embedding"].shape[0]
        layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.")})
        fc = state["visual.transformer.resblocks.0.mlp.c_fc.weight"]
        embed = state["visual.proj"].shape[1]
    except (KeyError, IndexError):
        return "an image tower of another layout"
    grid = round((tokens - 1) ** 0.5)
    return (
        f"a ViT with width {conv.shape[0]}, patch {conv.shape[-1]}, image {grid * conv.shape[-1]}, "
        f"{layers} blocks, MLP width {fc.shape[0]} and {embed}-d output"
    )


def check_tower(where: str, state: Mapping[str, torch.Tensor], arch: ArchSpec) -> None:
    """Raise :class:`CheckpointError` if ``state`` is not an image tower of ``arch``."""
    try:
        check_state_dict(where, dict(state), expected_tower_state(arch))
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}. The weights look like {describe_tower(state)}; architecture {arch.name!r} has "
            f"width {arch.width}, patch {arch.patch_size}, image {arch.image_size}, "
            f"{arch.layers} blocks and {arch.embed_dim}-d output. Pass the architecture the "
            "checkpoint was trained with."
        ) from None


def as_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with floating tensors in fp32 (our encoders' dtype; fp16 upcasts exactly)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def tower_from_module(obj: Any, path: Path) -> StandInModule:
    """The ``visual`` stand-in of an unpickled task_vectors ImageEncoder or open_clip CLIP."""
    kind = original_class(obj)
    model = stand_in_child(obj, "model") if kind == "src.modeling.ImageEncoder" else obj
    visual = stand_in_child(model, "visual")
    if visual is None:
        raise CheckpointError(
            f"{path} holds a {kind} object ({original_class(model)}), not an image encoder "
            "(src.modeling.ImageEncoder with `.model.visual`, or open_clip CLIP with `.visual`)."
        )
    if not original_class(visual).endswith(("VisionTransformer", "VisualTransformer")):
        raise CheckpointError(
            f"{path} has a {original_class(visual)} image tower; surgery-edge supports open_clip "
            "VisionTransformer towers only."
        )
    return visual


def tower_facts(visual: StandInModule) -> dict[str, Any]:
    """What the module tree says beyond shapes: attention heads and the MLP activation."""
    facts: dict[str, Any] = {}
    block = stand_in_child(stand_in_child(stand_in_child(visual, "transformer"), "resblocks"), "0")
    if block is None:
        return facts
    attn = stand_in_child(block, "attn")
    heads = vars(attn).get("num_heads") if attn is not None else None
    if isinstance(heads, int):
        facts["heads"] = heads
    mlp = stand_in_child(block, "mlp")
    children = vars(mlp).get("_modules") if mlp is not None else None
    acts = [original_class(m) for m in children.values()] if isinstance(children, Mapping) else []
    if any(a.endswith(".QuickGELU") for a in acts):
        facts["quick_gelu"] = True
    elif any(a.endswith(".GELU") for a in acts):
        facts["quick_gelu"] = False
    return facts


def check_facts(path: Path, facts: Mapping[str, Any], arch: ArchSpec) -> None:
    """Raise :class:`CheckpointError` if :func:`tower_facts` of ``path`` contradict ``arch``."""
    if "heads" in facts and facts["heads"] != arch.heads:
        raise CheckpointError(
            f"{path} has {facts['heads']} attention heads per block, but architecture "
            f"{arch.name!r} has {arch.heads}. Pass the architecture the checkpoint was trained "
            "with."
        )
    if "quick_gelu" in facts and facts["quick_gelu"] != arch.quick_gelu:
        act = "QuickGELU (OpenAI CLIP weights)" if facts["quick_gelu"] else "GELU"
        raise CheckpointError(
            f"{path} uses {act} in its MLPs, but architecture {arch.name!r} has "
            f"quick_gelu={arch.quick_gelu}. Use the matching architecture"
            f"{_variant_hint(arch, facts['quick_gelu'])}."
        )


def _activation_variant_name(name: str, quick_gelu: bool) -> str:
    base = name.removesuffix("-quickgelu")
    return f"{base}-quickgelu" if quick_gelu else base


def _variant_hint(arch: ArchSpec, quick_gelu: bool) -> str:
    variant = with_activation(arch, quick_gelu)
    try:
        get_arch(variant.name)
    except ConfigError:
        return f" (an ArchSpec with quick_gelu={quick_gelu})"
    return f" ({variant.name!r})"


def with_activation(arch: ArchSpec, quick_gelu: bool) -> ArchSpec:
    """``arch`` with its MLP activation set; named as open_clip names it (``ViT-B-32-quickgelu``).

    OpenAI's CLIP weights were trained with QuickGELU, so models built from them (all of
    task_vectors' checkpoints) need ``quick_gelu=True`` although open_clip's ``ViT-B-32`` config
    has ``quick_gelu=False``.
    """
    if arch.quick_gelu == quick_gelu:
        return arch
    name = _activation_variant_name(arch.name, quick_gelu)
    variant = dataclasses.replace(arch, name=name, quick_gelu=quick_gelu)
    try:
        known = get_arch(name)
    except ConfigError:
        return variant
    return known if known == variant else variant


__all__ = [
    "as_float32",
    "check_facts",
    "check_tower",
    "describe_tower",
    "expected_tower_state",
    "tower_facts",
    "tower_from_module",
    "with_activation",
]

"""Architectures: open_clip ViT image towers by config name, plus tiny configs for CPU work.

An :class:`ArchSpec` is everything needed to rebuild an image encoder and preprocess its input.
Nothing downstream hard-codes a width, depth or token count: they are all read from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from surgery_edge.engine_format import Preprocessing
from surgery_edge.errors import ConfigError
from surgery_edge.models.metadata import ArchFields, describe_errors

# CLIP's preprocessing statistics (open_clip.constants.OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ArchSpec:
    """A ViT image tower: geometry, width/depth and preprocessing.

    ``name`` is an open_clip model config name (``ViT-B-32``) or one of :data:`TINY_ARCHS`.
    """

    name: str
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    embed_dim: int  # output of the visual projection: the "final" feature the heads consume
    quick_gelu: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @property
    def num_tokens(self) -> int:
        """Tokens per image inside the transformer (patches + class token)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def sites(self) -> tuple[str, ...]:
        """Surgery sites: every block output, then the final projected feature."""
        return tuple(f"block.{i}" for i in range(self.layers)) + ("final",)

    @property
    def preprocessing(self) -> Preprocessing:
        """open_clip's eval transform at this model's size and statistics."""
        return Preprocessing(self.image_size, self.mean, self.std)

    def site_dim(self, site: str) -> int:
        return self.embed_dim if site == "final" else self.width

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ArchSpec:
        """An architecture as stored in a file's metadata; every field is checked.

        Raises:
            ConfigError: naming each missing, unknown or malformed field.
        """
        try:
            fields = ArchFields.model_validate(d)
        except ValidationError as e:
            raise ConfigError(f"Invalid architecture description: {describe_errors(e)}.") from None
        return cls.from_fields(fields)

    @classmethod
    def from_fields(cls, fields: Any) -> ArchSpec:
        """From validated :class:`~surgery_edge.models.metadata.ArchFields`."""
        d = fields.model_dump()
        d["mean"], d["std"] = tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"])
        d["mlp_ratio"] = float(d["mlp_ratio"])
        return cls(**d)


TINY_ARCHS: dict[str, ArchSpec] = {
    # The built-in suite's model: 32x32 RGB, 4x4 grid of 8-px patches (17 tokens), 4 blocks.
    "tiny-vit-32": ArchSpec(
        name="tiny-vit-32",
        image_size=32,
        patch_size=8,
        width=128,
        layers=4,
        heads=4,
        mlp_ratio=4.0,
        embed_dim=128,
    ),
    # A smaller one for unit tests.
    "micro-vit-16": ArchSpec(
        name="micro-vit-16",
        image_size=16,
        patch_size=8,
        width=32,
        layers=2,
        heads=2,
        mlp_ratio=2.0,
        embed_dim=24,
    ),
}


def get_arch(name: str) -> ArchSpec:
    """Return the :class:`ArchSpec` for a tiny config or an open_clip ViT config name."""
    if name in TINY_ARCHS:
        return TINY_ARCHS[name]
    import open_clip  # deferred: importing open_clip takes seconds and loads Triton

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(
            f"Unknown architecture {name!r}. Use one of the tiny configs {sorted(TINY_ARCHS)} or "
            f"an open_clip ViT config name such as 'ViT-B-32', 'ViT-B-16' or 'ViT-L-14'."
        )
    vision = cfg["vision_cfg"]
    if isinstance(vision.get("layers"), (list, tuple)) or vision.get("timm_model_name"):
        raise ConfigError(
            f"Architecture {name!r} is not a plain ViT (ResNet or timm tower); surgery-edge "
            "supports open_clip VisionTransformer towers."
        )
    unsupported = {
        k: vision[k]
        for k in ("attentional_pool", "final_ln_after_pool", "no_ln_pre", "ls_init_value")
        if vision.get(k)
    }
    if vision.get("pool_type", "tok") != "tok":
        unsupported["pool_type"] = vision["pool_type"]
    if unsupported:
        raise ConfigError(
            f"Architecture {name!r} uses {unsupported}, which surgery-edge does not support yet: "
            "only CLIP-style ViTs (class-token pooling, ln_pre, ln_post, projection)."
        )
    width = vision["width"]
    head_width = vision.get("head_width", 64)
    size = vision["image_size"]
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ConfigError(f"Architecture {name!r} has a non-square input {size}.")
        size = size[0]
    # Configs may carry their own normalisation (open_clip's preprocess_cfg); CLIP's otherwise.
    pre = cfg.get("preprocess_cfg") or {}
    return ArchSpec(
        name=name,
        mean=tuple(float(v) for v in pre.get("mean", CLIP_MEAN)),
        std=tuple(float(v) for v in pre.get("std", CLIP_STD)),
        image_size=int(size),
        patch_size=int(vision["patch_size"]),
        width=int(width),
        layers=int(vision["layers"]),
        heads=int(width // head_width),
        mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
        embed_dim=int(cfg["embed_dim"]),
        quick_gelu=bool(cfg.get("quick_gelu", False)),
    )

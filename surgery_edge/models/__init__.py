"""Architectures, the image encoder, heads and checkpoint IO."""

from surgery_edge.models.archs import TINY_ARCHS, ArchSpec, get_arch
from surgery_edge.models.checkpoint import (
    EncoderCheckpoint,
    HeadCheckpoint,
    load_encoder,
    load_head,
    save_encoder,
    save_head,
)
from surgery_edge.models.encoder import ImageEncoder, build_encoder
from surgery_edge.models.heads import ClassificationHead, prototype_head

__all__ = [
    "TINY_ARCHS",
    "ArchSpec",
    "ClassificationHead",
    "EncoderCheckpoint",
    "HeadCheckpoint",
    "ImageEncoder",
    "build_encoder",
    "get_arch",
    "load_encoder",
    "load_head",
    "prototype_head",
    "save_encoder",
    "save_head",
]

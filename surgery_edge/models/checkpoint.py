"""Checkpoints: safetensors files with a JSON metadata header.

Every file this project writes stores its tensors plus, under the metadata key ``surgery_edge``,
a JSON object with at least ``kind`` (``encoder`` | ``head`` | ``adapters``) and ``arch`` (the
:class:`~surgery_edge.models.archs.ArchSpec` as a dict). Encoders also carry ``task`` (or null
for the pretrained model) and heads carry ``task`` and ``class_names``. Loading validates the
architecture and every key and shape, and says exactly what mismatches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgery_edge.errors import CheckpointError
from surgery_edge.io import atomic_path
from surgery_edge.models.archs import ArchSpec
from surgery_edge.models.encoder import ImageEncoder, build_encoder
from surgery_edge.models.heads import ClassificationHead
from surgery_edge.models.metadata import EncoderMeta, HeadMeta, parse_meta

META_KEY = "surgery_edge"
FORMAT_VERSION = 1


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and ``meta`` to a safetensors file atomically."""
    meta = {"format_version": FORMAT_VERSION, **meta}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return Path(path)


def load_tensors(
    path: str | os.PathLike, finite: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file written by :func:`save_tensors`; clear errors for bad files.

    Args:
        finite: refuse a file whose floating-point tensors hold NaN or infinity (weights that
            would silently turn every answer into NaN).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Check the path, or re-create it.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several exception types for corrupt files
        raise CheckpointError(
            f"Checkpoint {path} is not a readable safetensors file ({type(e).__name__}: {e}). "
            "It may be truncated or corrupt: re-create it."
        ) from None
    if raw_meta is None:
        raise CheckpointError(
            f"Checkpoint {path} has no surgery-edge metadata. Files from other tools must be "
            "converted first (see `surgery-edge import --help`)."
        )
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"Checkpoint {path} has corrupt metadata ({e}).") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"Checkpoint {path} has corrupt metadata (not a JSON object).")
    if finite:
        check_finite(path, tensors)
    return tensors, meta


def check_finite(where: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` naming the first tensor that holds NaN or infinity."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{where}: tensor {key!r} holds {bad} non-finite value(s) (NaN or infinity) of "
                f"{t.numel()}. The weights are broken (e.g. training diverged): re-create the "
                "file; it is not used."
            )


def file_kind(path: str | os.PathLike) -> str | None:
    """The ``kind`` a surgery-edge safetensors file records (None for any other file)."""
    meta = read_metadata(path)
    kind = meta.get("kind") if isinstance(meta, dict) else None
    return kind if isinstance(kind, str) else None


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The surgery-edge metadata of a safetensors file without reading its tensors (None when
    the file is missing, unreadable or not ours)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        return json.loads(raw) if raw else None
    except Exception:  # any unreadable file simply has no usable metadata
        return None


def _check_kind(path: Path, meta: dict, kind: str, what: str) -> None:
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, not {what}.")


def check_state_dict(
    where: str, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    """Raise :class:`CheckpointError` listing missing/unexpected keys and shape mismatches."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:5]})")
    if problems:
        raise CheckpointError(f"{where} does not match its architecture: " + "; ".join(problems))


@dataclass
class EncoderCheckpoint:
    arch: ArchSpec
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def build(self, device: str | torch.device = "cpu") -> ImageEncoder:
        encoder = build_encoder(self.arch)
        encoder.load_state_dict(self.state_dict)
        return encoder.to(device).eval()


def save_encoder(
    path: str | os.PathLike,
    arch: ArchSpec,
    state_dict: dict[str, torch.Tensor],
    task: str | None = None,
    **extra: Any,
) -> Path:
    """Save an image encoder's weights (pretrained, expert, or merged)."""
    meta = {"kind": "encoder", "arch": arch.to_dict(), "task": task, **extra}
    return save_tensors(path, state_dict, meta)


def load_encoder(path: str | os.PathLike, arch: ArchSpec | None = None) -> EncoderCheckpoint:
    """Load and validate an encoder checkpoint.

    Args:
        path: the ``.safetensors`` file.
        arch: if given, the checkpoint must have been saved for this architecture.
    """
    path = Path(path)
    tensors, meta = load_tensors(path)
    _check_kind(path, meta, "encoder", "an image encoder")
    found = ArchSpec.from_fields(parse_meta(EncoderMeta, meta, path).arch)
    if arch is not None and found != arch:
        diff = {
            k: (v, getattr(arch, k)) for k, v in found.to_dict().items() if v != arch.to_dict()[k]
        }
        raise CheckpointError(
            f"{path} was saved for architecture {found.name!r}, but {arch.name!r} was expected "
            f"(differences as (found, expected): {diff}). Use checkpoints of one architecture."
        )
    with torch.device("meta"):  # keys and shapes only: a lying header allocates nothing
        expected = build_encoder(found).state_dict()
    check_state_dict(f"Checkpoint {path}", tensors, expected)
    return EncoderCheckpoint(found, tensors, meta)


def save_head(
    path: str | os.PathLike,
    arch: ArchSpec,
    task: str,
    class_names: list[str],
    head: ClassificationHead,
    **extra: Any,
) -> Path:
    """Save a task's head; ``extra`` goes into the metadata (e.g. its provenance)."""
    meta = {
        **extra,
        "kind": "head",
        "arch": arch.to_dict(),
        "task": task,
        "class_names": list(class_names),
        "normalize": head.normalize,
    }
    return save_tensors(path, {"weight": head.weight, "bias": head.bias}, meta)


@dataclass
class HeadCheckpoint:
    task: str | None
    class_names: list[str]
    head: ClassificationHead
    arch: ArchSpec
    meta: dict[str, Any] = field(default_factory=dict)


def load_head(path: str | os.PathLike, arch: ArchSpec | None = None) -> HeadCheckpoint:
    path = Path(path)
    tensors, meta = load_tensors(path)
    _check_kind(path, meta, "head", "a head")
    fields = parse_meta(HeadMeta, meta, path)
    found = ArchSpec.from_fields(fields.arch)
    if arch is not None and found.embed_dim != arch.embed_dim:
        raise CheckpointError(
            f"Head {path} expects {found.embed_dim}-d features ({found.name}) but the encoder "
            f"{arch.name} produces {arch.embed_dim}-d features."
        )
    if set(tensors) != {"weight", "bias"}:
        raise CheckpointError(
            f"Head {path} must hold 'weight' and 'bias', found {sorted(tensors)}."
        )
    weight, bias = tensors["weight"], tensors["bias"]
    names = list(fields.class_names)
    if weight.ndim != 2 or weight.shape[1] != found.embed_dim or bias.shape != (weight.shape[0],):
        raise CheckpointError(
            f"Head {path} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}; "
            f"expected ({len(names)}, {found.embed_dim}) and ({len(names)},)."
        )
    if len(names) != weight.shape[0]:
        raise CheckpointError(
            f"Head {path} has {weight.shape[0]} classes but {len(names)} class names."
        )
    head = ClassificationHead(weight, bias, normalize=fields.normalize)
    return HeadCheckpoint(fields.task, names, head, found, meta)

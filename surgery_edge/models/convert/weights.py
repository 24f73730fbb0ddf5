"""Convert open_clip or Hugging Face image towers into checkpoints, with zero-shot heads.

:func:`import_weights` writes the same ``checkpoints/`` layout as
:func:`~surgery_edge.models.convert.task_vectors.import_task_vectors`; plain weights carry no
heads, so each task's head is built from its class names by a CLIP text tower
(:func:`zeroshot_heads`). :func:`checkpoint_arch` reads back the architecture a converted
checkpoint was written with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.io import safe_name, staged_dir
from surgery_edge.models.archs import ArchSpec
from surgery_edge.models.checkpoint import read_metadata, save_encoder, save_head
from surgery_edge.models.convert.hf import load_hf_clip_vision
from surgery_edge.models.convert.open_clip import load_open_clip_image_tower
from surgery_edge.models.convert.towers import check_tower, with_activation
from surgery_edge.progress import progress_bar


def checkpoint_arch(path: Path) -> ArchSpec:
    """The architecture recorded in an imported checkpoint (e.g. ``ViT-B-32-quickgelu``)."""
    meta = read_metadata(path)
    if not meta or "arch" not in meta:
        raise ConfigError(f"{path} has no surgery-edge metadata; re-import the checkpoints.")
    return ArchSpec.from_dict(meta["arch"])


def import_weights(
    fmt: str,
    arch: ArchSpec,
    pretrained: Path,
    experts: dict[str, Path],
    out: Path,
    *,
    trust_pickle: bool = False,
    clip_weights: Path | None = None,
    class_names: dict[str, list[str]] | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], Any] = print,
) -> ArchSpec:
    """Convert open_clip or Hugging Face image towers (and zero-shot heads) into ``out``.

    Writes ``pretrained.safetensors``, ``experts/<task>.safetensors`` and, with ``clip_weights``,
    ``heads/<task>.safetensors`` built from ``class_names`` by the text tower. Everything goes to
    a temporary folder first and replaces ``out`` only when every file converted.

    Args:
        fmt: ``open_clip`` (state dicts, ``.pt`` or ``.safetensors``) or ``hf`` (a
            ``CLIPVisionModel`` folder or weights file).
        arch: the architecture the weights must fit. Plain open_clip state dicts do not record the
            MLP activation (OpenAI weights need ``ViT-B-32-quickgelu``); HF configs do, and
            ``arch`` follows them.

    Returns:
        The architecture the checkpoints were written with.
    """
    if fmt not in ("open_clip", "hf"):
        raise ConfigError(f"Unknown checkpoint format {fmt!r}; use open_clip or hf.")
    for task in [*experts, *(class_names or {})]:  # names become file names: check them first
        safe_name(task, "Task name")
    if clip_weights is not None and set(class_names or {}) != set(experts):
        raise ConfigError(
            f"Zero-shot heads need class names for every task: got {sorted(class_names or {})}, "
            f"tasks {sorted(experts)}."
        )

    def read(path: Path) -> tuple[ArchSpec, dict]:
        if not path.exists():
            raise CheckpointError(f"Checkpoint {path} does not exist. Check the path.")
        if fmt == "open_clip":
            return arch, load_open_clip_image_tower(path, arch, trust_pickle=trust_pickle)
        # HF configs record the activation; the shapes must fit the config's arch exactly.
        found, state = load_hf_clip_vision(path, heads=arch.heads)
        fitted = with_activation(arch, found.quick_gelu)
        check_tower(f"Image tower of {path}", state, fitted)
        return fitted, state

    with staged_dir(out) as tmp:
        log(f"reading {pretrained}")
        arch, state = read(pretrained)
        source = {"format": fmt, "file": str(pretrained)}
        save_encoder(tmp / "pretrained.safetensors", arch, state, task=None, source=source)
        with progress_bar(len(experts), "import experts") as bar:
            for task, path in experts.items():
                log(f"reading {path}")
                found, state = read(path)
                if found != arch:
                    raise CheckpointError(
                        f"{path} uses {found.name!r} but the pretrained model {pretrained} uses "
                        f"{arch.name!r}: the experts must be fine-tuned from the pretrained model."
                    )
                source = {"format": fmt, "file": str(path)}
                save_encoder(
                    tmp / "experts" / f"{task}.safetensors", arch, state, task, source=source
                )
                bar.advance(expert=task)
        if clip_weights is not None:
            zeroshot_heads(arch, clip_weights, class_names, tmp, device, log)
    return arch


def zeroshot_heads(
    arch: ArchSpec,
    clip_weights: Path,
    class_names: dict[str, list[str]],
    out: Path,
    device: str | torch.device,
    log: Callable[[str], Any],
) -> None:
    """Build each task's zero-shot head with ``clip_weights``' text tower; save it under ``out``.

    Writes ``out/heads/<task>.safetensors`` (each file atomically) for every task of
    ``class_names``, checked to fit ``arch``'s image features.
    """
    # Imported here: zeroshot reads its weights with convert.open_clip, and importing that
    # module runs this package's __init__, which imports this module.
    from surgery_edge.models.zeroshot import build_zeroshot_heads

    for task in class_names:
        safe_name(task, "Task name")
    heads = build_zeroshot_heads(arch.name, clip_weights, class_names, device=device, log=log)
    for t, head in heads.items():
        if head.weight.shape[1] != arch.embed_dim:
            raise CheckpointError(
                f"The text tower of {clip_weights} gives {head.weight.shape[1]}-d class "
                f"embeddings, but {arch.name!r} produces {arch.embed_dim}-d image features."
            )
        save_head(out / "heads" / f"{t}.safetensors", arch, t, class_names[t], head)


__all__ = ["checkpoint_arch", "import_weights", "zeroshot_heads"]

"""open_clip weights on disk: CLIP state dicts, and the image tower taken from them.

A checkpoint is a CLIP state dict in ``.safetensors`` or ``.pt``/``.bin`` (read with
``torch.load(weights_only=True)``), optionally wrapped as ``{"state_dict": ...}`` (open_clip
training checkpoints) and/or prefixed with ``module.`` (DistributedDataParallel).
:func:`load_open_clip_image_tower` keeps only the image tower (``visual.*``); a pickled model
object is read only with ``trust_pickle``, through :mod:`~surgery_edge.models.convert.sandbox`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from surgery_edge.errors import CheckpointError
from surgery_edge.models.archs import ArchSpec
from surgery_edge.models.convert.archives import check_archive, import_budget, is_torchscript
from surgery_edge.models.convert.sandbox import (
    TRUST_PICKLE_HINT,
    StandInModule,
    check_tensor_storage,
    load_pickle_restricted,
    module_state,
)
from surgery_edge.models.convert.towers import (
    as_float32,
    check_facts,
    check_tower,
    tower_facts,
    tower_from_module,
)


def read_state_file(path: Path, trust_pickle: bool) -> Any:
    """What ``path`` holds: a safetensors file's tensors, or a ``.pt``/``.bin`` file's object.

    ``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``; pickled objects
    beyond tensors only with ``trust_pickle``, through the restricted unpickler.
    """
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several exception types for corrupt files
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: {e})."
            ) from None
    check_archive(path)
    if is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive (e.g. OpenAI's original CLIP release). Extract its "
            "weights with `torch.jit.load(path, map_location='cpu').state_dict()` (trusted files "
            "only), save them with safetensors, and import that file."
        )
    try:
        with import_budget(path):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        # weights_only refuses both pickled objects ("Unsupported global: GLOBAL a.B") and
        # garbage; only the first may be a real checkpoint.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found and not trust_pickle:
            raise CheckpointError(
                f"{path} holds pickled Python objects, not only tensors (it references "
                f"{found.group(1)}); loading such a pickle can run arbitrary code. "
                f"{TRUST_PICKLE_HINT}"
            ) from None
        if not found and not trust_pickle:
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint of tensors. It may be truncated or "
                "corrupt."
            ) from None
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}). It may be "
            "truncated or corrupt."
        ) from None
    return load_pickle_restricted(path)


def plain_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """``obj`` (read from ``path``) as a flat state dict: an open_clip training checkpoint's
    ``{"state_dict": ...}`` wrapper and a DistributedDataParallel ``module.`` prefix removed."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path} does not hold a state dict of tensors (found {type(obj).__name__})."
        )
    state = dict(obj)
    for key, tensor in state.items():  # before any copy: no stride-0 giants
        check_tensor_storage(f"{path}: {key}", tensor)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_open_clip_image_tower(
    path: str | os.PathLike, arch: ArchSpec, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read an open_clip CLIP checkpoint and return its validated image tower.

    Args:
        path: ``.safetensors``, or ``.pt``/``.bin`` read with ``torch.load(weights_only=True)``.
            A ``{"state_dict": ...}`` wrapper and a ``module.`` prefix are removed; text-tower
            keys are dropped. A pickled model object (open_clip ``CLIP`` or task_vectors
            ``ImageEncoder``) is read only with ``trust_pickle``, via the restricted unpickler.
        arch: the architecture the weights must fit. Plain state dicts do not record the MLP
            activation: OpenAI-pretrained weights need ``quick_gelu=True`` (``ViT-B-32-quickgelu``).
        trust_pickle: allow pickled objects beyond tensors (trusted files only).

    Returns:
        The image tower's fp32 state dict with this project's encoder keys (``visual.*``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Check the path.")
    obj = read_state_file(path, trust_pickle)
    facts: dict[str, Any] = {}
    if isinstance(obj, StandInModule):
        visual = tower_from_module(obj, path)
        facts = tower_facts(visual)
        state = {f"visual.{k}": v for k, v in module_state(visual, path).items()}
    else:
        state = plain_state_dict(obj, path)
        if not any(k.startswith("visual.") for k in state):
            hint = (
                " It looks like a Hugging Face CLIP checkpoint: use "
                "surgery_edge.models.convert.hf.load_hf_clip_vision."
                if any(k.startswith("vision_model.") for k in state)
                else ""
            )
            raise CheckpointError(
                f"{path} has no open_clip image-tower keys ('visual.*'); found e.g. "
                f"{sorted(state)[:5]}.{hint}"
            )
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    state = as_float32(state)
    check_tower(f"Image tower of {path}", state, arch)
    check_facts(path, facts, arch)
    return state


__all__ = ["load_open_clip_image_tower", "plain_state_dict", "read_state_file"]

"""Reading pickled checkpoints without running their code: the restricted unpickler.

task_vectors / AdaMerging checkpoints are whole pickled Python objects, and unpickling can run
arbitrary code. They are read only when the caller passes ``trust_pickle=True``, and then only
through :class:`RestrictedUnpickler`, which resolves a short allow-list of globals and refuses
everything else.

The restricted unpickler's allow-list (see :data:`ALLOWED_GLOBALS`):

- *Real objects*, all inert when called with arbitrary arguments: torch's tensor/parameter
  rebuild functions (``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``,
  ``_rebuild_parameter_with_state``), ``torch.<dtype>`` values,
  ``collections.OrderedDict`` and ``builtins.set`` (protocol-2 pickles spell it
  ``__builtin__.set``): a subset of what ``torch.load(weights_only=True)`` allows. Storage types
  are resolved by ``torch.load`` itself before the unpickler is asked.
- *Module classes* that a task_vectors checkpoint legitimately holds (``src.modeling``'s
  ``ImageEncoder`` / ``ClassificationHead``; open_clip's ``CLIP`` and transformer classes under
  both their current ``open_clip.transformer`` and their old ``open_clip.model`` names; the
  ``torch.nn`` layers those use). They map to inert :class:`nn.Module` stand-ins that only hold
  the pickled attributes (parameters, buffers, submodules), so no code of the original class runs
  and no particular open_clip version is needed to read old files.
- *Preprocessing objects* in ``ImageEncoder.train_preprocess`` / ``val_preprocess``
  (torchvision transforms, ``InterpolationMode``, open_clip's transform helpers). They map to
  inert placeholders: the weights are all this importer needs.

Anything else (``os.system``, ``builtins.eval``, an unknown class) raises :class:`CheckpointError`
naming the ``module.name`` found and the file, before anything is called.

The unpickled stand-ins are read with :func:`stand_in_child`, :func:`stand_in_tensor` and
:func:`module_state`, through their pickled ``__dict__`` only.
"""

from __future__ import annotations

import os
import pickle
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from surgery_edge.errors import CheckpointError

TRUST_PICKLE_HINT = (
    "Pass --trust-pickle (trust_pickle=True) only for files from a source you trust; they are "
    "then read through a restricted unpickler that accepts only the classes such checkpoints hold."
)


# The torch.nn layers open_clip's ViT CLIP is built from (MultiheadAttention's out_proj is a
# NonDynamicallyQuantizableLinear; Identity stands in for disabled patch dropout / LayerScale).
_TORCH_NN = {
    "torch.nn.modules.activation": ("MultiheadAttention", "GELU"),
    "torch.nn.modules.container": ("ModuleList", "Sequential"),
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.linear": ("Linear", "Identity", "NonDynamicallyQuantizableLinear"),
    "torch.nn.modules.normalization": ("LayerNorm",),
    "torch.nn.modules.sparse": ("Embedding",),
}
# open_clip's ViT CLIP classes; open_clip < 2.1 kept them (VisualTransformer) in open_clip.model.
_OPEN_CLIP_NN = (
    "CLIP",
    "VisionTransformer",
    "VisualTransformer",
    "Transformer",
    "ResidualAttentionBlock",
    "LayerNorm",
    "LayerNormFp32",
    "PatchDropout",
    "QuickGELU",
)
# What open_clip's image_transform (train and val) is made of, old and new versions.
_TORCHVISION_TRANSFORMS = (
    "Compose",
    "Resize",
    "CenterCrop",
    "RandomResizedCrop",
    "ToTensor",
    "Normalize",
)
_OPEN_CLIP_TRANSFORMS = (
    "_convert_to_rgb",
    "MaybeConvertMode",
    "MaybeToTensor",
    "ResizeMaxSize",
    "ResizeKeepRatio",
    "CenterCropOrPad",
)

#: ``module.name`` -> what the restricted unpickler resolves it to: ``"real"`` (the object
#: itself), ``"module"`` (an inert nn.Module stand-in) or ``"opaque"`` (an inert placeholder).
ALLOWED_GLOBALS: dict[str, str] = {
    "torch._utils._rebuild_tensor_v2": "real",
    "torch._utils._rebuild_parameter": "real",
    "torch._utils._rebuild_parameter_with_state": "real",
    "collections.OrderedDict": "real",
    "builtins.set": "real",
    "src.modeling.ImageEncoder": "module",
    "src.modeling.ClassificationHead": "module",
    **{f"{m}.{n}": "module" for m, names in _TORCH_NN.items() for n in names},
    **{f"open_clip.{m}.{n}": "module" for m in ("model", "transformer") for n in _OPEN_CLIP_NN},
    **{f"torchvision.transforms.transforms.{n}": "opaque" for n in _TORCHVISION_TRANSFORMS},
    "torchvision.transforms.functional.InterpolationMode": "opaque",
    **{f"open_clip.transform.{n}": "opaque" for n in _OPEN_CLIP_TRANSFORMS},
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_REAL_OBJECTS: dict[str, Any] = {"collections.OrderedDict": OrderedDict, "builtins.set": set}
# Values, not callables; looked up in a fixed table so a pickle cannot trigger torch's lazy
# attribute imports. (Storage types never reach find_class: torch.load resolves them itself.)
_TORCH_DTYPES = {k: v for k, v in vars(torch).items() if isinstance(v, torch.dtype)}


class StandInModule(nn.Module):
    """An unpickled module: holds the original's parameters, buffers and submodules, runs nothing.

    ``original`` is the pickled class (``open_clip.transformer.VisionTransformer``). The importer
    reads the tree from the pickled ``_parameters`` / ``_buffers`` / ``_modules`` dicts, so the
    keys are the original state-dict keys.
    """

    original: ClassVar[str] = "?"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"Stand-in for {self.original} holds weights only; it cannot run.")


class OpaqueStandIn:
    """An unpickled preprocessing object or function: keeps its arguments and state only."""

    original: ClassVar[str] = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.original}>"


_STAND_INS: dict[str, type] = {}


def _stand_in(qualified: str, base: type) -> type:
    if qualified not in _STAND_INS:
        name = qualified.rsplit(".", 1)[-1]
        _STAND_INS[qualified] = type(name, (base,), {"original": qualified, "__module__": __name__})
    return _STAND_INS[qualified]


def original_class(obj: Any) -> str:
    """The pickled ``module.Class`` an unpickled stand-in replaces (or the real type's name)."""
    cls = type(obj)
    return getattr(cls, "original", f"{cls.__module__}.{cls.__qualname__}")


def resolve_global(module: str, name: str, source: str | os.PathLike) -> Any:
    """What :class:`RestrictedUnpickler` gives for the global ``module.name`` read from ``source``.

    Raises:
        CheckpointError: the global is not on :data:`ALLOWED_GLOBALS` (nor a ``torch.<dtype>``).
    """
    module = _PY2_MODULES.get(module, module)
    qualified = f"{module}.{name}"
    kind = ALLOWED_GLOBALS.get(qualified)
    if kind == "module":
        return _stand_in(qualified, StandInModule)
    if kind == "opaque":
        return _stand_in(qualified, OpaqueStandIn)
    if kind == "real":
        if module == "torch._utils":
            return getattr(torch._utils, name)
        return _REAL_OBJECTS[qualified]
    if module == "torch" and name in _TORCH_DTYPES:
        return _TORCH_DTYPES[name]
    hint = ""
    if module.startswith("open_clip") and not module.startswith("open_clip.transform"):
        hint = (
            " surgery-edge imports open_clip ViT image towers only (no ResNet, timm or CoCa "
            "towers)."
        )
    raise CheckpointError(
        f"{source} contains a pickled reference to {qualified!r}, which is not on the allow-list "
        f"of classes a task_vectors / open_clip checkpoint may hold, so it was not loaded.{hint} "
        "The file comes from an unsupported tool or was tampered with; do not load it with plain "
        "torch.load."
    )


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves globals through :func:`resolve_global` only."""

    source: str = "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name, self.source)


def restricted_pickle_module(source: str | os.PathLike) -> types.ModuleType:
    """A module to pass as ``torch.load(..., pickle_module=...)``: restricted, names ``source``.

    torch.load uses both ``pickle_module.Unpickler`` and ``pickle_module.load`` (legacy files read
    their header with it), so both go through :class:`RestrictedUnpickler`.
    """
    unpickler = type("RestrictedUnpickler", (RestrictedUnpickler,), {"source": str(source)})

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    module = types.ModuleType("surgery_edge_restricted_pickle")
    module.Unpickler = unpickler
    module.load = load
    return module


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``), not a pickled checkpoint."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_pickle_restricted(path: str | os.PathLike) -> Any:
    """``torch.load`` a pickled checkpoint through the restricted unpickler (on CPU).

    Only call this for files the user has said they trust: the allow-list stops code execution
    through globals, but a hostile file can still exhaust memory.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Check the path.")
    if is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive, not a pickled checkpoint. Extract its weights "
            "with `torch.jit.load(path).state_dict()` (trusted files only) and save them with "
            "safetensors."
        )
    try:
        with warnings.catch_warnings():
            # Legacy (pre-1.6) files make torch compare each module class's source with the one
            # saved in the file; the stand-ins have none, and the check is moot for them.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            warnings.filterwarnings("ignore", category=torch.serialization.SourceChangeWarning)
            return torch.load(
                str(path),
                map_location="cpu",
                weights_only=False,
                pickle_module=restricted_pickle_module(path),
                mmap=zipfile.is_zipfile(path),
            )
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or truncated files raise many exception types
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}). It may be "
            "truncated or corrupt."
        ) from None


# Unpickled objects are read through their pickled ``__dict__`` only: a hostile file could shadow
# a method (``state_dict``) with an instance attribute, so no method of theirs is ever called.


def stand_in_child(module: Any, name: str) -> StandInModule | None:
    """A submodule of an unpickled stand-in, from its pickled ``_modules`` (None if absent)."""
    children = vars(module).get("_modules") if isinstance(module, StandInModule) else None
    child = children.get(name) if isinstance(children, Mapping) else None
    return child if isinstance(child, StandInModule) else None


def stand_in_tensor(module: StandInModule, name: str) -> torch.Tensor | None:
    """A parameter or buffer of an unpickled stand-in (None if absent)."""
    for kind in ("_parameters", "_buffers"):
        tensors = vars(module).get(kind)
        value = tensors.get(name) if isinstance(tensors, Mapping) else None
        if isinstance(value, torch.Tensor):
            return value
    return None


def module_state(module: StandInModule, where: Path) -> dict[str, torch.Tensor]:
    """What ``module.state_dict()`` would return, read from the pickled dicts of the tree."""
    state: dict[str, torch.Tensor] = {}
    stack, seen = [("", module)], set()
    while stack:
        prefix, m = stack.pop()
        if id(m) in seen:
            raise CheckpointError(f"{where} has a module tree with a cycle; it is malformed.")
        seen.add(id(m))
        d = vars(m)
        skip = d.get("_non_persistent_buffers_set", ())
        skip = skip if isinstance(skip, (set, frozenset, list, tuple)) else ()
        for kind in ("_parameters", "_buffers", "_modules"):
            items = d.get(kind, {})
            if not isinstance(items, Mapping):
                raise CheckpointError(f"{where}: {original_class(m)}.{kind} is malformed.")
            for name, value in items.items():
                if value is None or (kind == "_buffers" and name in skip):
                    continue
                expected = StandInModule if kind == "_modules" else torch.Tensor
                if not isinstance(name, str) or not isinstance(value, expected):
                    raise CheckpointError(
                        f"{where}: {original_class(m)}.{kind}[{name!r}] holds a "
                        f"{original_class(value)}; the file is malformed."
                    )
                if kind == "_modules":
                    stack.append((f"{prefix}{name}.", value))
                else:
                    state[f"{prefix}{name}"] = value.detach()
    return state


__all__ = [
    "ALLOWED_GLOBALS",
    "TRUST_PICKLE_HINT",
    "OpaqueStandIn",
    "RestrictedUnpickler",
    "StandInModule",
    "is_torchscript",
    "load_pickle_restricted",
    "module_state",
    "original_class",
    "resolve_global",
    "restricted_pickle_module",
    "stand_in_child",
    "stand_in_tensor",
]

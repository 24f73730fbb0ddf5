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

The allow-list keeps classes out; the state a pickle gives the objects it builds is constrained
too, so pickled data can never replace a method the importer calls:

- a stand-in module accepts only what a module's ``__dict__`` holds: its parameter, buffer and
  submodule tables (of tensors and stand-ins), empty hook tables, and plain-data attributes that
  name no method or property (``forward = builtins.set`` is refused);
- a tensor is rebuilt only when its storage really holds ``numel x element size`` bytes for the
  given size, stride and offset (no stride-0 or overlapping giants that allocate gigabytes when
  they are made contiguous), without hooks; a parameter carries no pickled attributes;
- the storages a file declares may not add up to more bytes than the file holds; archive members
  must be regular files (a FIFO in a tar would block forever); and every load runs under a time
  budget (:mod:`~surgery_edge.models.convert.archives`).

The unpickled stand-ins are read with :func:`stand_in_child`, :func:`stand_in_tensor` and
:func:`module_state`, through their pickled ``__dict__`` only.
"""

from __future__ import annotations

import math
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
from surgery_edge.models.convert.archives import check_archive, import_budget, is_torchscript

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
    keys are the original state-dict keys. The pickled state is checked attribute by attribute
    (:func:`check_module_state`) before it is set.
    """

    original: ClassVar[str] = "?"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"Stand-in for {self.original} holds weights only; it cannot run.")

    def __setstate__(self, state: Any) -> None:
        check_module_state(self.original, state)
        nn.Module.__setstate__(self, state)


# What a module's pickled ``__dict__`` holds besides plain attributes: its tables, each of the one
# type it may hold, and the hook tables, which an importer has no use for and must be empty.
_TABLES = {"_parameters": torch.Tensor, "_buffers": torch.Tensor, "_modules": StandInModule}
_HOOK_TABLES = {
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
}
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype)


def _exact_mapping(value: Any) -> bool:
    """A dict or OrderedDict with no instance attributes (none can shadow ``items``)."""
    return type(value) in (dict, OrderedDict) and not getattr(value, "__dict__", None)


def check_module_state(original: str, state: Any) -> None:
    """Refuse a stand-in module's pickled state that is not what such a module holds.

    Raises:
        CheckpointError: the state is not a dict; an attribute is not a plain name, names a
            method or property of a module (pickled data must never replace one), or holds
            something other than its expected type.
    """

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(
            f"A pickled {original} {why}; a checkpoint's modules hold only weights and plain "
            "settings, so the file was refused (it is malformed or was tampered with)."
        )

    if not _exact_mapping(state):
        raise refuse(f"has state of type {type(state).__name__}, not an attribute dict")
    for key, value in dict.items(state):
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("__"):
            raise refuse(f"sets an attribute named {key!r}")
        if key in _TABLES:
            _check_table(refuse, key, value, _TABLES[key])
        elif key in _HOOK_TABLES:
            if not _exact_mapping(value) or value:
                raise refuse(f"carries hooks in {key}")
        elif key == "_non_persistent_buffers_set":
            if type(value) is not set or not all(isinstance(v, str) for v in value):
                raise refuse(f"has a malformed {key}")
        elif key == "training":
            if type(value) is not bool:
                raise refuse(f"has training={value!r}")
        elif _shadows_module_attribute(key):
            raise refuse(f"sets {key!r}, which would replace a method or property of a module")
        else:
            _check_plain(refuse, key, value)


def _check_table(refuse, key: str, table: Any, kind: type) -> None:
    if not _exact_mapping(table):
        raise refuse(f"has {key} of type {type(table).__name__}")
    for name, value in dict.items(table):
        if not isinstance(name, str) or not (value is None or isinstance(value, kind)):
            raise refuse(f"has {key}[{name!r}] of type {type(value).__name__}")


def _shadows_module_attribute(key: str) -> bool:
    """Whether ``key`` names a method, property or other class attribute of a module."""
    return any(key in vars(cls) for cls in StandInModule.__mro__)


def _check_plain(refuse, key: str, value: Any) -> None:
    """Plain data only: numbers, strings, dtypes, tensors, stand-ins, and containers of them;
    every object visited once (shared references cannot blow the check up)."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, _PLAIN) or type(v) in (torch.Tensor, nn.Parameter):
            continue
        if isinstance(v, (StandInModule, OpaqueStandIn)):
            continue  # built, and checked, by the unpickler on their own
        if type(v) in (list, tuple, set, frozenset):
            stack.extend(v)
        elif _exact_mapping(v):
            stack.extend(dict.keys(v))
            stack.extend(dict.values(v))
        else:
            raise refuse(f"sets {key!r} to a {type(v).__name__}, which is not plain data")


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


# --- tensors: rebuilt only over storage that holds them ---------------------------------------


def check_tensor_storage(where: str, t: torch.Tensor) -> None:
    """Refuse a tensor whose storage does not hold its elements.

    The storage must hold ``numel x element size`` bytes, and every element the size, stride and
    offset address must lie inside it. A stride-0 or overlapping tensor of a huge shape over a
    few bytes (gigabytes once made contiguous) is refused before anything is allocated.
    """
    size, stride, offset = tuple(t.shape), tuple(t.stride()), t.storage_offset()
    _check_extent(where, size, stride, offset, t.element_size(), t.untyped_storage().nbytes())


def _check_extent(
    where: str, size: tuple, stride: tuple, offset: int, element: int, nbytes: int
) -> None:
    ints = all(type(x) is int and x >= 0 for x in (*size, *stride, offset))
    if not ints or len(size) != len(stride) or len(size) > 32:
        raise CheckpointError(f"{where}: a tensor has a malformed size {size} or stride {stride}.")
    numel = math.prod(size)
    if numel == 0:
        return
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if numel * element > nbytes or extent * element > nbytes:
        raise CheckpointError(
            f"{where}: a tensor of shape {size} (stride {stride}) needs "
            f"{numel * element:,} bytes but its storage holds {nbytes:,}; such a tensor (stride "
            "0 or overlapping) is not a saved weight and would exhaust memory. The file is "
            "malformed or was tampered with."
        )


def _checked_rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise CheckpointError(f"A pickled tensor is built over a {type(storage).__name__}.")
    if backward_hooks or metadata:
        raise CheckpointError("A pickled tensor carries hooks or metadata; the file was refused.")
    if isinstance(storage, torch.storage.TypedStorage):  # private fields: no deprecation warning
        element, nbytes = (
            torch._utils._element_size(storage._dtype),
            storage._untyped_storage.nbytes(),
        )
    else:
        element, nbytes = 1, storage.nbytes()
    _check_extent("A pickled tensor", tuple(size), tuple(stride), storage_offset, element, nbytes)
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, bool(requires_grad), OrderedDict()
    )


def _checked_rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if type(data) is not torch.Tensor or backward_hooks:
        raise CheckpointError("A pickled parameter is malformed (not a tensor, or with hooks).")
    return torch._utils._rebuild_parameter(data, bool(requires_grad), OrderedDict())


def _checked_rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    if state:  # a saved weight has no attributes; any could shadow a tensor method (detach)
        names = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"A pickled parameter sets attributes {names}; a checkpoint's weights carry none, "
            "and they could replace tensor methods. The file was refused."
        )
    return _checked_rebuild_parameter(data, requires_grad, backward_hooks)


_CHECKED_REBUILDS = {
    "_rebuild_tensor_v2": _checked_rebuild_tensor_v2,
    "_rebuild_parameter": _checked_rebuild_parameter,
    "_rebuild_parameter_with_state": _checked_rebuild_parameter_with_state,
}


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
            return _CHECKED_REBUILDS[name]
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
    """A ``pickle.Unpickler`` that resolves globals through :func:`resolve_global` only.

    torch.load sets its own ``persistent_load`` (which allocates each storage the file
    declares); it is wrapped so that the storages may not add up to more than ``budget`` bytes,
    the size of the file they are read from.
    """

    source: str = "<pickle>"
    budget: int | None = None

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name, self.source)

    @property
    def persistent_load(self) -> Any:
        return self._budgeted_persistent_load

    @persistent_load.setter
    def persistent_load(self, fn: Any) -> None:
        self._torch_persistent_load = fn

    def _budgeted_persistent_load(self, saved_id: Any) -> Any:
        fn = getattr(self, "_torch_persistent_load", None)
        if fn is None:
            raise pickle.UnpicklingError("persistent ids are not allowed in this pickle")
        if (
            isinstance(saved_id, tuple)
            and len(saved_id) >= 5
            and saved_id[0] in ("storage", b"storage")
        ):
            storage_type, key, numel = saved_id[1], saved_id[2], saved_id[4]
            if type(numel) is not int or numel < 0:
                raise CheckpointError(f"{self.source} declares a storage of {numel!r} elements.")
            dtype = (
                torch.uint8
                if storage_type is torch.UntypedStorage
                else getattr(storage_type, "dtype", None)
            )
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"{self.source} declares a storage of a non-dtype.")
            seen = self.__dict__.setdefault("_storages", {})
            seen[key] = numel * torch._utils._element_size(dtype)
            total = sum(seen.values())
            if self.budget is not None and total > self.budget:
                raise CheckpointError(
                    f"{self.source} declares {total:,} bytes of tensor storage but holds only "
                    f"{self.budget:,} bytes; loading it would allocate memory it does not have "
                    "data for. The file is malformed or was tampered with."
                )
        return fn(saved_id)


def restricted_pickle_module(
    source: str | os.PathLike, budget: int | None = None
) -> types.ModuleType:
    """A module to pass as ``torch.load(..., pickle_module=...)``: restricted, names ``source``.

    torch.load uses both ``pickle_module.Unpickler`` and ``pickle_module.load`` (legacy files read
    their header with it), so both go through :class:`RestrictedUnpickler`.

    Args:
        budget: the most bytes of tensor storage the file may declare (its size).
    """
    unpickler = type(
        "RestrictedUnpickler", (RestrictedUnpickler,), {"source": str(source), "budget": budget}
    )

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    module = types.ModuleType("surgery_edge_restricted_pickle")
    module.Unpickler = unpickler
    module.load = load
    return module


def load_pickle_restricted(path: str | os.PathLike) -> Any:
    """``torch.load`` a pickled checkpoint through the restricted unpickler (on CPU).

    Only call this for files the user has said they trust: the allow-list stops code execution
    through globals, but a hostile file can still exhaust memory.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Check the path.")
    check_archive(path)
    if is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive, not a pickled checkpoint. Extract its weights "
            "with `torch.jit.load(path).state_dict()` (trusted files only) and save them with "
            "safetensors."
        )
    try:
        with warnings.catch_warnings(), import_budget(path):
            # Legacy (pre-1.6) files make torch compare each module class's source with the one
            # saved in the file; the stand-ins have none, and the check is moot for them.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            warnings.filterwarnings("ignore", category=torch.serialization.SourceChangeWarning)
            return torch.load(
                str(path),
                map_location="cpu",
                weights_only=False,
                pickle_module=restricted_pickle_module(path, budget=path.stat().st_size),
                mmap=zipfile.is_zipfile(path),
            )
    except CheckpointError as e:
        if str(path) in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from None
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
                    check_tensor_storage(f"{where}: {prefix}{name}", value)
                    state[f"{prefix}{name}"] = torch.Tensor.detach(value)
    return state


__all__ = [
    "ALLOWED_GLOBALS",
    "check_module_state",
    "check_tensor_storage",
    "TRUST_PICKLE_HINT",
    "OpaqueStandIn",
    "RestrictedUnpickler",
    "StandInModule",
    "load_pickle_restricted",
    "module_state",
    "original_class",
    "resolve_global",
    "restricted_pickle_module",
    "stand_in_child",
    "stand_in_tensor",
]

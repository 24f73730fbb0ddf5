"""Import checkpoints made by other tools into this project's safetensors checkpoints.

Two sources:

- **open_clip weights on disk** (:func:`load_open_clip_image_tower`): a CLIP state dict in
  ``.safetensors`` or ``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``), optionally
  wrapped as ``{"state_dict": ...}`` (open_clip training checkpoints) and/or prefixed with
  ``module.`` (DistributedDataParallel). Only the image tower (``visual.*``) is kept.
- **the task_vectors / AdaMerging / Surgery layout** (:func:`import_task_vectors`)::

      <root>/<model>/zeroshot.pt            pickled src.modeling.ImageEncoder (pretrained)
      <root>/<model>/<Task>/finetuned.pt    pickled src.modeling.ImageEncoder (expert)
      <root>/<model>/head_<Task>.pt         pickled src.modeling.ClassificationHead

  These files are whole pickled Python objects, and unpickling can run arbitrary code. They are
  read only when the caller passes ``trust_pickle=True``, and then only through
  :class:`RestrictedUnpickler`, which resolves a short allow-list of globals and refuses
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
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.io import staged_dir
from surgery_edge.models.archs import ArchSpec, get_arch
from surgery_edge.models.checkpoint import check_state_dict, save_encoder, save_head
from surgery_edge.models.encoder import build_encoder
from surgery_edge.models.heads import ClassificationHead

TRUST_PICKLE_HINT = (
    "Pass --trust-pickle (trust_pickle=True) only for files from a source you trust; they are "
    "then read through a restricted unpickler that accepts only the classes such checkpoints hold."
)

# --------------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------------

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


def _is_torchscript(path: Path) -> bool:
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
    if _is_torchscript(path):
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


# --------------------------------------------------------------------------------------------
# Image towers: validation shared by every source
# --------------------------------------------------------------------------------------------


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


def _as_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Our encoders are fp32; half-precision checkpoints are upcast exactly.
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# Unpickled objects are read through their pickled ``__dict__`` only: a hostile file could shadow
# a method (``state_dict``) with an instance attribute, so no method of theirs is ever called.


def _child(module: Any, name: str) -> StandInModule | None:
    """A submodule of an unpickled stand-in, from its pickled ``_modules`` (None if absent)."""
    children = vars(module).get("_modules") if isinstance(module, StandInModule) else None
    child = children.get(name) if isinstance(children, Mapping) else None
    return child if isinstance(child, StandInModule) else None


def _tensor(module: StandInModule, name: str) -> torch.Tensor | None:
    """A parameter or buffer of an unpickled stand-in (None if absent)."""
    for kind in ("_parameters", "_buffers"):
        tensors = vars(module).get(kind)
        value = tensors.get(name) if isinstance(tensors, Mapping) else None
        if isinstance(value, torch.Tensor):
            return value
    return None


def _module_state(module: StandInModule, where: Path) -> dict[str, torch.Tensor]:
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


def _tower_from_module(obj: Any, path: Path) -> StandInModule:
    """The ``visual`` stand-in of an unpickled task_vectors ImageEncoder or open_clip CLIP."""
    kind = original_class(obj)
    model = _child(obj, "model") if kind == "src.modeling.ImageEncoder" else obj
    visual = _child(model, "visual")
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


def _tower_facts(visual: StandInModule) -> dict[str, Any]:
    """What the module tree says beyond shapes: attention heads and the MLP activation."""
    facts: dict[str, Any] = {}
    block = _child(_child(_child(visual, "transformer"), "resblocks"), "0")
    if block is None:
        return facts
    attn = _child(block, "attn")
    heads = vars(attn).get("num_heads") if attn is not None else None
    if isinstance(heads, int):
        facts["heads"] = heads
    mlp = _child(block, "mlp")
    children = vars(mlp).get("_modules") if mlp is not None else None
    acts = [original_class(m) for m in children.values()] if isinstance(children, Mapping) else []
    if any(a.endswith(".QuickGELU") for a in acts):
        facts["quick_gelu"] = True
    elif any(a.endswith(".GELU") for a in acts):
        facts["quick_gelu"] = False
    return facts


def _check_facts(path: Path, facts: Mapping[str, Any], arch: ArchSpec) -> None:
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


# --------------------------------------------------------------------------------------------
# open_clip weights from disk
# --------------------------------------------------------------------------------------------


def read_state_file(path: Path, trust_pickle: bool) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several exception types for corrupt files
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: {e})."
            ) from None
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive (e.g. OpenAI's original CLIP release). Extract its "
            "weights with `torch.jit.load(path, map_location='cpu').state_dict()` (trusted files "
            "only), save them with safetensors, and import that file."
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
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
        visual = _tower_from_module(obj, path)
        facts = _tower_facts(visual)
        state = {f"visual.{k}": v for k, v in _module_state(visual, path).items()}
    else:
        state = plain_state_dict(obj, path)
        if not any(k.startswith("visual.") for k in state):
            hint = (
                " It looks like a Hugging Face CLIP checkpoint: use "
                "surgery_edge.models.hf_clip.load_hf_clip_vision."
                if any(k.startswith("vision_model.") for k in state)
                else ""
            )
            raise CheckpointError(
                f"{path} has no open_clip image-tower keys ('visual.*'); found e.g. "
                f"{sorted(state)[:5]}.{hint}"
            )
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    state = _as_float32(state)
    check_tower(f"Image tower of {path}", state, arch)
    _check_facts(path, facts, arch)
    return state


# --------------------------------------------------------------------------------------------
# The task_vectors / AdaMerging / Surgery layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_task_vectors` wrote (paths are inside ``out_dir``)."""

    out_dir: Path
    arch: ArchSpec
    pretrained: Path
    experts: dict[str, Path]
    heads: dict[str, Path]
    source: Path
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "format": "task_vectors",
            "out_dir": str(self.out_dir),
            "arch": self.arch.to_dict(),
            "pretrained": str(self.pretrained),
            "experts": {t: str(p) for t, p in self.experts.items()},
            "heads": {t: str(p) for t, p in self.heads.items()},
            "notes": list(self.notes),
        }


@dataclass
class TaskVectorsLayout:
    """The files of one model in a task_vectors checkpoint tree."""

    model_dir: Path
    zeroshot: Path
    experts: dict[str, Path]
    heads: dict[str, Path]

    @property
    def files(self) -> list[Path]:
        return [self.zeroshot, *self.experts.values(), *self.heads.values()]


def _head_file(model_dir: Path, task: str) -> Path | None:
    # task_vectors fine-tunes into "<Task>Val/" while heads may be named for "<Task>".
    names = [task, f"{task}Val", task.removesuffix("Val")]
    for name in dict.fromkeys(names):
        if (model_dir / f"head_{name}.pt").is_file():
            return model_dir / f"head_{name}.pt"
    return None


def find_task_vectors_layout(
    root: str | os.PathLike, model_name: str, tasks: Sequence[str] | None = None
) -> TaskVectorsLayout:
    """Locate ``zeroshot.pt``, every ``<Task>/finetuned.pt`` and its ``head_<Task>.pt``."""
    model_dir = Path(root) / model_name
    expected = (
        f"expected {model_dir}/zeroshot.pt, {model_dir}/<Task>/finetuned.pt and "
        f"{model_dir}/head_<Task>.pt"
    )
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory ({expected}).")
    zeroshot = model_dir / "zeroshot.pt"
    if not zeroshot.is_file():
        raise CheckpointError(f"{zeroshot} does not exist ({expected}).")
    found = sorted(p.parent.name for p in model_dir.glob("*/finetuned.pt"))
    if tasks is not None:
        missing = [t for t in tasks if t not in found]
        if missing:
            raise CheckpointError(
                f"No fine-tuned checkpoint for tasks {missing} in {model_dir} (found {found})."
            )
        found = list(tasks)
    if not found:
        raise CheckpointError(f"{model_dir} has no <Task>/finetuned.pt ({expected}).")
    heads, no_head = {}, []
    for task in found:
        head = _head_file(model_dir, task)
        if head is None:
            no_head.append(task)
        heads[task] = head
    if no_head:
        raise CheckpointError(
            f"No classification head for tasks {no_head}: expected "
            + ", ".join(str(model_dir / f"head_{t}.pt") for t in no_head)
            + "."
        )
    experts = {t: model_dir / t / "finetuned.pt" for t in found}
    return TaskVectorsLayout(model_dir, zeroshot, experts, heads)


def _read_pickled_tower(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    visual = _tower_from_module(load_pickle_restricted(path), path)
    state = _as_float32({f"visual.{k}": v for k, v in _module_state(visual, path).items()})
    return state, _tower_facts(visual)


def _read_pickled_head(path: Path, arch: ArchSpec) -> ClassificationHead:
    obj = load_pickle_restricted(path)
    if original_class(obj) != "src.modeling.ClassificationHead":
        raise CheckpointError(
            f"{path} holds a {original_class(obj)}, not a src.modeling.ClassificationHead."
        )
    weight, bias = _tensor(obj, "weight"), _tensor(obj, "bias")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise CheckpointError(f"Head {path} has no 2-d `weight`.")
    if weight.shape[1] != arch.embed_dim:
        raise CheckpointError(
            f"Head {path} expects {weight.shape[1]}-d features, but architecture {arch.name!r} "
            f"produces {arch.embed_dim}-d features. Heads and encoders must come from one model."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointError(
            f"Head {path} has bias {tuple(bias.shape)}; expected ({weight.shape[0]},)."
        )
    normalize = vars(obj).get("normalize", True)
    if not isinstance(normalize, bool):
        raise CheckpointError(f"Head {path} has normalize={normalize!r}; expected True or False.")
    return ClassificationHead(
        weight.detach().float(),
        None if bias is None else bias.detach().float(),
        normalize=normalize,
    )


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"Output {out} exists and is not a directory. Choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"Output directory {out} already exists and is not empty. Choose another --out, or "
            "pass overwrite=True (--overwrite) to replace it."
        )


def import_task_vectors(
    root: str | os.PathLike,
    model_name: str,
    out_dir: str | os.PathLike,
    trust_pickle: bool,
    *,
    tasks: Sequence[str] | None = None,
    class_names: Mapping[str, Sequence[str]] | None = None,
    class_names_source: Mapping[str, str] | None = None,
    overwrite: bool = False,
    arch: ArchSpec | None = None,
    log: Callable[[str], Any] = print,
) -> ImportSummary:
    """Convert task_vectors-layout checkpoints into this project's safetensors checkpoints.

    Writes ``out_dir/pretrained.safetensors``, ``out_dir/experts/<Task>.safetensors``,
    ``out_dir/heads/<Task>.safetensors`` and ``out_dir/import.json`` (the summary). Everything is
    written into a temporary directory beside ``out_dir`` and moved into place at the end, so an
    error leaves nothing half-written.

    Args:
        root: the folder holding ``<model_name>/``.
        model_name: an open_clip ViT config name (``ViT-B-32``) or a tiny config; also the
            sub-folder's name. The MLP activation is read from the checkpoints: OpenAI-based ones
            use QuickGELU, so ``ViT-B-32`` becomes ``ViT-B-32-quickgelu``.
        out_dir: where the checkpoints go (e.g. a run's ``checkpoints/`` folder).
        trust_pickle: the files are pickles that can run code; without this they are refused.
        tasks: import only these task folders (default: every ``<Task>/finetuned.pt``).
        class_names: class names per task; the pickled heads carry none, so by default they are
            ``class_0 … class_{C-1}``.
        class_names_source: where each task's class names came from (a file, a dataset), named
            in the error when their count does not match the head.
        overwrite: replace a non-empty ``out_dir``.
        arch: the architecture, when the folder's name is not one (default:
            ``get_arch(model_name)``).
        log: progress messages.

    Returns:
        An :class:`ImportSummary` of what was written.
    """
    arch = arch or get_arch(model_name)
    layout = find_task_vectors_layout(root, model_name, tasks)
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    if not trust_pickle:
        raise CheckpointError(
            f"{layout.zeroshot} and the {len(layout.files) - 1} other checkpoints in "
            f"{layout.model_dir} are whole pickled Python objects (task_vectors layout); loading "
            f"a pickle can run arbitrary code. {TRUST_PICKLE_HINT}"
        )
    class_names = dict(class_names or {})
    unknown = sorted(set(class_names) - set(layout.experts))
    if unknown:
        raise ConfigError(
            f"class_names given for unknown tasks {unknown}; tasks: {list(layout.experts)}."
        )

    notes: list[str] = []
    with staged_dir(out) as tmp:
        log(f"reading {layout.zeroshot}")
        state, facts = _read_pickled_tower(layout.zeroshot)
        check_tower(f"Image tower of {layout.zeroshot}", state, arch)  # shapes: any activation
        if "quick_gelu" in facts and facts["quick_gelu"] != arch.quick_gelu:
            adapted = with_activation(arch, facts["quick_gelu"])
            notes.append(
                f"The checkpoints use {'QuickGELU' if facts['quick_gelu'] else 'GELU'}: "
                f"architecture {arch.name!r} was imported as {adapted.name!r}."
            )
            arch = adapted
        _check_facts(layout.zeroshot, facts, arch)
        source = {"format": "task_vectors", "file": str(layout.zeroshot)}
        save_encoder(tmp / "pretrained.safetensors", arch, state, task=None, source=source)
        del state
        for task, path in layout.experts.items():
            log(f"reading {path}")
            state, facts = _read_pickled_tower(path)
            check_tower(f"Image tower of {path}", state, arch)
            _check_facts(path, facts, arch)
            source = {"format": "task_vectors", "file": str(path)}
            save_encoder(tmp / "experts" / f"{task}.safetensors", arch, state, task, source=source)
            del state
            head_path = layout.heads[task]
            head = _read_pickled_head(head_path, arch)
            names = list(class_names.get(task) or [f"class_{i}" for i in range(head.num_classes)])
            if len(names) != head.num_classes:
                origin = (class_names_source or {}).get(task)
                raise ConfigError(
                    f"{len(names)} class names given for task {task!r}"
                    + (f" (from {origin})" if origin else "")
                    + f", but {head_path} has {head.num_classes} classes. The data and the "
                    "checkpoints must describe the same classes: check the task's class-name "
                    "file or folders."
                )
            if task not in class_names:
                notes.append(f"Task {task!r}: no class names given; using class_0..class_N.")
            save_head(tmp / "heads" / f"{task}.safetensors", arch, task, names, head)
        summary = ImportSummary(
            out_dir=out,
            arch=arch,
            pretrained=out / "pretrained.safetensors",
            experts={t: out / "experts" / f"{t}.safetensors" for t in layout.experts},
            heads={t: out / "heads" / f"{t}.safetensors" for t in layout.experts},
            source=layout.model_dir,
            notes=notes,
        )
        (tmp / "import.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


__all__ = [
    "ALLOWED_GLOBALS",
    "ImportSummary",
    "OpaqueStandIn",
    "RestrictedUnpickler",
    "StandInModule",
    "TaskVectorsLayout",
    "check_out_dir",
    "check_tower",
    "expected_tower_state",
    "find_task_vectors_layout",
    "import_task_vectors",
    "load_open_clip_image_tower",
    "load_pickle_restricted",
    "original_class",
    "read_state_file",
    "plain_state_dict",
    "restricted_pickle_module",
    "with_activation",
]

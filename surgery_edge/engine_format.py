"""The engine format: what an exported artefact carries so that it can be served on its own.

This module is the contract between the exporters (which write it) and the runtime (which reads
it), so it depends on nothing but the standard library: no torch, no numpy, no onnx at import.

Every exported artefact (ONNX, TensorRT, AOTInductor ``.pt2``) carries one JSON object under the
key ``surgery_edge``: the task names and class names per task, the preprocessing, the method
(none | surgery | surgeryv2), the adapter rank, the architecture, the merge recipe, the package
version, the mode (routed | all-tasks), the precision (fp32 | fp16 | int8 | fp8; a quantised
engine adds a ``quantization`` record) and the engine's input and output names.
Where it lives:

- ONNX: ``ModelProto.metadata_props["surgery_edge"]`` (ONNX Runtime exposes it as the session's
  ``custom_metadata_map``);
- ``.pt2``: the AOTInductor package metadata (``aot_inductor.metadata``);
- TensorRT: a sidecar ``<engine>.json`` (a serialized engine has no place for user data).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery_edge.errors import ExportError
from surgery_edge.io import write_json_atomic

META_KEY = "surgery_edge"
# 2: preprocessing is open_clip's eval transform (resize the shorter side, centre crop), named by
# ``resize`` / ``interpolation`` / ``crop``. Version 1 stretched images with a bilinear resize.
FORMAT_VERSION = 2
LEGACY_RESIZE = "bilinear-antialias"  # what format version 1 recorded

REQUIRED_KEYS = (
    "tasks",
    "class_names",
    "preprocessing",
    "method",
    "mode",
    "precision",
    "inputs",
    "outputs",
)


class Choice(str, enum.Enum):
    """A string enum parsed once, with an error that lists the choices (modes, precisions, and
    the exporters' own choices such as the quantiser)."""

    @classmethod
    def parse(cls, value: Any, what: str | None = None):
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            what = what or re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()
            choices = ", ".join(m.value for m in cls)
            raise ExportError(f"Unknown {what} {value!r}; use one of: {choices}.") from None

    def __str__(self) -> str:
        return self.value


class EngineMode(Choice):
    """How an engine is asked."""

    ROUTED = "routed"  # images + one task id per image -> that task's logits
    ALL_TASKS = "all-tasks"  # images -> every task's logits


class Precision(Choice):
    """An engine's weights and compute; its inputs and outputs stay float32.

    ``int8`` and ``fp8`` engines are post-training quantised from the fp32 engine; their metadata
    carries a ``quantization`` record (the quantiser, the recipe, which node groups stay in
    higher precision, the calibration data and the check against the fp32 engine).
    """

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    FP8 = "fp8"

    @property
    def quantized(self) -> bool:
        """Whether this precision is reached by quantising an fp32 engine (int8, fp8)."""
        return self in (Precision.INT8, Precision.FP8)


def io_names(mode: EngineMode | str, tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """The engine's input and output names for ``mode``."""
    if EngineMode.parse(mode) is EngineMode.ROUTED:
        return ["images", "task_ids"], ["logits", "probs"]
    return ["images"], [f"logits_{t}" for t in tasks]


# --- preprocessing ---------------------------------------------------------------------------

RESIZE_MODES = ("shortest", "squash")  # open_clip's resize_mode values the runtime reproduces
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """open_clip's eval transform, as the metadata records it.

    ``shortest``: resize the shorter side to ``image_size`` (the longer one keeps the aspect
    ratio), then centre-crop ``image_size`` square; ``squash``: resize to the square directly.
    Then RGB, scale to [0, 1], normalise with ``mean`` / ``std``, channels first.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest"
    interpolation: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "crop": "center" if self.resize == "shortest" else "none",
            "channels": "RGB",
            "scale": "1/255",
            "layout": "NCHW",
        }

    @classmethod
    def from_dict(cls, d: Any, source: str | os.PathLike) -> Preprocessing:
        where = f"Engine metadata of {source}: preprocessing"
        if not isinstance(d, dict):
            raise ExportError(f"{where} is a {type(d).__name__}, not an object; re-export it.")
        if d.get("resize") == LEGACY_RESIZE:
            raise ExportError(
                f"Engine {source} was exported by surgery-edge 0.1 with a stretching bilinear "
                "resize, which is not the preprocessing its accuracy was measured with. Re-export "
                "it with `surgery-edge export` (the new engine resizes exactly as open_clip's "
                "eval transform, like the evaluation does)."
            )
        size = d.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ExportError(f"{where}.image_size must be a positive integer, got {size!r}.")
        stats = {}
        for key in ("mean", "std"):
            v = d.get(key)
            ok = isinstance(v, list) and len(v) == 3
            ok = ok and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in v
            )
            if not ok or (key == "std" and min(v) <= 0):
                raise ExportError(
                    f"{where}.{key} must be three finite numbers{' > 0' if key == 'std' else ''}"
                    f", got {v!r}; re-export the engine."
                )
            stats[key] = tuple(float(x) for x in v)
        resize, interp = d.get("resize", "shortest"), d.get("interpolation", "bicubic")
        if resize not in RESIZE_MODES:
            raise ExportError(f"{where}.resize {resize!r} is not one of {list(RESIZE_MODES)}.")
        if interp not in INTERPOLATIONS:
            raise ExportError(
                f"{where}.interpolation {interp!r} is not one of {list(INTERPOLATIONS)}."
            )
        return cls(size, stats["mean"], stats["std"], resize, interp)


# --- the metadata object ---------------------------------------------------------------------


@dataclass(frozen=True)
class EngineMetadata:
    """The validated metadata of an engine; ``raw`` keeps every field as stored (recipe, ...)."""

    tasks: tuple[str, ...]
    class_names: tuple[tuple[str, ...], ...]
    preprocessing: Preprocessing
    method: str
    mode: EngineMode
    precision: Precision
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    raw: dict[str, Any]

    @property
    def class_counts(self) -> list[int]:
        return [len(c) for c in self.class_names]

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def validate_metadata(meta: Any, source: str | os.PathLike) -> EngineMetadata:
    """Check that ``meta`` describes a surgery-edge engine, field by field.

    Raises:
        ExportError: naming ``source`` and the field that is missing or malformed.
    """
    if not isinstance(meta, dict) or meta.get("kind") != "engine":
        raise ExportError(
            f"{source} carries no surgery-edge engine metadata: it was not exported by "
            "surgery-edge, or it is truncated or corrupt. Re-export it with `surgery-edge export`."
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ExportError(f"Engine metadata of {source} lacks {missing}; re-export the engine.")
    where = f"Engine metadata of {source}"
    tasks, names = meta["tasks"], meta["class_names"]
    if not _string_list(tasks) or not tasks:
        raise ExportError(f"{where}: tasks must be a non-empty list of names, got {tasks!r}.")
    if not isinstance(names, list) or not all(_string_list(c) and c for c in names):
        raise ExportError(f"{where}: class_names must be one non-empty list of names per task.")
    if len(tasks) != len(names):
        raise ExportError(
            f"{where} has {len(tasks)} tasks but {len(names)} class-name lists; re-export it."
        )
    if not isinstance(meta["method"], str):
        raise ExportError(f"{where}: method must be a name, got {meta['method']!r}.")
    preprocessing = Preprocessing.from_dict(meta["preprocessing"], source)
    try:
        mode, precision = EngineMode.parse(meta["mode"]), Precision.parse(meta["precision"])
    except ExportError as e:
        raise ExportError(f"{where}: {e} Re-export the engine.") from None
    if precision.quantized and not isinstance(meta.get("quantization"), dict):
        raise ExportError(
            f"{where}: a {precision} engine must record its quantization (an object under "
            "'quantization'); re-export it with `surgery-edge export --precision "
            f"{precision}`."
        )
    inputs, outputs = io_names(mode, tasks)
    if meta["inputs"] != inputs or meta["outputs"] != outputs:
        raise ExportError(
            f"{where} names inputs {meta['inputs']!r} and outputs {meta['outputs']!r}; a {mode} "
            f"engine has {inputs} and {outputs}. Re-export the engine."
        )
    return EngineMetadata(
        tasks=tuple(tasks),
        class_names=tuple(tuple(c) for c in names),
        preprocessing=preprocessing,
        method=meta["method"],
        mode=mode,
        precision=precision,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        raw=meta,
    )


def parse_metadata(text: str | None, source: str | os.PathLike) -> EngineMetadata:
    """Parse and validate the JSON stored in an artefact (``None`` when it has none)."""
    if text is None:
        return validate_metadata(None, source)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"Engine metadata of {source} is not valid JSON ({e}).") from None
    return validate_metadata(meta, source)


def read_onnx_metadata(path: str | os.PathLike) -> EngineMetadata:
    """The engine metadata stored in an ONNX file (its weights are not read)."""
    import onnx  # deferred: only export and inspection need onnx; serving reads it from ORT

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, OSError, ...
        raise ExportError(
            f"{path} is not a readable ONNX file ({type(e).__name__}: {e})."
        ) from None
    props = {p.key: p.value for p in proto.metadata_props}
    return parse_metadata(props.get(META_KEY), path)


# --- sidecars (TensorRT) ---------------------------------------------------------------------


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def write_sidecar(
    engine_path: str | os.PathLike, meta: dict[str, Any], engine_sha256: str | None = None
) -> Path:
    """Write ``meta`` (validated first) beside the engine, atomically.

    Args:
        engine_sha256: the SHA-256 of the engine's bytes, recorded so that the sidecar is read
            only with the engine it was written for (not another engine's, nor a partial one).
    """
    if engine_sha256 is not None:
        meta = {**meta, "engine_sha256": engine_sha256}
    validate_metadata(meta, sidecar_path(engine_path))
    return write_json_atomic(sidecar_path(engine_path), meta)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def read_sidecar(engine_path: str | os.PathLike) -> EngineMetadata:
    """The metadata beside a TensorRT engine; refused when it records another engine's hash."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ExportError(
            f"Engine {engine_path} has no metadata file {path}; it is written next to the engine "
            "by `surgery-edge export`. Keep the two files together."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"Engine metadata file {path} is unreadable ({e}).") from None
    meta = parse_metadata(text, path)
    recorded = meta.get("engine_sha256")
    if recorded is not None and Path(engine_path).is_file():
        if recorded != _sha256(Path(engine_path)):
            raise ExportError(
                f"Metadata file {path} was written for another engine than {engine_path} (the "
                "engine's checksum differs: a swapped, rebuilt or partly written file). Keep each "
                "engine with its own .json, or re-export it with `surgery-edge export --trt`."
            )
    return meta

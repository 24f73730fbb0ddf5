"""Engine metadata: what a deployed artefact must carry so that it can be served on its own.

Every exported artefact (ONNX, TensorRT, AOTInductor ``.pt2``) carries one JSON object under the
key ``surgery_edge``: the task names and class names per task, the preprocessing (image size,
mean, std), the method (none | surgery | surgeryv2), the adapter rank, the architecture, the
merge recipe, the package version, the mode (routed | all-tasks), the precision and the
engine's input and output names. Where it lives:

- ONNX: ``ModelProto.metadata_props["surgery_edge"]``;
- ``.pt2``: the AOTInductor package metadata (``aot_inductor.metadata``), read back with
  ``AOTICompiledModel.get_metadata()``;
- TensorRT: a sidecar ``<engine>.json`` (a serialized engine has no place for user data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from surgery_edge.errors import ExportError

META_KEY = "surgery_edge"
FORMAT_VERSION = 1
MODES = ("routed", "all-tasks")
PRECISIONS = ("fp32", "fp16")

# The preprocessing every engine expects (mirrors surgery_edge.data.transforms.to_model_input).
RESIZE = "bilinear-antialias"

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


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ExportError(f"Unknown export mode {mode!r}; use one of {list(MODES)}.")
    return mode


def io_names(mode: str, tasks: list[str]) -> tuple[list[str], list[str]]:
    """The engine's input and output names for ``mode``."""
    if check_mode(mode) == "routed":
        return ["images", "task_ids"], ["logits", "probs"]
    return ["images"], [f"logits_{t}" for t in tasks]


def engine_metadata(
    model,
    mode: str,
    precision: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata of an engine exported from ``model`` (a MultiTaskModel).

    Args:
        model: the exported model; tasks, class names, method, rank and architecture come from it.
        mode: ``routed`` or ``all-tasks``.
        precision: ``fp32`` or ``fp16`` (weights and compute; inputs and outputs stay float32).
        extra: more fields, e.g. ``{"merge_recipe": {...}}`` (not the model-derived ones that
            readers rely on: tasks, class names, preprocessing, method, mode, precision, I/O).
    """
    from surgery_edge import __version__

    if precision not in PRECISIONS:
        raise ExportError(f"Unknown precision {precision!r}; use one of {list(PRECISIONS)}.")
    arch = model.encoder.arch
    names = model.class_names or [[str(i) for i in range(c)] for c in model.class_counts]
    inputs, outputs = io_names(mode, model.tasks)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "engine",
        "package_version": __version__,
        "tasks": list(model.tasks),
        "class_names": [list(c) for c in names],
        "preprocessing": {
            "image_size": arch.image_size,
            "mean": list(arch.mean),
            "std": list(arch.std),
            "channels": "RGB",
            "scale": "1/255",
            "resize": RESIZE,
            "layout": "NCHW",
        },
        "method": model.method,
        "rank": model.bank.rank if model.bank is not None else 0,
        "architecture": arch.to_dict(),
        "merge_recipe": {},
        "mode": mode,
        "precision": precision,
        "inputs": inputs,
        "outputs": outputs,
    }
    clash = sorted(set(extra or {}) & set(REQUIRED_KEYS))
    if clash:
        raise ExportError(
            f"Extra engine metadata may not replace {clash}; they come from the model."
        )
    meta.update(extra or {})
    return meta


def validate_metadata(meta: Any, source: str | os.PathLike) -> dict[str, Any]:
    """Check that ``meta`` describes a surgery-edge engine; return it."""
    if not isinstance(meta, dict) or meta.get("kind") != "engine":
        raise ExportError(
            f"{source} carries no surgery-edge engine metadata: it was not exported by "
            "surgery-edge, or it is truncated or corrupt. Re-export it with `surgery-edge export`."
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ExportError(f"Engine metadata of {source} lacks {missing}; re-export the engine.")
    if len(meta["tasks"]) != len(meta["class_names"]):
        raise ExportError(f"Engine metadata of {source} has a class-name list per task mismatch.")
    check_mode(meta["mode"])
    return meta


def parse_metadata(text: str | None, source: str | os.PathLike) -> dict[str, Any]:
    """Parse the JSON stored in an artefact (``None`` when it has none)."""
    if text is None:
        return validate_metadata(None, source)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"Engine metadata of {source} is not valid JSON ({e}).") from None
    return validate_metadata(meta, source)


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def write_sidecar(engine_path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    from surgery_edge.io import write_json_atomic

    return write_json_atomic(sidecar_path(engine_path), meta)


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ExportError(
            f"Engine {engine_path} has no metadata file {path}; it is written next to the engine "
            "by `surgery-edge export`. Keep the two files together."
        )
    return parse_metadata(path.read_text(), path)

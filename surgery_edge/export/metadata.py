"""The metadata an exporter writes into an engine, built from the exported model.

The format itself (keys, modes, precisions, validation, readers) is
:mod:`surgery_edge.engine_format`, shared with the runtime; this module only fills it in from a
:class:`~surgery_edge.surgery.model.MultiTaskModel`.
"""

from __future__ import annotations

from typing import Any

from surgery_edge import __version__
from surgery_edge.engine_format import (
    FORMAT_VERSION,
    REQUIRED_KEYS,
    EngineMode,
    Precision,
    io_names,
    validate_metadata,
)
from surgery_edge.errors import ExportError
from surgery_edge.surgery.model import MultiTaskModel


def engine_metadata(
    model: MultiTaskModel,
    mode: EngineMode,
    precision: Precision,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata of an engine exported from ``model``, validated.

    Args:
        model: the exported model; tasks, class names, method, rank and architecture come from it.
        mode: ``routed`` or ``all-tasks``.
        precision: ``fp32`` or ``fp16`` (weights and compute; inputs and outputs stay float32).
        extra: more fields, e.g. ``{"merge_recipe": {...}}`` (not the model-derived ones that
            readers rely on: tasks, class names, preprocessing, method, mode, precision, I/O).
    """
    arch = model.encoder.arch
    names = model.class_names or [[str(i) for i in range(c)] for c in model.class_counts]
    inputs, outputs = io_names(mode, model.tasks)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "engine",
        "package_version": __version__,
        "tasks": list(model.tasks),
        "class_names": [list(c) for c in names],
        "preprocessing": arch.preprocessing.to_dict(),
        "method": model.method,
        "rank": model.bank.rank if model.bank is not None else 0,
        "architecture": arch.to_dict(),
        "merge_recipe": {},
        "mode": mode.value,
        "precision": precision.value,
        "inputs": inputs,
        "outputs": outputs,
    }
    clash = sorted(set(extra or {}) & set(REQUIRED_KEYS))
    if clash:
        raise ExportError(
            f"Extra engine metadata may not replace {clash}; they come from the model."
        )
    meta.update(extra or {})
    validate_metadata(meta, "the exported model")
    return meta

"""The model repository ``surgery-edge serve`` runs: Python-backend models over the runtime.

One ``engine`` model per engine (the engine as exported) and, optionally, one model per task
(encoded image bytes in, top-k class names out); see :mod:`surgery_edge.runtime.serving`.
Their inputs and outputs come from the engine format's
:func:`~surgery_edge.engine_format.io_specs`, their batching from the same
:class:`~surgery_edge.runtime.triton_config.Batching` the official repository's writer uses.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from surgery_edge.engine_format import EngineMetadata, EngineMode, TensorSpec, io_specs
from surgery_edge.errors import ExportError
from surgery_edge.runtime.backends import open_backend
from surgery_edge.runtime.serve_options import ServeOptions
from surgery_edge.runtime.triton_config import (
    META_PARAMETER,
    Enum,
    check_model_name,
    parameters,
    tensor_config,
    to_pbtxt,
)
from surgery_edge.runtime.triton_models import STACKED_OUTPUT

MODEL_PY = "from surgery_edge.runtime.triton_models import {cls} as TritonPythonModel\n"


def serving_repository(
    engines: Mapping[str, str | os.PathLike],
    repo: str | os.PathLike,
    options: ServeOptions,
    task_models_for: str | None = None,
    version: int = 1,
) -> dict[str, EngineMetadata]:
    """Write the Python-backend model repository that
    :class:`~surgery_edge.runtime.serving.Server` runs.

    Args:
        engines: ``{model name: engine file}``; each engine is opened here once, so a bad
            file, device or backend fails before the server starts.
        repo: the (new or empty) repository folder.
        options: batching, instances, device, task models.
        task_models_for: the engine whose tasks get a model each (default: the first), when
            ``options.task_models`` is set.
        version: the engines' version number in the repository (Triton's version folder).

    Returns:
        ``{engine model name: its metadata}``.
    """
    repo = Path(repo)
    metas: dict[str, EngineMetadata] = {}
    for name, path in engines.items():
        check_model_name(name, "Engine model name")
        path = Path(path).resolve()
        backend = open_backend(path, device=options.device)  # fails here, not in the server
        metas[name] = backend.meta
        del backend
        config = _engine_config(name, path, metas[name], options)
        _write_model(repo / name, "EngineModel", config, version)
    primary = task_models_for or next(iter(engines))
    if options.task_models:
        meta = metas[primary]
        check_task_models(meta, metas, engines[primary])
        for task in meta.tasks:
            config = _task_config(task, primary, meta, options, engine_version=version)
            _write_model(repo / task, "TaskModel", config)
    return metas


def check_task_models(meta: EngineMetadata, metas: Mapping[str, Any], source: Any) -> None:
    """Every task of ``meta`` can name a task model beside the engine models ``metas``."""
    for task in meta.tasks:
        try:
            check_model_name(task, "Task")
        except ExportError as e:
            raise ExportError(f"{e} (of {source}; serve with --no-task-models)") from None
        if task in metas:
            raise ExportError(
                f"Task {task!r} has the name of an engine model; rename that with --name, or "
                "serve without task models."
            )


def _write_model(folder: Path, cls: str, config: dict[str, Any], version: int = 1) -> None:
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    (folder / str(version) / "model.py").write_text(MODEL_PY.format(cls=cls))
    (folder / "config.pbtxt").write_text(to_pbtxt(config), encoding="utf-8")


def _batching(options: ServeOptions) -> dict[str, Any]:
    return {"backend": "python", **options.batching.config()}


def _common_parameters() -> dict[str, str]:
    return {"python_version": platform.python_version()}


def _engine_config(
    name: str, path: Path, meta: EngineMetadata, options: ServeOptions
) -> dict[str, Any]:
    # the Python backend takes task_ids as (B, 1), so no reshape to the graph's (B,)
    specs = io_specs(meta)
    inputs = [tensor_config(spec, reshape=False) for spec in specs[0]]
    outputs = [tensor_config(spec, reshape=False) for spec in specs[1]]
    if meta.mode is EngineMode.ALL_TASKS:  # every task in one tensor, sent only when asked for
        stacked = ("batch", len(meta.tasks), max(meta.class_counts))
        outputs.append(tensor_config(TensorSpec(STACKED_OUTPUT, "float32", stacked)))
    values = {
        **_common_parameters(),
        "engine": str(path),
        "device": options.device,
        "threads": "" if options.threads is None else str(options.threads),
        META_PARAMETER: json.dumps(meta.to_dict()),
    }
    return {
        "name": name,
        **_batching(options),
        "input": inputs,
        "output": outputs,
        "instance_group": [{"count": options.instances, "kind": Enum("KIND_CPU")}],
        "parameters": parameters(values),
    }


def _task_config(
    task: str,
    engine_model: str,
    meta: EngineMetadata,
    options: ServeOptions,
    engine_version: int = 1,
) -> dict[str, Any]:
    values = {
        **_common_parameters(),
        "engine_model": engine_model,
        "engine_version": str(engine_version),  # the version it was made for: in its errors
        "task": task,
        "top_k": str(options.top_k),
        "max_pixels": str(options.max_pixels),
        META_PARAMETER: json.dumps(meta.to_dict()),
    }
    return {
        "name": task,
        **_batching(options),
        "input": [{"name": "image", "data_type": Enum("TYPE_STRING"), "dims": [1]}],
        "output": [
            {"name": "labels", "data_type": Enum("TYPE_STRING"), "dims": [-1]},
            {"name": "probs", "data_type": Enum("TYPE_FP32"), "dims": [-1]},
            {"name": "classes", "data_type": Enum("TYPE_INT64"), "dims": [-1]},
        ],
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": parameters(values),
    }

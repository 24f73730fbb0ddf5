"""ONNX export: the merged backbone, every task's adapters and heads in one graph.

One set of backbone weights serves every task: routing is a gather of each row's adapters and
head by its task id (``Gather``/``GatherND`` on the stacked ``(T, r, d)`` adapter tensors), so
the file holds the backbone once, plus the small per-task tensors.

Exporter: the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``), the
default since torch 2.9. It traces ``nn.MultiheadAttention`` and the task-id gathers into plain
ONNX ops, carries the dynamic batch dimension as a checked ``torch.export.Dim`` and emits opset
18+. If it fails on a given torch version, the export falls back to the TorchScript exporter
(``dynamo=False``, deprecated upstream) and records which one was used in the metadata.

Inputs and outputs are float32 in both precisions: an fp16 engine casts the images to half
inside the graph, runs the backbone, adapters and heads with half weights, and casts the logits
back to float32 before the softmax.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from surgery_edge.engine_digest import DIGEST_PLACEHOLDER, INTEGRITY_KEY, file_sha256, write_sealed
from surgery_edge.engine_format import META_KEY, EngineMode, Precision, io_names
from surgery_edge.errors import ExportError
from surgery_edge.export.metadata import engine_metadata
from surgery_edge.export.modules import engine_module, example_inputs, weight_dtype
from surgery_edge.export.parity import smoke_check
from surgery_edge.io import atomic_path
from surgery_edge.runtime import Predictor
from surgery_edge.runtime.backends import OnnxBackend
from surgery_edge.surgery.model import MultiTaskModel

DEFAULT_OPSET = 18
MIN_OPSET = 18  # the lowest opset the torch.export-based exporter emits
# Above this many bytes of weights the tensors go to "<file>.data" (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


def export_onnx(
    model: MultiTaskModel,
    path: str | os.PathLike,
    mode: EngineMode | str = EngineMode.ROUTED,
    precision: Precision | str = Precision.FP32,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
    check: bool = True,
) -> Path:
    """Export ``model`` as one multi-task ONNX engine (written atomically).

    Args:
        model: the multi-task model (merged backbone + adapters + heads) on its reference path.
        path: the ``.onnx`` file to write; weights over ~1.8 GB go to ``<path>.data`` beside it.
        mode: ``routed`` (inputs ``images`` (B, 3, H, W) float32 and ``task_ids`` (B,) int64;
            outputs ``logits`` and ``probs`` (B, C_max), ``-inf`` / 0 beyond a task's classes)
            or ``all-tasks`` (input ``images``; one output ``logits_<task>`` (B, C_task) per task).
        precision: ``fp32``, or ``fp16``: half weights and compute; inputs and outputs stay
            float32 (cast inside the graph).
        opset: ONNX opset, at least 18.
        metadata: extra engine metadata (e.g. ``{"merge_recipe": ...}``) merged into the
            generated one, which is stored as JSON under ``metadata_props["surgery_edge"]``.
        check: run the engine in ONNX Runtime on a few random images and compare with PyTorch.

    Returns:
        ``path``.
    """
    # parsed here, where a library user's strings come in; everything below takes them typed
    path, mode, precision = Path(path), EngineMode.parse(mode), Precision.parse(precision)
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(
            f"ONNX opset {opset} is not supported: use {MIN_OPSET} to "
            f"{onnx.defs.onnx_opset_version()} (TensorRT 10 and ONNX Runtime read opset 18)."
        )
    module = engine_module(model, mode, precision, device="cpu")
    args = example_inputs(model, mode)
    inputs, outputs = io_names(mode, model.tasks)
    proto, exporter = _trace(module, args, inputs, outputs, opset)
    meta = engine_metadata(
        model,
        mode,
        precision,
        {
            **(metadata or {}),
            "format": "onnx",
            "exporter": exporter,
            "opset": opset,
            "task_tables": task_tables(proto, model, precision),
        },
    )
    _finalise(proto, meta)
    _save(proto, path, verify=(lambda tmp: _smoke_check(model, tmp, precision)) if check else None)
    return path


def _smoke_check(model: MultiTaskModel, tmp: Path, precision: Precision) -> None:
    smoke_check(model, Predictor(OnnxBackend(tmp, device="cpu")), precision)


# --- tracing ---------------------------------------------------------------------------------


def _trace(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    inputs: list[str],
    outputs: list[str],
    opset: int,
):
    """Trace ``module`` to an ``onnx.ModelProto``; returns it and the exporter's name."""
    try:
        return _trace_dynamo(module, args, inputs, outputs, opset), "torch.onnx (dynamo)"
    except Exception as e:  # exporter failures come as many exception types
        warnings.warn(
            f"The torch.export-based ONNX exporter failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); using the TorchScript exporter.",
            stacklevel=3,
        )
    try:
        return _trace_torchscript(module, args, inputs, outputs, opset), "torch.onnx (torchscript)"
    except Exception as e:
        raise ExportError(
            f"Neither ONNX exporter could trace the model ({type(e).__name__}: {e}). Make sure "
            "the model is on its reference (non-fused) path."
        ) from e


def _trace_dynamo(module, args, inputs, outputs, opset):
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = {name: {0: batch} for name in inputs}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def _trace_torchscript(module, args, inputs, outputs, opset):
    # Traced with autograd on: under no_grad, nn.MultiheadAttention takes its fused fast path
    # (aten::_native_multi_head_attention), which the TorchScript exporter cannot export.
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            args,
            str(f),
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
            opset_version=opset,
            do_constant_folding=True,
        )
        return onnx.load(str(f))


def task_tables(
    proto, model: MultiTaskModel, precision: Precision = Precision.FP32
) -> dict[str, list[str]]:
    """The initializers that hold the per-task tables, by kind: ``{"heads": [...], "adapters":
    [...]}``, found by value (the exporter names folded constants ``val_N``).

    Quantisation reads this record: those tensors are gathered by task id, so they are stored
    weight-only (see :mod:`surgery_edge.export.quantize`) rather than quantised as a layer.
    """
    dtype = weight_dtype(precision)
    wanted = {"heads": [model.head_weight]}
    if model.bank is not None:
        wanted["adapters"] = [w for site in model.bank.sites for w in model.bank.weights(site)]
    # as stored, and transposed: the exporter folds ``w.transpose(-1, -2)`` into a constant
    candidates = {
        kind: [a for w in tensors for a in _both_layouts(w.detach().to("cpu", dtype).numpy())]
        for kind, tensors in wanted.items()
    }
    found: dict[str, list[str]] = {kind: [] for kind in candidates}
    for init in proto.graph.initializer:
        if len(init.dims) != 3:
            continue
        for kind, arrays in candidates.items():
            shaped = [a for a in arrays if tuple(a.shape) == tuple(init.dims)]
            if shaped and any(np.array_equal(a, numpy_helper.to_array(init)) for a in shaped):
                found[kind].append(init.name)
                break
    return found


def _both_layouts(a: np.ndarray) -> list[np.ndarray]:
    return [a, np.ascontiguousarray(np.swapaxes(a, -1, -2))]


# --- finishing and saving --------------------------------------------------------------------


def _graphs(graph):
    """``graph`` and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _finalise(proto, meta: dict[str, Any]) -> None:
    """Drop the exporter's per-node debug metadata (stack traces with local paths: several
    times the size of a small model's weights) and store the engine metadata."""
    for graph in _graphs(proto.graph):
        graph.doc_string = ""
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
        for items in (graph.value_info, graph.input, graph.output, graph.initializer):
            for item in items:
                del item.metadata_props[:]
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]
            node.doc_string = ""
    del proto.metadata_props[:]
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    proto.producer_name = "surgery-edge"
    proto.producer_version = str(meta.get("package_version", ""))
    proto.doc_string = (
        f"surgery-edge multi-task engine ({meta['mode']}, {meta['precision']}, method "
        f"{meta['method']}); tasks: {', '.join(meta['tasks'])}."
    )


def _weight_bytes(proto) -> int:
    total = 0
    for t in proto.graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def write_engine(proto, path: str | os.PathLike, external_data: bool = False) -> str:
    """Write the engine ``proto`` (its metadata already stored) to ``path``, sealed.

    The metadata's ``integrity`` record gets the SHA-256 of the file as written (see
    :mod:`surgery_edge.engine_format`), and with ``external_data`` the weights go to
    ``<path>.data`` beside it, whose SHA-256 is recorded too. Not atomic: ``path`` is a
    temporary file or folder of the caller's. Returns the digest.
    """
    path = Path(path)
    prop = next((p for p in proto.metadata_props if p.key == META_KEY), None)
    if prop is None:
        raise ExportError(f"Cannot write {path}: the model carries no engine metadata.")
    meta, files = json.loads(prop.value), {}
    if external_data:
        data_name = f"{path.name}.data"
        # writes the weights and turns the initializers into references to them (in place)
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        files[data_name] = file_sha256(path.with_name(data_name))
    meta[INTEGRITY_KEY] = {"sha256": DIGEST_PLACEHOLDER, **({"files": files} if files else {})}
    prop.value = json.dumps(meta)
    return write_sealed(path, proto.SerializeToString())


def _save(proto, path: Path, verify=None) -> None:
    """Write ``proto`` to ``path`` atomically and sealed; it must pass the checker (and
    ``verify(tmp)``) before it replaces ``path``."""
    if _weight_bytes(proto) <= EXTERNAL_DATA_BYTES:
        with atomic_path(path) as tmp:
            write_engine(proto, tmp)
            check_onnx(tmp)
            if verify is not None:
                verify(tmp)
        return
    # Two files: write both in a private folder beside ``path``, check, then move them in.
    data_name = f"{path.name}.data"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        write_engine(proto, tmp, external_data=True)
        check_onnx(tmp)
        if verify is not None:
            verify(tmp)
        os.replace(tmp.with_name(data_name), path.with_name(data_name))
        os.replace(tmp, path)


def check_onnx(path: str | os.PathLike):
    """Run ``onnx.checker`` (full check) and strict shape inference on ``path``.

    Returns the model (without external weights loaded); raises ExportError naming the file.
    """
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as e:  # ValidationError, InferenceError, DecodeError, ...
        raise ExportError(
            f"{path} is not a valid ONNX model ({type(e).__name__}: {e}). Re-export it with "
            "`surgery-edge export`."
        ) from None
    return proto

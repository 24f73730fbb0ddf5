"""What is inside an engine, read without running it (``surgery-edge info ENGINE``).

Everything comes from what the engine carries: the metadata every export writes (tasks and
classes, preprocessing, architecture, merge recipe, precision, the version that made it) and,
for ONNX, the graph's declared inputs and outputs. Nothing is run or loaded onto a device, and
neither torch nor onnx is imported (``info`` works on the base install): an ``.onnx`` file is
opened by ONNX Runtime on the CPU, unoptimised, for its metadata and its inputs and outputs; a
``.pt2`` package is a zip archive whose AOTInductor metadata is read as JSON; a TensorRT engine
is described by the sidecar written beside it. The engine is verified against the digest its
export recorded first, as ``load`` does: a changed copy is refused, not described.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from surgery_edge.engine_format import (
    INTEGRITY_KEY,
    EngineMetadata,
    EngineMode,
    TensorSpec,
    check_graph_inputs,
    engine_kind,
    io_specs,
    metadata_from_props,
    read_metadata,
    sidecar_path,
    verify_engine,
)
from surgery_edge.errors import ExportError

KIND_NAMES = {"onnx": "ONNX", "pt2": "AOTInductor package", "tensorrt": "TensorRT engine"}


@dataclass(frozen=True)
class EngineInfo:
    """An engine as ``surgery-edge info`` reports it."""

    path: str
    kind: str  # onnx | pt2 | tensorrt
    files: dict[str, int]  # every file the engine needs -> its size in bytes
    metadata: EngineMetadata
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    io_source: str  # "graph" (read from the ONNX graph) or "metadata" (derived from it)

    @property
    def size_bytes(self) -> int:
        return sum(self.files.values())

    def to_dict(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "path": self.path,
            "kind": self.kind,
            "size_bytes": self.size_bytes,
            "files": self.files,
            "mode": str(meta.mode),
            "precision": str(meta.precision),
            "method": meta.method,
            "tasks": [{"name": t, "classes": len(c)} for t, c in zip(meta.tasks, meta.class_names)],
            "inputs": [{**asdict(s), "shape": list(s.shape)} for s in self.inputs],
            "outputs": [{**asdict(s), "shape": list(s.shape)} for s in self.outputs],
            "io_source": self.io_source,
            "metadata": meta.to_dict(),
        }


# ONNX Runtime's element type names ("tensor(float)") -> numpy's, where they differ
_ORT_DTYPES = {"float": "float32", "double": "float64"}


def _onnx_specs(values) -> list[TensorSpec]:
    """ONNX Runtime's NodeArgs as specs: a dynamic axis is named by its symbol (``batch``)."""
    specs = []
    for v in values:
        elem = v.type.removeprefix("tensor(").removesuffix(")")
        specs.append(TensorSpec(v.name, _ORT_DTYPES.get(elem, elem), tuple(v.shape)))
    return specs


def _onnx_session(path: Path):
    """An unoptimised CPU session of ``path``: what the graph declares, as ONNX Runtime reads
    it (the runtime's own library: no onnx needed)."""
    import onnxruntime as ort  # deferred: only ONNX files are opened with it

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(
            f"{path} is not a readable ONNX file ({first}). It may be truncated, or its weights "
            f"file ({path.name}.data) may be missing: re-export it with `surgery-edge export`."
        ) from None


def describe_engine(path: str | os.PathLike) -> EngineInfo:
    """Read what ``path`` (an ``.onnx``, ``.pt2`` or TensorRT engine) holds.

    Raises:
        ExportError: the file is missing, unreadable, or carries no surgery-edge metadata.
    """
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"Engine {p} does not exist (or is not a file).")
    kind = engine_kind(p)
    files = {p.name: p.stat().st_size}
    io_source = "metadata"
    if kind == "onnx":
        session = _onnx_session(p)
        meta = metadata_from_props(session.get_modelmeta().custom_metadata_map, p)
        verify_engine(p, meta, kind)
        data = p.with_name(p.name + ".data")  # the weights of a large export (export/onnx.py)
        if data.is_file():
            files[data.name] = data.stat().st_size
        inputs, outputs = _onnx_specs(session.get_inputs()), _onnx_specs(session.get_outputs())
        check_graph_inputs(p, meta, [(s.name, s.dtype, s.shape) for s in inputs])
        io_source = "graph"
    else:
        meta = read_metadata(p, kind)
        verify_engine(p, meta, kind)
        if kind == "tensorrt":
            files[sidecar_path(p).name] = sidecar_path(p).stat().st_size
        inputs, outputs = io_specs(meta)
    return EngineInfo(str(p), kind, files, meta, inputs, outputs, io_source)


# --- text ------------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _params(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if k != "method")


def format_info(info: EngineInfo) -> list[str]:
    """The lines ``surgery-edge info`` prints."""
    meta, raw = info.metadata, info.metadata.raw
    lines = [
        f"{Path(info.path).name}: {KIND_NAMES[info.kind]}, {_size(info.size_bytes)}, "
        f"made by surgery-edge {raw.get('package_version', '?')} "
        f"(engine format {raw.get('format_version', '?')})",
    ]
    if len(info.files) > 1:
        lines.append(
            "  files      " + ", ".join(f"{n} ({_size(s)})" for n, s in info.files.items())
        )
    how = (
        "one backbone; each image runs the task its task_ids entry names"
        if meta.mode is EngineMode.ROUTED
        else "one backbone; every image gets every task's logits"
    )
    lines.append(f"  mode       {meta.mode}: {how}")
    quant = raw.get("quantization")
    precision = str(meta.precision)
    if isinstance(quant, dict) and quant:
        precision += f" ({_params(quant)})"
    lines.append(f"  precision  {precision}")
    method = meta.method + (f" rank {raw['rank']}" if raw.get("rank") else "")
    recipe = raw.get("merge_recipe")
    if isinstance(recipe, dict) and recipe.get("method"):
        params = _params(recipe)
        method += f" on {recipe['method']}" + (f" ({params})" if params else "")
    else:
        method += " (one model, not merged)"
    lines.append(f"  method     {method}")
    arch = raw.get("architecture")
    if isinstance(arch, dict):
        keys = ("width", "layers", "heads", "patch_size", "embed_dim")
        fields = [f"{k.split('_')[0]} {arch[k]}" for k in keys if arch.get(k) is not None]
        lines.append(f"  arch       {arch.get('name', '?')}: " + ", ".join(fields))
    pre = meta.preprocessing
    if pre.resize == "shortest":
        resize = f"shorter side to {pre.image_size} px ({pre.interpolation}), centre crop"
    else:
        resize = f"stretched to {pre.image_size} px square ({pre.interpolation})"
    lines.append(
        f"  preprocess RGB, {resize}, /255, mean {[round(m, 4) for m in pre.mean]}, "
        f"std {[round(s, 4) for s in pre.std]}"
    )
    lines.append(f"  tasks      {len(meta.tasks)}")
    width = max(len(t) for t in meta.tasks)
    for task, names in zip(meta.tasks, meta.class_names):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        lines.append(f"    {task:<{width}}  {len(names):>4} classes  ({shown})")
    where = "" if info.io_source == "graph" else "  (as the metadata declares them)"
    for label, specs in (("inputs", info.inputs), ("outputs", info.outputs)):
        if len(specs) <= 2:
            lines.append(f"  {label:<10} " + "; ".join(map(str, specs)) + where)
        else:
            lines.append(f"  {label:<10} {len(specs)}" + where)
            lines.extend(f"    {s}" for s in specs)
        where = ""
    made = [str(raw[k]) for k in ("exporter",) if raw.get(k)]
    if raw.get("opset"):
        made.append(f"opset {raw['opset']}")
    if raw.get("device"):
        made.append(f"compiled for {raw['device']}")
    trt = raw.get("tensorrt")
    if isinstance(trt, dict):
        made.append(f"TensorRT {trt.get('version', '?')}")
        if all(trt.get(k) is not None for k in ("min_batch", "opt_batch", "max_batch")):
            made.append(
                f"batch {trt['min_batch']}/{trt['opt_batch']}/{trt['max_batch']} (min/opt/max)"
            )
    if made:
        lines.append("  exported   " + ", ".join(made))
    digest = (raw.get(INTEGRITY_KEY) or {}).get("sha256")
    if digest:  # describe_engine verified it
        lines.append(f"  integrity  SHA-256 {digest[:16]}... verified (graph, weights, metadata)")
    return lines

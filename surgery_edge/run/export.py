"""Exporting from a run directory: pick the merge and surgery, build the model, write engines.

Everything comes from the run's checkpoints (:class:`~surgery_edge.run.layout.RunLayout`): no
dataset is read, so exporting needs only the files under ``checkpoints/``, ``merged/`` and
``adapters/``.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from surgery_edge.device import resolve_device
from surgery_edge.engine_format import EngineMode, read_onnx_metadata, read_sidecar
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.export.aoti import export_aoti
from surgery_edge.export.onnx import export_onnx
from surgery_edge.export.tensorrt import build_engine, check_workspace, profile_shapes
from surgery_edge.export.triton import TritonOptions, write_repository
from surgery_edge.io import check_output
from surgery_edge.run.layout import RunLayout
from surgery_edge.runtime.backends import import_tensorrt
from surgery_edge.runtime.describe import read_pt2_metadata


@dataclass(frozen=True)
class TrtOptions:
    """TensorRT build settings (see :func:`surgery_edge.export.tensorrt.build_engine`)."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_gb: float = 4.0
    timing_cache: Path | None = None


def default_onnx_path(run_dir: Path, merge: str, surgery: str, mode: str, fp16: bool) -> Path:
    return Path(run_dir) / "engines" / f"{merge}-{surgery}-{mode}{'-fp16' if fp16 else ''}.onnx"


def export_run(
    run_dir: str | os.PathLike,
    merge: str = "task_arithmetic",
    surgery: str = "surgeryv2",
    mode: EngineMode | str = EngineMode.ROUTED,
    onnx: str | os.PathLike | None = None,
    fp16: bool = False,
    aoti: str | os.PathLike | None = None,
    trt: str | os.PathLike | None = None,
    trt_options: TrtOptions | None = None,
    device: str | None = None,
    overwrite: bool = False,
    triton_repo: str | os.PathLike | None = None,
    triton_options: TritonOptions | None = None,
) -> dict[str, Path]:
    """Export one multi-task engine of a run to ONNX, AOTInductor and/or TensorRT, and
    optionally a Triton Inference Server model repository holding it.

    TensorRT builds from the ONNX this call exports (``onnx``, or ``<trt>.onnx`` beside the
    engine). TensorRT and Triton settings, TensorRT's availability and every output path are
    checked before any export work. With no ONNX or TensorRT target given, writes
    ``RUN/engines/<merge>-<surgery>-<mode>[-fp16].onnx`` (a Triton repository needs one). The
    repository holds the TensorRT plan when one is built, else the ONNX engine.

    Args:
        overwrite: replace an existing engine made from other checkpoints or settings (a file
            that is not an engine is never replaced).

    Returns:
        ``{"onnx" | "pt2" | "tensorrt" | "triton": path}`` of what was written (``triton``:
        the model's folder in the repository).
    """
    mode = EngineMode.parse(mode)
    layout = RunLayout.open(run_dir)
    run_device = resolve_device(device or layout.read_config().device)
    opts = trt_options or TrtOptions()
    if trt is not None:  # fail fast: before minutes of export work
        arch = layout.arch()
        profile_shapes(arch.image_size, mode, opts.min_batch, opts.opt_batch, opts.max_batch)
        check_workspace(opts.workspace_gb)
        import_tensorrt()
    triton = (triton_options or TritonOptions()).check() if triton_repo is not None else None
    if onnx is None and trt is None and (aoti is None or triton is not None):
        onnx = default_onnx_path(layout.root, merge, surgery, mode.value, fp16)
    onnx_path = None
    if onnx is not None or trt is not None:
        onnx_path = Path(onnx) if onnx is not None else Path(trt).with_suffix(".onnx")
    targets = [
        (p, what, same)
        for p, what, same in (
            (onnx_path, "ONNX engine", _onnx_engine),
            (aoti, "AOTInductor package", zipfile.is_zipfile),
            (trt, "TensorRT engine", _trt_engine),
        )
        if p is not None
    ]
    for path, what, same in targets:
        check_output(path, what, same)
    model, extra = layout.export_model(merge, surgery, device=run_device)
    planned = {"source": extra["source"], "mode": mode.value, "fp16": fp16}
    for path, what, _ in targets:
        if not Path(path).exists() or overwrite:
            continue
        made_from = _made_from(path)
        if made_from != planned:
            why = (
                "records no source that can be checked"
                if made_from is None
                else "was exported from other checkpoints or settings"
            )
            raise ConfigError(
                f"The {what} {path} exists and {why} (this export: {merge} with {surgery}, "
                f"{mode.value}{', fp16' if fp16 else ''}). It was not replaced: pass --overwrite "
                "to replace it, or choose another path."
            )
    written: dict[str, Path] = {}
    if onnx_path is not None:
        written["onnx"] = export_onnx(model, onnx_path, mode, fp16, metadata=extra)
    if trt is not None:
        written["tensorrt"] = build_engine(
            written["onnx"],
            trt,
            fp16=fp16,
            min_batch=opts.min_batch,
            opt_batch=opts.opt_batch,
            max_batch=opts.max_batch,
            workspace_gb=opts.workspace_gb,
            timing_cache=opts.timing_cache,
        )
    if aoti is not None:
        written["pt2"] = export_aoti(model, aoti, mode, fp16, metadata=extra, device=run_device)
    if triton is not None:
        engine = written.get("tensorrt", written.get("onnx"))
        written["triton"] = write_repository(engine, triton_repo, triton)
    return written


def _onnx_engine(path: Path) -> bool:
    try:
        read_onnx_metadata(path)
    except ExportError:
        return False
    return True


def _trt_engine(path: Path) -> bool:
    try:
        read_sidecar(path)
    except ExportError:
        return False
    return True


def _made_from(path: str | os.PathLike) -> dict | None:
    """What an existing engine was exported from (its metadata's source, mode and precision)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".onnx":
            meta = read_onnx_metadata(path)
        elif zipfile.is_zipfile(path):
            meta = read_pt2_metadata(path)
        else:
            meta = read_sidecar(path)
    except ExportError:
        return None
    return {
        "source": meta.get("source"),
        "mode": meta.mode.value,
        "fp16": meta.precision.value == "fp16" or bool((meta.get("tensorrt") or {}).get("fp16")),
    }

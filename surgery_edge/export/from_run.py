"""Exporting from a run directory: pick the merge and surgery, build the model, write engines."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery_edge.engine_format import EngineMode
from surgery_edge.errors import ConfigError
from surgery_edge.surgery.methods import NONE, check_surgery


@dataclass(frozen=True)
class TrtOptions:
    """TensorRT build settings (see :func:`surgery_edge.export.tensorrt.build_engine`)."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_gb: float = 4.0
    timing_cache: Path | None = None


def _merge_recipe(path: Path) -> dict[str, Any]:
    """The merge recipe from a merged checkpoint's metadata (without reading its tensors)."""
    from safetensors import safe_open

    from surgery_edge.models.checkpoint import META_KEY

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    return dict(meta.get("recipe", {}))


def load_run_model(run, merge: str = "task_arithmetic", surgery: str = "surgeryv2"):
    """The MultiTaskModel of a run's merge (+ surgery adapters) and its engine metadata extras.

    Args:
        run: a :class:`surgery_edge.pipeline.Run`.
        merge: the merged model's name (``RUN/merged/<merge>.safetensors``).
        surgery: ``none`` (the plain merge), ``surgery`` or ``surgeryv2``.

    Returns:
        ``(model, extra)`` where ``extra`` holds the merge name and recipe for the metadata.
    """
    from surgery_edge.pipeline import build_model

    check_surgery(surgery, allow_none=True)
    if run.experts is None:
        run.require_experts()
    merges = run.find_merges()
    if merge not in merges:
        raise ConfigError(
            f"No merged model {merge!r} in {run.out / 'merged'}; found {sorted(merges)}. Create "
            f"it with `surgery-edge merge --run {run.out} --method {merge}`."
        )
    adapters = None
    if surgery != NONE:
        adapters = run.find_adapters().get((merge, surgery))
        if adapters is None:
            raise ConfigError(
                f"No {surgery} adapters for {merge!r} in {run.out / 'adapters' / merge}. Train "
                f"them with `surgery-edge train --run {run.out} --merge {merge} "
                f"--method {surgery}`."
            )
    model = build_model(run, merges[merge], adapters)
    extra = {"merge": merge, "merge_recipe": _merge_recipe(merges[merge])}
    return model, extra


def default_onnx_path(run_out: Path, merge: str, surgery: str, mode: str, fp16: bool) -> Path:
    return run_out / "engines" / f"{merge}-{surgery}-{mode}{'-fp16' if fp16 else ''}.onnx"


def export_run(
    run_dir: str | os.PathLike,
    merge: str = "task_arithmetic",
    surgery: str = "surgeryv2",
    mode: str = "routed",
    onnx: str | os.PathLike | None = None,
    fp16: bool = False,
    aoti: str | os.PathLike | None = None,
    trt: str | os.PathLike | None = None,
    trt_options: TrtOptions | None = None,
    device: str | None = None,
    log=print,
) -> dict[str, Path]:
    """Export one multi-task engine of a run to ONNX, AOTInductor and/or TensorRT.

    TensorRT builds from the ONNX this call exports (``onnx``, or ``<trt>.onnx`` beside the
    engine). TensorRT settings and its availability are checked before any export work. With no
    target given, writes ``RUN/engines/<merge>-<surgery>-<mode>[-fp16].onnx``.

    Returns:
        ``{"onnx" | "pt2" | "tensorrt": path}`` of what was written.
    """
    from surgery_edge.export.aoti import export_aoti
    from surgery_edge.export.onnx import export_onnx
    from surgery_edge.export.tensorrt import (
        build_engine,
        check_workspace,
        import_tensorrt,
        profile_shapes,
    )
    from surgery_edge.pipeline import Run

    mode = EngineMode.parse(mode)
    run = Run.open(run_dir, log=log, device=device)
    opts = trt_options or TrtOptions()
    if trt is not None:  # fail fast: before minutes of export work
        profile_shapes(run.arch.image_size, mode, opts.min_batch, opts.opt_batch, opts.max_batch)
        check_workspace(opts.workspace_gb)
        import_tensorrt()
    if onnx is None and aoti is None and trt is None:
        onnx = default_onnx_path(run.out, merge, surgery, mode, fp16)
    model, extra = load_run_model(run, merge, surgery)
    written: dict[str, Path] = {}
    if onnx is not None or trt is not None:
        onnx_path = Path(onnx) if onnx is not None else Path(trt).with_suffix(".onnx")
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
        written["pt2"] = export_aoti(model, aoti, mode, fp16, metadata=extra, device=run.device)
    return written

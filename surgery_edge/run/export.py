"""Exporting from a run directory: pick the merge and surgery, build the model, write engines.

The model comes from the run's checkpoints (:class:`~surgery_edge.run.layout.RunLayout`). fp32
engines need nothing else (no dataset is read); int8 and fp8 engines are calibrated on the run's
unlabelled adaptation images (:func:`~surgery_edge.run.calibration.calibration_set`), and they
and fp16 engines are checked against the fp32 engine on held-out ones before they are written,
so they read the run's data too.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from surgery_edge.device import resolve_device
from surgery_edge.engine_format import EngineMode, Precision, effective_precision, read_metadata
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.export.aoti import export_aoti
from surgery_edge.export.modules import WeightFiles, check_magnitudes
from surgery_edge.export.onnx import export_onnx
from surgery_edge.export.quantize import (
    Quantizer,
    QuantRecipe,
    Target,
    default_recipe,
    export_half,
    quantize_model,
)
from surgery_edge.export.tensorrt import (
    build_engine,
    check_precision_support,
    check_workspace,
    profile_shapes,
)
from surgery_edge.export.triton import TritonOptions, check_model_folder, write_repository
from surgery_edge.io import check_output
from surgery_edge.run.calibration import (
    DEFAULT_CALIBRATION_IMAGES,
    calibration_set,
    check_calibration_images,
)
from surgery_edge.run.layout import RunLayout
from surgery_edge.run.state import Run, prepare_suite, unlabelled_split
from surgery_edge.runtime.backends import import_tensorrt
from surgery_edge.surgery.methods import SURGERY_V2
from surgery_edge.surgery.model import MultiTaskModel


@dataclass(frozen=True)
class TrtOptions:
    """TensorRT build settings (see :func:`surgery_edge.export.tensorrt.build_engine`)."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_gb: float = 4.0
    timing_cache: Path | None = None


def engine_stem(merge: str, surgery: str, mode: str, expert: str | None = None) -> str:
    """``<merge>-<surgery>-<mode>``, or ``expert-<task>`` for a single expert."""
    return f"expert-{expert}" if expert is not None else f"{merge}-{surgery}-{mode}"


def default_onnx_path(run_dir: Path, stem: str, precision: Precision) -> Path:
    """``RUN/engines/<stem>[-<precision>].onnx`` (no suffix for fp32)."""
    suffix = "" if precision is Precision.FP32 else f"-{precision}"
    return Path(run_dir) / "engines" / f"{stem}{suffix}.onnx"


def quant_recipe(precision: Precision, quantizer: str = "auto", trt: bool = False) -> QuantRecipe:
    """The recipe for ``precision``: the measured default for the target (TensorRT when
    ``trt``, else ONNX Runtime), or the default of the quantiser named by ``quantizer``."""
    target = Target.TENSORRT if trt else Target.ONNXRUNTIME
    if quantizer == "auto":
        return default_recipe(precision, target)
    chosen = Quantizer.parse(quantizer, "quantizer")
    if trt and chosen is not Quantizer.MODELOPT:
        raise ConfigError(
            f"TensorRT builds {precision} engines from ModelOpt's QDQ graph; {chosen} writes "
            "ONNX Runtime's own integer operators. Use --quantizer modelopt (or auto) with --trt."
        )
    recipe = default_recipe(precision, target)
    if recipe.quantizer is chosen:
        return recipe
    if chosen is Quantizer.MODELOPT:
        return QuantRecipe(precision, chosen, high_precision="fp16" if trt else "fp32")
    method = "none" if chosen is Quantizer.ORT_DYNAMIC else "minmax"
    return QuantRecipe(precision, chosen, calibration_method=method)


@dataclass(frozen=True)
class EngineChoice:
    """Which model an engine holds and how it runs."""

    merge: str = "task_arithmetic"  # the merged backbone
    surgery: str = SURGERY_V2  # its adapters ("none": the merge alone)
    mode: EngineMode = EngineMode.ROUTED  # routed or all-tasks
    # fp32, fp16, int8 or fp8: int8 and fp8 quantise the fp32 engine
    # (surgery_edge.export.quantize), for ONNX Runtime, or for TensorRT when a plan is built
    # (the ONNX is then TensorRT's QDQ input); AOTInductor takes fp32 and fp16 only
    precision: Precision = Precision.FP32
    # this task's expert alone (one task, its own head) instead of a merge: the baseline every
    # multi-task engine is compared with
    expert: str | None = None


@dataclass(frozen=True)
class EngineFiles:
    """What an export writes; with none of the engine files given,
    ``RUN/engines/<merge>-<surgery>-<mode>[-<precision>].onnx``."""

    onnx: str | os.PathLike | None = None
    aoti: str | os.PathLike | None = None  # an AOTInductor package (.pt2)
    trt: str | os.PathLike | None = None  # a TensorRT engine, built from the exported ONNX
    # also a Triton Inference Server model repository holding the TensorRT plan when one is
    # built, else the ONNX engine (an ONNX engine is then written)
    triton_repo: str | os.PathLike | None = None


@dataclass(frozen=True)
class ExportSettings:
    """How the engine files are made."""

    trt: TrtOptions = TrtOptions()
    triton: TritonOptions | None = None  # None: TritonOptions' defaults
    # adaptation images per task to calibrate on (as many again are held out to check the
    # quantised engine against the fp32 one)
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    quantizer: str = "auto"  # the measured choice for the target, or a quantiser's name


def export_run(
    run_dir: str | os.PathLike,
    choice: EngineChoice = EngineChoice(),
    files: EngineFiles = EngineFiles(),
    settings: ExportSettings = ExportSettings(),
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Export one engine of a run to ONNX, AOTInductor and/or TensorRT, and optionally a Triton
    Inference Server model repository holding it.

    Args:
        run_dir: the run directory.
        choice, files, settings: what to export, into which files, and how.
        device: where the model is built and ``.pt2`` packages compiled.
        overwrite: replace an existing engine made from other checkpoints or settings (a file
            that is not an engine is never replaced). A model folder of the Triton repository
            that ``triton-repo`` wrote gets the engine as its next version (``MODEL/2``, ...);
            any other is refused.

    TensorRT and Triton settings, TensorRT's availability, the precision's support, the
    calibration data and every output path are all checked before any export work.

    Returns:
        ``{"onnx" | "pt2" | "tensorrt" | "triton": path}`` of what was written (``triton``:
        the model's folder in the repository).
    """
    layout = RunLayout.open(run_dir)
    run_device = resolve_device(device or layout.read_config().device)
    plan = _plan(layout, choice, files, settings)
    model, extra = _model_to_export(layout, choice, plan, run_device)
    _refuse_other_engines(plan, choice, extra, overwrite)
    calibration = None
    # int8 and fp8 calibrate on adaptation images; they and fp16 are checked against fp32 on
    # held-out ones before they are written (surgery_edge.export.quantize.gate)
    if plan.recipe is not None or (plan.precision is Precision.FP16 and plan.onnx is not None):
        calibration = _calibration(layout, model, settings.calibration_images)
    return _write(model, extra, plan, settings.trt, calibration, run_device)


@dataclass(frozen=True)
class _Plan:
    """An export, checked: its mode and precision, quantisation recipe, Triton settings and
    the files it writes (``targets``: each with what it is and a test that a file is one)."""

    mode: EngineMode
    precision: Precision
    recipe: QuantRecipe | None
    triton: TritonOptions | None
    onnx: Path | None
    files: EngineFiles
    targets: tuple


def _plan(
    layout: RunLayout,
    choice: EngineChoice,
    files: EngineFiles,
    settings: ExportSettings,
) -> _Plan:
    """Everything that can be checked before any export work."""
    mode, precision = choice.mode, choice.precision  # typed by the caller (the CLI)
    aoti, trt, opts = files.aoti, files.trt, settings.trt
    if aoti is not None and precision.quantized:
        raise ExportError(
            f"AOTInductor packages are fp32 or fp16; a {precision} engine is an ONNX engine "
            f"(ONNX Runtime) or a TensorRT engine. Drop --aoti, or use --precision fp16."
        )
    recipe = None
    if precision.quantized:
        check_calibration_images(settings.calibration_images)
        recipe = quant_recipe(precision, settings.quantizer, trt is not None)
    if trt is not None:  # fail fast: before minutes of export work
        arch = layout.arch()
        profile_shapes(arch.image_size, mode, opts.min_batch, opts.opt_batch, opts.max_batch)
        check_workspace(opts.workspace_gb)
        check_precision_support(import_tensorrt(), precision)
    triton_repo = files.triton_repo
    triton = (settings.triton or TritonOptions()).check() if triton_repo is not None else None
    onnx = files.onnx
    if onnx is None and trt is None and (aoti is None or triton is not None):
        stem = engine_stem(choice.merge, choice.surgery, mode.value, choice.expert)
        onnx = default_onnx_path(layout.root, stem, precision)
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
    if triton is not None:
        model_stem = Path(trt if trt is not None else onnx_path).stem
        check_model_folder(triton_repo, triton.name or model_stem)
    return _Plan(mode, precision, recipe, triton, onnx_path, files, tuple(targets))


def _model_to_export(
    layout: RunLayout, choice: EngineChoice, plan: _Plan, run_device
) -> tuple[MultiTaskModel, dict]:
    """The model and its engine metadata; refused if its weights would overflow the engine's
    precision (:func:`~surgery_edge.export.modules.check_magnitudes`)."""
    merge, surgery, expert = choice.merge, choice.surgery, choice.expert
    if expert is not None:
        model, extra = expert_model(layout, expert, run_device)
        files = WeightFiles(str(layout.expert(expert)), None, [str(layout.head(expert))])
    else:
        model, extra = layout.export_model(merge, surgery, device=run_device)
        adapters = None if surgery == "none" else str(layout.adapters(merge, surgery))
        heads = [str(layout.head(t)) for t in model.tasks]
        files = WeightFiles(str(layout.merges()[merge]), adapters, heads)
    # fp16 engines, and TensorRT's quantised ones (their other layers run in fp16)
    recipe = plan.recipe
    half = plan.precision is Precision.FP16 or (
        recipe is not None and recipe.high_precision == "fp16"
    )
    check_magnitudes(model, half, files)
    return model, extra


def _refuse_other_engines(plan: _Plan, choice: EngineChoice, extra: dict, overwrite: bool) -> None:
    """Refuse (ConfigError) to replace an engine exported from other checkpoints or settings,
    unless ``overwrite``."""
    mode, precision, expert = plan.mode, plan.precision, choice.expert
    planned = _planned(extra, mode, precision)
    for path, what, _ in plan.targets:
        if not Path(path).exists() or overwrite:
            continue
        made_from = _made_from(path)
        if made_from != planned:
            why = (
                "records no source that can be checked"
                if made_from is None
                else "was exported from other checkpoints or settings"
            )
            merged = f"{choice.merge} with {choice.surgery}"
            this = f"the {expert} expert" if expert is not None else merged
            raise ConfigError(
                f"The {what} {path} exists and {why} (this export: {this}, {mode.value}, "
                f"{precision}). It was not replaced: pass --overwrite to replace it, or choose "
                "another path."
            )


def _calibration(layout: RunLayout, model: MultiTaskModel, images: int):
    """The run's unlabelled images to calibrate on and check against (read from its data)."""
    run = Run.open(layout.root, log=lambda *a: None, device="cpu")
    prepare_suite(run)
    # the images surgery learned from (the test split in a transductive run); a task
    # without adaptation images is calibration_set's error, which says to export in fp32
    # (adaptation_split's would say how to train surgery)
    return calibration_set(
        run.suite,
        unlabelled_split(run.config),
        model.tasks,
        model.encoder.arch.preprocessing,
        images,
        run.config.seed,
    )


def _write(
    model: MultiTaskModel,
    extra: dict,
    plan: _Plan,
    opts: TrtOptions,
    calibration,
    run_device,
) -> dict[str, Path]:
    """Export the planned files, in order: ONNX, TensorRT (from the ONNX), AOTInductor, and
    the Triton repository."""
    mode, precision, recipe = plan.mode, plan.precision, plan.recipe
    onnx_path, aoti, trt = plan.onnx, plan.files.aoti, plan.files.trt
    written: dict[str, Path] = {}
    if onnx_path is not None:
        if precision is Precision.FP16:
            written["onnx"], _ = export_half(model, onnx_path, mode, calibration, extra)
        elif recipe is None:
            written["onnx"] = export_onnx(model, onnx_path, mode, metadata=extra)
        else:
            target = Target.TENSORRT if trt is not None else Target.ONNXRUNTIME
            written["onnx"] = quantize_model(
                model, onnx_path, mode, recipe, calibration, extra, target
            )
    if trt is not None:
        written["tensorrt"] = build_engine(
            written["onnx"],
            trt,
            precision,
            min_batch=opts.min_batch,
            opt_batch=opts.opt_batch,
            max_batch=opts.max_batch,
            workspace_gb=opts.workspace_gb,
            timing_cache=opts.timing_cache,
        )
    if aoti is not None:
        written["pt2"] = export_aoti(
            model, aoti, mode, precision, metadata=extra, device=run_device
        )
    if plan.triton is not None:
        engine = written.get("tensorrt", written.get("onnx"))
        # the next version of a model folder triton-repo wrote
        written["triton"] = write_repository(engine, plan.files.triton_repo, plan.triton)
    return written


def _onnx_engine(path: Path) -> bool:
    try:
        read_metadata(path, "onnx")
    except ExportError:
        return False
    return True


def _trt_engine(path: Path) -> bool:
    try:
        read_metadata(path, "tensorrt")
    except ExportError:
        return False
    return True


def _planned(extra: dict, mode: EngineMode, precision: Precision) -> dict:
    return {
        "source": extra.get("source"),
        "expert": extra.get("expert"),
        "mode": mode.value,
        "precision": precision.value,
    }


def _made_from(path: str | os.PathLike) -> dict | None:
    """What an existing engine was exported from: its metadata's source (or expert), mode and
    precision (a TensorRT engine built in fp16 from an fp32 ONNX counts as fp16)."""
    try:
        meta = read_metadata(path)
    except ExportError:
        return None
    return {
        "source": meta.get("source"),
        "expert": meta.get("expert"),
        "mode": meta.mode.value,
        "precision": effective_precision(meta).value,
    }


def expert_model(layout: RunLayout, task: str, device="cpu") -> tuple[MultiTaskModel, dict]:
    """One task's expert with its own head, and the metadata that names it."""
    tasks = layout.tasks()
    if task not in tasks:
        raise ConfigError(f"Unknown task {task!r}; the run's tasks are {', '.join(tasks)}.")
    path = layout.expert(task)  # hashed from its bytes: an engine is published from it
    model = layout.model(path, None, [task], device=device, fresh=True)
    return model, {"expert": task, "source": {"expert": layout.hashes.digest(path, fresh=True)}}

"""The engine's commands: export one from a run, and predict with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from surgery_edge.cli.common import (
    Device,
    ModeName,
    PrecisionName,
    QuantizerName,
    RunDir,
    SurgeryOrNone,
    user_errors,
)

from surgery_edge.errors import ExportError


@user_errors
def export(
    run_dir: RunDir,
    merge_name: Annotated[str, typer.Option("--merge", help="Merged model to export.")] = (
        "task_arithmetic"
    ),
    surgery: Annotated[
        SurgeryOrNone, typer.Option(help="Surgery method (none: the merge alone).")
    ] = SurgeryOrNone.surgeryv2,
    mode: Annotated[
        ModeName,
        typer.Option(help="routed: images + one task id each; all-tasks: every task per image."),
    ] = ModeName.routed,
    onnx: Annotated[
        Path | None,
        typer.Option(
            help="ONNX file (default: RUN/engines/<merge>-<surgery>-<mode>[-<precision>].onnx)."
        ),
    ] = None,
    precision: Annotated[
        PrecisionName,
        typer.Option(
            help="fp32 | fp16 (half weights) | int8 | fp8 (quantised, calibrated on the run's "
            "adaptation images); inputs and outputs stay float32."
        ),
    ] = PrecisionName.fp32,
    calibration_images: Annotated[
        int, typer.Option(help="int8/fp8: adaptation images per task to calibrate on.")
    ] = 32,
    quantizer: Annotated[
        QuantizerName,
        typer.Option(
            help="int8/fp8: auto picks the measured best for the target: ort-dynamic for ONNX "
            "Runtime int8, modelopt (QDQ) for fp8 and for TensorRT."
        ),
    ] = QuantizerName.auto,
    expert: Annotated[
        str | None,
        typer.Option(help="Export this task's expert alone (the single-model baseline)."),
    ] = None,
    aoti: Annotated[Path | None, typer.Option(help="AOTInductor package (.pt2).")] = None,
    trt: Annotated[
        Path | None, typer.Option(help="TensorRT engine, built from the exported ONNX.")
    ] = None,
    min_batch: Annotated[int, typer.Option(help="TensorRT profile: smallest batch.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: tuned batch.")] = 8,
    max_batch: Annotated[int, typer.Option(help="TensorRT profile: largest batch.")] = 32,
    workspace_gb: Annotated[float, typer.Option(help="TensorRT workspace pool (GiB).")] = 4.0,
    timing_cache: Annotated[
        Path | None, typer.Option(help="TensorRT timing cache file (read and updated).")
    ] = None,
    device: Device = None,
    evaluate: Annotated[
        bool,
        typer.Option(
            help="Measure each written engine through the runtime on the run's test split "
            "(accuracy, change against PyTorch, size, latency; see eval-engine)."
        ),
    ] = True,
):
    """Export one multi-task engine (ONNX, AOTInductor .pt2, TensorRT) from a run, in fp32,
    fp16, int8 or fp8; or, with --expert, one task's expert alone."""
    from surgery_edge.run.export import TrtOptions, export_run  # deferred: imports torch

    written = export_run(
        run_dir,
        merge_name,
        SurgeryOrNone(surgery).value,
        ModeName(mode).value,
        onnx=onnx,
        precision=PrecisionName(precision).value,
        aoti=aoti,
        trt=trt,
        trt_options=TrtOptions(min_batch, opt_batch, max_batch, workspace_gb, timing_cache),
        device=device,
        expert=expert,
        calibration_images=calibration_images,
        quantizer=QuantizerName(quantizer).value,
    )
    for kind, path in written.items():
        typer.echo(f"{kind}: {path}")
    if evaluate:
        from surgery_edge.run.engine_eval import evaluate_engine, summary_line  # deferred: torch

        for path in written.values():
            typer.echo(summary_line(evaluate_engine(path, run_dir, device=device or "auto")))


@user_errors
def predict(
    engine: Annotated[Path, typer.Argument(help="Engine: .onnx, .pt2 or TensorRT .engine.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    task: Annotated[str | None, typer.Option(help="Task name or id to answer.")] = None,
    all_tasks: Annotated[bool, typer.Option("--all-tasks", help="Answer every task.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
):
    """Classify images with an exported engine; unreadable images are reported (exit code 2)."""
    from surgery_edge.runtime import load  # deferred: onnxruntime loads on use

    results = load(engine, device=device).predict(images, task=task, all_tasks=all_tasks)
    if json_out:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            for p in r.predictions:
                typer.echo(f"{r.source}\t{p.task}\t{p.label}\t(class {p.index}, p={p.score:.3f})")
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise ExportError(
            f"Could not answer {len(failed)} of {len(results)} images: {' '.join(failed)}"
        )

"""The engine's commands: export one from a run, and predict with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from surgery_edge.cli.common import Device, ModeName, RunDir, SurgeryOrNone, user_errors

from surgery_edge.errors import ConfigError, ExportError


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
        typer.Option(help="ONNX file (default: RUN/engines/<merge>-<surgery>-<mode>.onnx)."),
    ] = None,
    fp16: Annotated[bool, typer.Option(help="Half weights and compute; float32 I/O.")] = False,
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
    triton_repo: Annotated[
        Path | None,
        typer.Option(
            help="Also write a Triton Inference Server model repository holding the engine "
            "(the TensorRT plan if built, else the ONNX); its max_batch_size is --max-batch, "
            "its preferred batch --opt-batch."
        ),
    ] = None,
    triton_kind: Annotated[str, typer.Option(help="Triton instances: gpu | cpu.")] = "gpu",
    triton_instances: Annotated[int, typer.Option(help="Triton instances per device.")] = 1,
    max_queue_delay_us: Annotated[
        int, typer.Option(help="Triton's dynamic batching delay (microseconds).")
    ] = 0,
):
    """Export one multi-task engine (ONNX, AOTInductor .pt2, TensorRT) from a run."""
    from surgery_edge.export.triton import TritonOptions  # deferred: with the exporters
    from surgery_edge.run.export import TrtOptions, export_run  # deferred: imports torch

    if triton_repo is not None and opt_batch > max_batch:
        raise ConfigError(
            f"--opt-batch {opt_batch} (Triton's preferred batch) is above --max-batch {max_batch}."
        )
    written = export_run(
        run_dir,
        merge_name,
        SurgeryOrNone(surgery).value,
        ModeName(mode).value,
        onnx=onnx,
        fp16=fp16,
        aoti=aoti,
        trt=trt,
        trt_options=TrtOptions(min_batch, opt_batch, max_batch, workspace_gb, timing_cache),
        device=device,
        triton_repo=triton_repo,
        triton_options=TritonOptions(
            max_batch=max_batch,
            preferred_batches=(opt_batch,),
            max_queue_delay_us=max_queue_delay_us,
            instances=triton_instances,
            kind=triton_kind,
            accelerator_fp16=fp16,
        ),
    )
    for kind, path in written.items():
        typer.echo(f"{kind}: {path}")


@user_errors
def predict(
    engine: Annotated[Path, typer.Argument(help="Engine: .onnx, .pt2 or TensorRT .engine.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    task: Annotated[str | None, typer.Option(help="Task name or id to answer.")] = None,
    all_tasks: Annotated[bool, typer.Option("--all-tasks", help="Answer every task.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    max_pixels: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Most pixels an image may declare; larger ones are refused unread "
            "(default: PIL's decompression-bomb threshold, 89,478,485).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Images decoded and answered at a time (default: 64)."),
    ] = None,
):
    """Classify images with an exported engine; unreadable images are reported (exit code 2).

    Images are read and answered a batch at a time, so any number of files fits in memory."""
    from surgery_edge.runtime import load  # deferred: onnxruntime loads on use

    limits = {"max_pixels": max_pixels} if max_pixels is not None else {}
    predictor = load(engine, device=device, batch_size=batch_size, **limits)
    answered, failed = [], []
    for r in predictor.iter_predict(images, task=task, all_tasks=all_tasks):
        if not r.ok:
            failed.append(r.error)
        if json_out:
            answered.append(r.to_dict())
            continue
        for p in r.predictions:
            typer.echo(f"{r.source}\t{p.task}\t{p.label}\t(class {p.index}, p={p.score:.3f})")
    if json_out:
        typer.echo(json.dumps(answered, indent=2))
    if failed:
        total = len(images)
        raise ExportError(f"Could not answer {len(failed)} of {total} images: {' '.join(failed)}")

"""The engine's commands: export one from a run, and predict with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from surgery_edge.cli.common import (
    Device,
    ModeName,
    Overwrite,
    RunDir,
    SurgeryOrNone,
    say,
    user_errors,
)

from surgery_edge.errors import ExportError
from surgery_edge.io import printable


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
    overwrite: Overwrite = False,
):
    """Export one multi-task engine (ONNX, AOTInductor .pt2, TensorRT) from a run.

    An existing engine made from other checkpoints or settings is replaced only with
    --overwrite; a file that is not an engine is never replaced.
    """
    from surgery_edge.run.export import TrtOptions, export_run  # deferred: imports torch

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
        overwrite=overwrite,
    )
    for kind, path in written.items():
        say(f"{kind}: {path}")


@user_errors
def predict(
    engine: Annotated[Path, typer.Argument(help="Engine: .onnx, .pt2 or TensorRT .engine.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    task: Annotated[str | None, typer.Option(help="Task name or id to answer.")] = None,
    all_tasks: Annotated[bool, typer.Option("--all-tasks", help="Answer every task.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Device = None,
):
    """Classify images with an exported engine; unreadable images are reported (exit code 2).

    Names from the engine (tasks, classes) are printed with control characters escaped.
    """
    from surgery_edge.runtime import load  # deferred: onnxruntime loads on use

    predictor = load(engine, device=device or "auto")
    results = predictor.predict(images, task=task, all_tasks=all_tasks)
    if json_out:  # JSON escapes control characters itself
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            for p in r.predictions:
                fields = [r.source, p.task, p.label, f"(class {p.index}, p={p.score:.3f})"]
                typer.echo("\t".join(printable(f, keep_newlines=False) for f in fields))
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise ExportError(
            f"Could not answer {len(failed)} of {len(results)} images: {' '.join(failed)}"
        )

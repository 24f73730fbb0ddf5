"""The engine's commands: export one from a run, and predict with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from surgery_edge.cli.common import (
    Device,
    Json,
    ModeName,
    Overwrite,
    PrecisionName,
    QuantizerName,
    RunDir,
    SurgeryOrNone,
    err,
    renamed,
    say,
    user_errors,
)

from surgery_edge.engine_format import EngineMode, Precision
from surgery_edge.errors import ConfigError
from surgery_edge.io import printable, require_file

ENGINE_FILES = ("onnx", "pt2", "tensorrt")  # what export writes that the runtime can measure


# export's options, declared once here so that the command's signature stays readable
MergeOption = Annotated[str, typer.Option("--merge", help="Merged model to export.")]
SurgeryOption = Annotated[
    SurgeryOrNone, typer.Option(help="Surgery method (none: the merge alone).")
]
ModeOption = Annotated[
    ModeName,
    typer.Option(help="routed: images + one task id each; all-tasks: every task per image."),
]
OnnxOption = Annotated[
    Path | None,
    typer.Option(
        help="ONNX file (default: RUN/engines/<merge>-<surgery>-<mode>[-<precision>].onnx)."
    ),
]
PrecisionOption = Annotated[
    PrecisionName,
    typer.Option(
        help="fp32 | fp16 (half weights) | int8 | fp8 (quantised, calibrated on the run's "
        "adaptation images); inputs and outputs stay float32."
    ),
]
Fp16Option = Annotated[bool, typer.Option("--fp16", hidden=True)]  # before --precision
CalibrationOption = Annotated[
    int, typer.Option(help="int8/fp8: adaptation images per task to calibrate on.")
]
QuantizerOption = Annotated[
    QuantizerName,
    typer.Option(
        help="int8/fp8: auto picks the measured best for the target: ort-dynamic for ONNX "
        "Runtime int8, modelopt (QDQ) for fp8 and for TensorRT."
    ),
]
ExpertOption = Annotated[
    str | None,
    typer.Option(help="Export this task's expert alone (the single-model baseline)."),
]
AotiOption = Annotated[Path | None, typer.Option(help="AOTInductor package (.pt2).")]
TrtOption = Annotated[
    Path | None, typer.Option(help="TensorRT engine, built from the exported ONNX.")
]
MinBatch = Annotated[int, typer.Option(help="TensorRT profile: smallest batch.")]
OptBatch = Annotated[int, typer.Option(help="TensorRT profile: tuned batch.")]
MaxBatch = Annotated[int, typer.Option(help="TensorRT profile: largest batch.")]
WorkspaceGb = Annotated[float, typer.Option(help="TensorRT workspace pool (GiB).")]
TimingCache = Annotated[
    Path | None, typer.Option(help="TensorRT timing cache file (read and updated).")
]
TritonRepo = Annotated[
    Path | None,
    typer.Option(
        help="Also write a Triton Inference Server model repository holding the engine "
        "(the TensorRT plan if built, else the ONNX); its max_batch_size is --max-batch, "
        "its preferred batch --opt-batch."
    ),
]
TritonKind = Annotated[str, typer.Option(help="Triton instances: gpu | cpu.")]
TritonInstances = Annotated[int, typer.Option(help="Triton instances per device.")]
QueueDelay = Annotated[int, typer.Option(help="Triton's dynamic batching delay (microseconds).")]
EvaluateOption = Annotated[
    bool,
    typer.Option(
        help="Measure each written engine through the runtime on the run's test split "
        "(accuracy, change against PyTorch, size, latency; see eval-engine)."
    ),
]


@user_errors
def export(
    run_dir: RunDir,
    merge_name: MergeOption = "task_arithmetic",
    surgery: SurgeryOption = SurgeryOrNone.surgeryv2,
    mode: ModeOption = ModeName.routed,
    onnx: OnnxOption = None,
    precision: PrecisionOption = PrecisionName.fp32,
    fp16: Fp16Option = False,
    calibration_images: CalibrationOption = 32,
    quantizer: QuantizerOption = QuantizerName.auto,
    expert: ExpertOption = None,
    aoti: AotiOption = None,
    trt: TrtOption = None,
    min_batch: MinBatch = 1,
    opt_batch: OptBatch = 8,
    max_batch: MaxBatch = 32,
    workspace_gb: WorkspaceGb = 4.0,
    timing_cache: TimingCache = None,
    device: Device = None,
    triton_repo: TritonRepo = None,
    triton_kind: TritonKind = "gpu",
    triton_instances: TritonInstances = 1,
    max_queue_delay_us: QueueDelay = 0,
    evaluate: EvaluateOption = True,
    overwrite: Overwrite = False,
    json_out: Json = False,
):
    """Export one multi-task engine (ONNX, AOTInductor .pt2, TensorRT) from a run.

    In fp32, fp16, int8 or fp8; or, with --expert, one task's expert alone. Each engine written
    is then evaluated through the runtime (--no-evaluate skips it). An existing engine made
    from other checkpoints or settings is replaced only with --overwrite; a file that is not an
    engine is never replaced.
    """
    from surgery_edge.export.triton import TritonOptions  # deferred: with the exporters
    from surgery_edge.run import export as run_export  # deferred: imports torch

    # parsed once, here at the edge: the library takes them typed
    precision = Precision.parse(
        PrecisionName(
            renamed("--fp16", "--precision fp16", PrecisionName.fp16 if fp16 else None, precision)
        ).value
    )
    if triton_repo is not None and opt_batch > max_batch:
        raise ConfigError(
            f"--opt-batch {opt_batch} (Triton's preferred batch) is above --max-batch {max_batch}."
        )
    choice = run_export.EngineChoice(
        merge_name,
        SurgeryOrNone(surgery).value,
        EngineMode.parse(ModeName(mode).value),
        precision,
        expert,
    )
    settings = run_export.ExportSettings(
        run_export.TrtOptions(min_batch, opt_batch, max_batch, workspace_gb, timing_cache),
        TritonOptions(
            max_batch=max_batch,
            preferred_batches=(opt_batch,),
            max_queue_delay_us=max_queue_delay_us,
            instances=triton_instances,
            kind=triton_kind,
            accelerator_fp16=precision is Precision.FP16,
        ),
        calibration_images,
        QuantizerName(quantizer).value,
    )
    files = run_export.EngineFiles(onnx, aoti, trt, triton_repo)
    written = run_export.export_run(run_dir, choice, files, settings, device, overwrite)
    if not json_out:
        for kind, path in written.items():
            say(f"{kind}: {path}")
    reports = _evaluate_written(written, run_dir, device, json_out) if evaluate else []
    if json_out:
        written_json = {k: str(v) for k, v in written.items()}
        typer.echo(json.dumps({"written": written_json, "evaluation": reports}, indent=2))


def _evaluate_written(
    written: dict[str, Path], run_dir: Path, device: str | None, quiet: bool
) -> list[dict]:
    """Each engine ``export`` wrote, measured through the runtime (a line each unless quiet)."""
    from surgery_edge.run.engine_eval import evaluate_engine, summary_line  # deferred: torch

    reports = []
    for kind, path in written.items():
        if kind in ENGINE_FILES:
            reports.append(evaluate_engine(path, run_dir, device=device or "auto"))
            if not quiet:
                say(summary_line(reports[-1]))
    return reports


@user_errors
def predict(
    engine: Annotated[Path, typer.Argument(help="Engine: .onnx, .pt2 or TensorRT .engine.")],
    images: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (searched recursively for images) or quoted globs "
            "('photos/**/*.jpg')."
        ),
    ],
    task: Annotated[str | None, typer.Option(help="Task name or id to answer.")] = None,
    all_tasks: Annotated[bool, typer.Option("--all-tasks", help="Answer every task.")] = False,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print JSON Lines on stdout: one object per image as it is answered, with "
            "the Python API's fields (source, then predictions or error).",
        ),
    ] = False,
    device: Device = None,
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
    """Classify images with an exported engine, a batch at a time, printing as it goes.

    One line per image and task: file, task, class name, (class index, probability); with
    --json one JSON object per image (JSON Lines). An unreadable image is reported and the
    others are still answered; the exit code is then 1.
    Any number of files fits in memory. Names from the engine are printed with control
    characters escaped.
    """
    from surgery_edge.runtime import load  # deferred: onnxruntime loads on use
    from surgery_edge.runtime.inputs import expand_images  # deferred with the runtime

    require_file(engine, "engine")  # a FIFO or device is named as such, never opened
    skipped: list[str] = []  # what folders and globs hold that could not be read
    files = list(expand_images(images, skipped))  # every argument checked before any work
    limits = {"max_pixels": max_pixels} if max_pixels is not None else {}
    predictor = load(engine, device=device or "auto", batch_size=batch_size, **limits)
    failed = []
    for r in predictor.iter_predict(files, task=task, all_tasks=all_tasks):
        if not r.ok:
            failed.append(r.error)
        if json_out:  # one line per image, flushed: a pipe reads each answer as it comes
            typer.echo(json.dumps(r.to_dict()))  # JSON escapes control characters itself
            continue
        for p in r.predictions:
            fields = [r.source, p.task, p.label, f"(class {p.index}, p={p.score:.3f})"]
            typer.echo("\t".join(printable(f, keep_newlines=False) for f in fields))
    report = []  # a partial result: what could not be answered or read, named
    if failed:
        report.append(f"Could not answer {len(failed)} of {len(files)} images: {' '.join(failed)}")
    if skipped:
        report.append(f"Skipped {len(skipped)} input(s) that could not be read: "
                      + "; ".join(skipped) + ".")  # fmt: skip
    if report:
        err(" ".join(report))
        raise typer.Exit(1)

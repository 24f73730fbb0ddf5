"""``surgery-edge eval-engine``: an exported engine's accuracy on a run's test split, through
the runtime, against the PyTorch model it came from."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer
from surgery_edge.cli.common import RunDir, user_errors

Split = enum.Enum("Split", {"test": "test", "train": "train"}, type=str)  # the labelled splits


@user_errors
def eval_engine(
    engine: Annotated[Path, typer.Argument(help="Engine: .onnx, .pt2 or TensorRT .engine.")],
    run_dir: RunDir,
    split: Annotated[Split, typer.Option(help="The labelled split to measure on.")] = Split.test,
    device: Annotated[str, typer.Option(help="Where the engine runs: auto | cpu | cuda.")] = "cpu",
    threads: Annotated[
        int | None, typer.Option(help="ONNX Runtime CPU threads for latency (default: its own).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the result as JSON here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Measure an engine through the runtime: per-task accuracy from the stored images, the
    change against the PyTorch model's row, file size, ONNX Runtime CPU latency at batch 1 and 8."""
    from surgery_edge.io import (  # deferred: keep --help light
        check_output,
        require_file,
        write_json_atomic,
    )
    from surgery_edge.run.engine_eval import evaluate_engine  # deferred: imports torch

    split = Split(split).value
    require_file(engine, "engine")  # a FIFO or device is named as such, never opened
    if out is not None:  # before the evaluation, not after it
        check_output(out, "evaluation JSON", lambda p: p.suffix.lower() == ".json")
    report = evaluate_engine(engine, run_dir, split, device, threads)
    if out is not None:
        write_json_atomic(out, report)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    ref, delta = report.get("pytorch"), report.get("delta")
    typer.echo(
        f"{report['engine']}: {report['precision']} {report['mode']} {report['kind']} engine, "
        f"{report['bytes']:,} bytes; {report['images']} {split} images"
    )
    typer.echo(f"{'task':24s} {'engine':>8s} {'pytorch':>8s} {'change':>8s}")
    for task, acc in report["per_task"].items():
        row = f"{task:24s} {acc:8.2f}"
        if ref is not None:
            row += f" {ref['per_task'][task]:8.2f} {delta['per_task'][task]:+8.2f}"
        typer.echo(row)
    row = f"{'average':24s} {report['avg']:8.2f}"
    if ref is not None:
        row += f" {ref['avg']:8.2f} {delta['avg']:+8.2f}"
    typer.echo(row)
    latency = report.get("latency", {})
    timings = ", ".join(
        f"batch {k.split('_')[1]} {v['median_ms']:.3f} ms"
        for k, v in latency.items()
        if k.startswith("batch_")
    )
    if timings:
        typer.echo(f"latency ({latency['backend']}): {timings}")
    if out is not None:
        typer.echo(f"json: {out}")

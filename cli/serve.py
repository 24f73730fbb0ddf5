"""Serving commands: serve an engine through Triton Inference Server, or write a model
repository for the official tritonserver container."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from surgery_edge.cli.common import user_errors

from surgery_edge.errors import ConfigError

Engine = Annotated[Path, typer.Argument(help="Engine: .onnx, TensorRT .plan/.engine (or .pt2).")]
MaxBatch = Annotated[int, typer.Option(min=1, help="Most rows per engine call (max_batch_size).")]
Preferred = Annotated[
    list[int] | None,
    typer.Option("--preferred-batch", min=1, help="A batch size the batcher aims for (repeat)."),
]


ServedEngine = Annotated[
    Path,
    typer.Argument(
        help="Engine: .onnx, TensorRT .plan/.engine (or .pt2); or a model repository folder "
        "written by triton-repo / export --triton-repo (its newest version is served)."
    ),
]


@user_errors
def serve(
    engine: ServedEngine,
    http_port: Annotated[int, typer.Option(help="KServe v2 over HTTP.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="KServe v2 over gRPC.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics.")] = 8002,
    host: Annotated[
        str, typer.Option(help="Address to bind (0.0.0.0: every interface; ::1 IPv6 loopback).")
    ] = "127.0.0.1",
    name: Annotated[str, typer.Option(help="The engine model's name.")] = "engine",
    max_batch: MaxBatch = 32,
    max_queue_delay_us: Annotated[
        int,
        typer.Option(
            min=0,
            help="How long a request may wait for others to join its batch (0, Triton's "
            "default: a batch holds what queued while the engine was busy).",
        ),
    ] = 0,
    preferred_batch: Preferred = None,
    instances: Annotated[
        int,
        typer.Option(
            min=1,
            help="Engine instances, side by side, each its own process "
            "(on a CPU, about one per core, with --threads 1).",
        ),
    ] = 1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    threads: Annotated[
        int | None, typer.Option(min=1, help="ONNX Runtime threads per instance.")
    ] = None,
    task_models: Annotated[
        bool, typer.Option(help="Also serve one model per task taking encoded image bytes.")
    ] = True,
    top_k: Annotated[int, typer.Option(min=1, help="Classes a task model returns.")] = 5,
    max_pixels: Annotated[
        int | None,
        typer.Option(min=1, help="Most pixels an image sent to a task model may declare."),
    ] = None,
    max_request_mb: Annotated[
        int,
        typer.Option(
            min=1, max=2047, help="Most MiB an HTTP request body may hold, after decompression."
        ),
    ] = 64,
    drain_timeout_s: Annotated[
        int, typer.Option(min=1, max=25, help="On SIGTERM, how long in-flight requests get.")
    ] = 20,
    log_file: Annotated[Path | None, typer.Option(help="Keep Triton's log in this file.")] = None,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="With a model repository: serve each new version written there, rolling to it "
            "while serving (the old one answers its requests first).",
        ),
    ] = False,
    poll_s: Annotated[
        float, typer.Option(min=0.1, help="With --watch: how often to look for a new version.")
    ] = 2.0,
):
    """Serve an engine to every task through NVIDIA Triton Inference Server (PyTriton).

    KServe v2 (HTTP, gRPC), health, Prometheus metrics; batches mix tasks in one engine call.
    Given a model repository, serves its newest engine version, and with --watch each new one.

    SIGTERM or Ctrl-C stops it: requests in flight are answered first, and the command exits
    with 0 (130 when the signal came before the server was ready). Needs the serve extra.
    """
    from surgery_edge.runtime.serving import ServeOptions, Server  # deferred: PyTriton, ORT

    limits = {"max_pixels": max_pixels} if max_pixels is not None else {}
    options = ServeOptions(
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        name=name,
        max_batch=max_batch,
        max_queue_delay_us=max_queue_delay_us,
        preferred_batches=tuple(preferred_batch or ()),
        instances=instances,
        device=device,
        threads=threads,
        task_models=task_models,
        top_k=top_k,
        max_request_mb=max_request_mb,
        drain_timeout_s=drain_timeout_s,
        log_file=log_file,
        **limits,
    )
    if engine.is_dir():
        from surgery_edge.runtime.rolling import VersionedServer  # deferred: as above

        server = VersionedServer(engine, options, watch, poll_s, log=typer.echo)
    elif watch:
        raise ConfigError(f"--watch needs a model repository folder; {engine} is not a folder.")
    else:
        server = Server(engine, options)
    # until the server is ready, SIGTERM interrupts as Ctrl-C does (exit 130); the start
    # removes what it made either way
    signals: list[int] = []

    def interrupt(signum: int, _) -> None:
        signals.append(signum)
        raise KeyboardInterrupt

    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, interrupt) for s in held}
    try:
        try:
            server.start()
        except Exception:
            if signals:  # the interrupt became another error on its way (e.g. an ImportError
                raise KeyboardInterrupt from None  # when it hit a C extension's import)
            raise
        for line in server.describe():
            typer.echo(line)
        typer.echo("ready: SIGTERM or Ctrl-C stops the server (requests in flight are answered).")
        server.serve_forever()
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    typer.echo("stopped.")


@user_errors
def triton_repo(
    engine: Engine,
    out: Annotated[Path, typer.Option("--out", help="The model repository folder.")],
    name: Annotated[str | None, typer.Option(help="Model name (default: the file's).")] = None,
    max_batch: MaxBatch = 32,
    preferred_batch: Preferred = None,
    max_queue_delay_us: Annotated[
        int, typer.Option(min=0, help="Dynamic batching delay (microseconds).")
    ] = 0,
    instances: Annotated[int, typer.Option(min=1, help="Instances per device.")] = 1,
    kind: Annotated[str, typer.Option(help="gpu | cpu: where the instances run.")] = "gpu",
    accelerator: Annotated[
        bool, typer.Option(help="ONNX on a GPU: run it through ONNX Runtime's TensorRT.")
    ] = True,
    accelerator_fp16: Annotated[bool, typer.Option(help="That TensorRT in FP16.")] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a model folder of this name that triton-repo wrote (every version) "
            "instead of adding the engine as its next version.",
        ),
    ] = False,
):
    """Write a Triton Inference Server model repository for an ONNX or TensorRT engine.

    The official tritonserver container loads it unchanged (ONNX Runtime or TensorRT). A model
    folder triton-repo wrote gets the engine as its next version (Triton serves the newest;
    `serve REPO --watch` rolls to it); any other existing folder is refused.
    """
    from surgery_edge.export.triton import TritonOptions, write_repository  # deferred: onnx

    options = TritonOptions(
        name=name,
        max_batch=max_batch,
        preferred_batches=tuple(preferred_batch or ()),
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        kind=kind,
        accelerator=accelerator,
        accelerator_fp16=accelerator_fp16,
    )
    model = write_repository(engine, out, options, overwrite=overwrite)
    from surgery_edge.runtime.versions import published  # deferred: as above

    typer.echo(f"model {model.name}: {model} (version {published(model)[-1].version})")
    typer.echo(
        f"serve it: docker run --gpus all -p 8000-8002:8000-8002 -v {out.resolve()}:/models "
        "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models"
    )


@user_errors
def serve_stats(
    token_file: Annotated[
        Path,
        typer.Option(help="The access token file serve named (its statistics API is restricted)."),
    ],
    url: Annotated[
        str, typer.Argument(help="The server's HTTP address (host:port), as serve printed it.")
    ] = "127.0.0.1:8000",
    model: Annotated[
        str | None, typer.Option(help="One model only (default: every model).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Triton's statistics as JSON.")] = False,
):
    """Per-model statistics of a running `surgery-edge serve`: requests answered and failed,
    engine calls and rows per call, mean queue and compute time per request."""
    import json  # deferred: only this command prints JSON

    from surgery_edge.runtime.stats import fetch_stats, read_token, stats_lines, summarise

    stats = fetch_stats(url, read_token(token_file), model)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    for line in stats_lines(summarise(stats)):
        typer.echo(line)

"""How ``surgery-edge serve`` serves: ports, batching, instances, device, limits.

The batching settings are the Triton repository writer's too
(:class:`~surgery_edge.runtime.triton_config.Batching`): one validator for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from surgery_edge.errors import ExportError
from surgery_edge.runtime.preprocess import DEFAULT_MAX_PIXELS, check_max_pixels
from surgery_edge.runtime.triton_config import Batching, check_integer, check_model_name

MAX_DRAIN_S = 25  # PyTriton waits 30 s for the server to exit before it kills it


@dataclass(frozen=True)
class ServeOptions:
    """How the engine is served.

    Args:
        host: the address every endpoint binds (``0.0.0.0``: all interfaces).
        http_port, grpc_port, metrics_port: KServe v2 over HTTP and gRPC; Prometheus metrics.
        name: the engine model's name.
        max_batch: the most rows of one engine call (Triton's ``max_batch_size``).
        max_queue_delay_us: how long a request may wait for others to join its batch (0,
            Triton's default: a batch holds what queued while the engine was busy).
        preferred_batches: batch sizes the dynamic batcher aims for (default: none).
        instances: engine instances (each loads the engine; run side by side).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, for the engine's backend.
        threads: ONNX Runtime's intra-op threads per instance (default: its own choice).
        task_models: also serve one model per task that takes encoded image bytes.
        top_k: classes a task model returns when a request does not set ``top_k``.
        max_pixels: the most pixels an image sent to a task model may declare.
        max_request_mb: the most an HTTP request body may hold, in MiB, counted after
            decompression (413 beyond it).
        drain_timeout_s: on stop, how long requests in flight may take to finish.
        startup_timeout_s: how long the server may take to load every model.
        log_file: where Triton writes its log (default: a file in the server's work folder,
            deleted on stop); errors from it are quoted when a model fails to load.
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    name: str = "engine"
    max_batch: int = 32
    max_queue_delay_us: int = 0
    preferred_batches: tuple[int, ...] = ()
    instances: int = 1
    device: str = "auto"
    threads: int | None = None
    task_models: bool = True
    top_k: int = 5
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_mb: int = 64
    drain_timeout_s: int = 20
    startup_timeout_s: float = 180.0
    log_file: Path | None = None

    @property
    def batching(self) -> Batching:
        """The batching settings, as the Triton repository writer has them too."""
        return Batching(self.max_batch, self.preferred_batches, self.max_queue_delay_us)

    def check(self) -> ServeOptions:
        """``self`` if every value is usable; ExportError naming the first that is not."""
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port}
        ports["--metrics-port"] = self.metrics_port
        for flag, port in ports.items():
            check_integer(flag, port, 1, 65535)
        if len(set(ports.values())) < 3:
            raise ExportError(f"The three ports must differ, got {ports}.")
        self.batching.check()
        check_integer("--instances", self.instances, 1)
        check_integer("--top-k", self.top_k, 1)
        check_integer("--drain-timeout-s", self.drain_timeout_s, 1, MAX_DRAIN_S)
        check_integer("--max-request-mb", self.max_request_mb, 1, 2047)
        if self.threads is not None:
            check_integer("--threads", self.threads, 1)
        check_max_pixels(self.max_pixels)
        check_model_name(self.name, "Engine model name (--name)")
        if self.log_file is not None:
            _check_log_file(Path(self.log_file))
        return self


def _check_log_file(log: Path) -> None:
    """``--log-file`` must be a file Triton can write: refused before anything starts."""
    if log.is_dir():
        raise ExportError(
            f"--log-file {log} is a folder; give a file path, e.g. {log / 'tritonserver.log'}."
        )
    if not log.parent.is_dir():
        raise ExportError(
            f"--log-file {log}: the folder {log.parent} does not exist; create it, or choose "
            "another path."
        )
    if log.exists() and not log.is_file():
        raise ExportError(f"--log-file {log} exists and is not a regular file.")
    writable = os.access(log, os.W_OK) if log.exists() else os.access(log.parent, os.W_OK | os.X_OK)
    if not writable:
        raise ExportError(f"--log-file {log} cannot be written (permission denied).")

"""Serving one engine to every task: NVIDIA Triton Inference Server, run through PyTriton.

``surgery-edge serve ENGINE`` (or :class:`Server`) starts the ``tritonserver`` that the
``nvidia-pytriton`` package bundles (``pip install 'surgery-edge[serve]'``) on a model repository
of Python-backend models (:mod:`surgery_edge.runtime.triton_models`) over the runtime's own
backend (ONNX Runtime, TensorRT or an AOTInductor ``.pt2``)::

    clients --KServe v2, HTTP + gRPC--> tritonserver --dynamic batcher--> "engine" model: 1 call
                                          |                                 ^   for many tasks
                                          +--> one model per task --BLS-----+
                                               (encoded image bytes in, top-k names out)

It serves:

- ``engine`` (``name``): the engine as exported: ``images`` (B, 3, S, S) FP32 and, routed,
  ``task_ids`` (B, 1) INT64; outputs ``logits`` and ``probs`` (routed) or ``logits_<task>``.
  Requests for different tasks that arrive within ``max_queue_delay_us`` of each other are
  answered by one engine call (``surgery_edge_engine_calls_total{tasks="3"}`` counts them).
- one model per task, named after it: ``image`` (B, 1) BYTES (PNG, JPEG, ...), decoded with the
  engine's preprocessing; outputs ``labels`` (B, k) BYTES, ``probs`` (B, k) FP32 and ``classes``
  (B, k) INT64; the request parameter ``top_k`` sets k.
- Triton's endpoints: ``/v2/health/live``, ``/v2/health/ready`` (ready once every model is),
  model metadata and statistics, and Prometheus metrics on the metrics port (HTTP and metrics
  through the front below, gRPC from Triton itself).

Each request is checked on its own: an unknown task, a task id out of range, a wrong shape or
dtype, an empty batch, corrupt image bytes or a decompression bomb get an error response; the
other requests of the same batch are answered. What a request may ask for is bounded before
the engine sees it: HTTP requests pass an HTTP front (:mod:`surgery_edge.runtime.http_front`:
body size after decompression, the declared shapes against each model's config), gRPC
requests Triton's own checks (the batch and dims of the config, before it allocates; a
message of at most 2 GB, gRPC's limit as Triton sets it) and the models' (above).

:meth:`Server.serve_forever` stops on SIGTERM or SIGINT: the front stops taking connections
and lets the requests in flight finish, then Triton does the same for gRPC (each up to
``drain_timeout_s``) and exits. Whatever the stop (a signal while starting, a failed start,
the owner killed), no process, work folder or shared-memory segment of the server is left
behind (:mod:`surgery_edge.runtime.server_processes`).

PyTriton's Python-backend stub is linked against ``libpython3.X.so``; on an interpreter built
with a shared libpython, the loader may find the system's library of another patch release
first, and the models then fail in odd ways. The server is therefore started with this
interpreter's library directory first on ``LD_LIBRARY_PATH`` (:func:`stub_environment`), and
every model checks at load that its stub runs the server's Python version.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib.util
import os
import re
import signal
import socket
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from surgery_edge.engine_format import EngineMetadata
from surgery_edge.errors import EXIT_FAILED, ExportError, WorkerError
from surgery_edge.runtime.http_front import HttpFront, model_limits
from surgery_edge.runtime.serve_options import ServeOptions
from surgery_edge.runtime.server_processes import (
    alive,
    start_watchdog,
    stop_watchdog,
    sweep,
    sweep_stale,
    work_folder,
)
from surgery_edge.runtime.serving_repository import serving_repository

SERVE_INSTALL = "Install it with `pip install 'surgery-edge[serve]'` (nvidia-pytriton, Linux only)."
# how Triton's log names a model it could not load: its config refused, or its load failed
_LOAD_FAILED = re.compile(
    r"(?:Poll failed for model directory|failed to load) '([^']+)'(?: version \d+)?: (.*)"
)


class StartFailed(ExportError):
    """Triton did not start. ``models``: ``{model: the server's message}`` for each model
    whose load failed (a usage error, exit 2: that engine or its settings); none named means
    the cause lies outside the models (the machine, the server): exit 3, and worth one more
    try, which :meth:`Server.start` makes."""

    def __init__(self, message: str, models: dict[str, str]):
        super().__init__(message)
        self.models = models
        if not models:
            self.exit_code = EXIT_FAILED


# --- the server ------------------------------------------------------------------------------


def stub_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment changes tritonserver and the Python-backend stub need, as
    ``LD_LIBRARY_PATH``: this interpreter's shared libpython first (none for a statically
    linked interpreter), and the libraries PyTriton bundles for tritonserver (PyTriton looks
    for them in the wrong place when it is reached through a ``.pth`` path, not a site
    folder)."""
    environ = os.environ if environ is None else environ
    paths = [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    shared = sysconfig.get_config_var("Py_ENABLE_SHARED")
    if shared and libdir and library and (Path(libdir) / library).exists():
        paths = [libdir, *(p for p in paths if p != libdir)]
    bundled = _pytriton_libs()
    if bundled is not None and str(bundled) not in paths:
        paths.append(str(bundled))
    joined = os.pathsep.join(paths)
    return {} if joined == environ.get("LD_LIBRARY_PATH", "") else {"LD_LIBRARY_PATH": joined}


def _pytriton_libs() -> Path | None:
    """``nvidia_pytriton.libs`` beside the installed ``pytriton`` package, if there is one."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


@contextlib.contextmanager
def _environment(changes: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``changes`` while the server process is spawned, then as it was."""
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a port
        try:  # in TIME_WAIT is free, one with a listener is not
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ExportError(
                    f"Port {port} on {host} is in use; choose another with {flag}."
                ) from None
            raise ExportError(f"Cannot listen on {host}:{port} ({e}); check --host.") from None


def _loopback_ports(n: int) -> list[int]:
    """``n`` free loopback ports, for Triton's own HTTP and metrics endpoints."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _import_pytriton():
    try:
        from pytriton.triton import Triton, TritonConfig  # deferred: optional, [serve] extra
    except ImportError as e:
        raise ExportError(
            f"Serving needs PyTriton, which is not installed ({e}). {SERVE_INSTALL}"
        ) from None
    return Triton, TritonConfig


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while a server is stopped, so a second Ctrl-C does not cut
    the clean-up short (from the main thread only: elsewhere Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _bounded(fn, timeout_s: float) -> None:
    """``fn()`` in a thread, waited for at most ``timeout_s``."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout=timeout_s)


class Server:
    """A Triton Inference Server serving engines, started and stopped through PyTriton.

    ::

        with Server({"engine": "engine.onnx"}, ServeOptions(http_port=8000)) as server:
            ...  # clients talk to server.http_url / server.grpc_url

    Args:
        engines: ``{model name: engine file}``, or one engine file (served as
            ``options.name``). The first engine's tasks get the task models.
        options: ports, batching, instances, device, limits.
    """

    def __init__(
        self,
        engines: Mapping[str, str | os.PathLike] | str | os.PathLike,
        options: ServeOptions | None = None,
    ):
        self.options = (options or ServeOptions()).check()
        if isinstance(engines, (str, os.PathLike)):
            engines = {self.options.name: engines}
        if not engines:
            raise ExportError("No engine to serve.")
        self.engines = {name: Path(path) for name, path in engines.items()}
        self.metadata: dict[str, EngineMetadata] = {}
        self.models: list[str] = []
        self.engine_version = 1  # the engine models' version folder in the served repository
        self._triton = None
        self._front: HttpFront | None = None
        self._work: Path | None = None
        self._watchdog = None
        self._upstream = ""  # Triton's own HTTP endpoint, on loopback
        self._release = threading.Event()

    # endpoints ------------------------------------------------------------------------------

    @property
    def _local_host(self) -> str:
        host = self.options.host
        if host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        return f"[{host}]" if ":" in host else host

    @property
    def http_url(self) -> str:
        return f"{self._local_host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._local_host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._local_host}:{self.options.metrics_port}/metrics"

    @property
    def access_token(self) -> str | None:
        """The token Triton's restricted endpoints (statistics, model repository, logging,
        tracing, shared memory) require in the ``triton-access-token`` header."""
        return None if self._triton is None else self._triton.get_access_token()

    @property
    def log_file(self) -> Path:
        return self.options.log_file or self._work / "tritonserver.log"

    @property
    def token_file(self) -> Path | None:
        """The file (mode 0600, in the server's work folder, gone at stop) that holds
        :attr:`access_token`, for a user of ``surgery-edge serve``."""
        return None if self._work is None else self._work / "access-token"

    # lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Server:
        """Write the repository, start the server, wait until every model is ready, then open
        the HTTP front. Whatever ends a start early (an error, KeyboardInterrupt) stops what
        it started and removes what it wrote. A start that fails with no model to blame (the
        server exited or timed out, its log naming no model) is tried once more; a model that
        failed to load fails the start at once (:class:`StartFailed` names it)."""
        if self._triton is not None:
            return self
        try:
            return self._start_once()
        except StartFailed as e:
            if e.models:
                raise
            print(f"warning: {e} Starting once more.", file=sys.stderr, flush=True)
        return self._start_once()

    def _start_once(self) -> Server:
        opts = self.options
        Triton, TritonConfig = _import_pytriton()
        sweep_stale()  # what servers killed with their watchdog left (kill -9 of a group)
        for flag, port in (("--http-port", opts.http_port), ("--grpc-port", opts.grpc_port),
                           ("--metrics-port", opts.metrics_port)):  # fmt: skip
            _check_port_free(opts.host, port, flag)
        http, metrics = _loopback_ports(2)
        self._upstream = f"127.0.0.1:{http}"
        self._work = work_folder()
        try:
            self._watchdog = start_watchdog(self._work, grace_s=opts.drain_timeout_s + 5)
            repo = self._work / "repository"
            self.metadata = serving_repository(
                self.engines, repo, opts, version=self.engine_version
            )
            self.models = sorted(p.name for p in repo.iterdir())
            host = opts.host
            config = TritonConfig(
                model_repository=repo,
                http_address="127.0.0.1",
                http_port=http,
                grpc_address=f"[{host}]" if ":" in host else host,  # gRPC's spelling
                grpc_port=opts.grpc_port,
                metrics_address="127.0.0.1",
                metrics_port=metrics,
                allow_gpu_metrics=False,
                strict_readiness=True,
                exit_timeout_secs=opts.drain_timeout_s,
                log_verbose=0,
                log_file=self.log_file,
            )
            self._triton = Triton(config=config, workspace=self._work / "pytriton")
            descriptor = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as token:
                token.write(self._triton.get_access_token() + "\n")
            self._launch()
            self._front = HttpFront(
                host, opts.http_port, http, opts.metrics_port, metrics, model_limits(repo),
                max_request_bytes=opts.max_request_mb << 20, drain_s=opts.drain_timeout_s,
            ).start()  # fmt: skip
        except BaseException:
            self.stop(grace_s=2)
            raise
        return self

    def _launch(self) -> None:
        """Start tritonserver and wait for every model; a server that exits while loading is
        reported with the errors of its log.

        PyTriton's ``run`` blocks (up to minutes) until the server is ready, so it runs in a
        thread while this one watches the server. That thread lives until :meth:`stop`: the
        server process gets SIGTERM when the thread that spawned it ends (PR_SET_PDEATHSIG)."""
        failure: list[BaseException] = []
        self._release = threading.Event()

        def own() -> None:
            try:
                self._triton.run()
            except BaseException as e:  # reported by the watching thread
                failure.append(e)
                return
            self._release.wait()

        with _environment(stub_environment()):
            self._owner = threading.Thread(target=own, name="tritonserver-owner", daemon=True)
            self._owner.start()
            deadline = time.monotonic() + self.options.startup_timeout_s
            while not self._all_ready():
                pid = self._server_pid()
                if failure or (pid is not None and not alive(pid)):
                    what = "exited while loading the models"
                    raise StartFailed(self._failure(what), self._failed_models())
                if time.monotonic() > deadline:
                    timeout = f"{self.options.startup_timeout_s:.0f} s"
                    what = f"did not load every model in {timeout}"
                    raise StartFailed(self._failure(what), self._failed_models())
                time.sleep(0.2)

    def _server_pid(self) -> int | None:
        """tritonserver's pid, once PyTriton has started it (it may have exited since).

        PyTriton does not say it publicly, and its ``is_alive()`` must not be asked while the
        server starts: when it finds the server gone it runs PyTriton's ``stop`` in the asking
        thread, which then waits up to 120 s for a lock the starting thread holds. Without
        these attributes a server that dies while loading is found at the startup timeout."""
        server = getattr(self._triton, "_triton_server", None)
        return getattr(getattr(server, "_tritonserver_running_cmd", None), "pid", None)

    def _all_ready(self) -> bool:
        for model in self.models:
            url = f"http://{self._upstream}/v2/models/{model}/ready"
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status != 200:
                        return False
            except (urllib.error.URLError, OSError):
                return False
        return True

    def _log_lines(self) -> list[str]:
        if not self.log_file.is_file():
            return []
        return self.log_file.read_text(errors="replace").splitlines()

    def _failed_models(self) -> dict[str, str]:
        """``{model: the server's message (its first line)}`` of each model Triton's log says
        it could not load."""
        failed = {}
        for line in self._log_lines():
            found = _LOAD_FAILED.search(line)
            if found:  # Triton writes the message's newlines as \n inside quotes
                failed[found[1]] = found[2].split("\\n")[0].rstrip('"').strip()
        return failed

    def _failure(self, what: str) -> str:
        """What went wrong, from Triton's log: each model that failed to load, with the
        server's message (its first line), else the log's last error lines."""
        lines = self._log_lines()
        failed = self._failed_models()
        if failed:
            reasons = "; ".join(f"model {m!r} failed to load: {why}" for m, why in failed.items())
            return f"Triton Inference Server {what}: {reasons}"
        errors = [ln for ln in lines if ln.startswith("E") or "error" in ln.lower()][-6:]
        detail = " | ".join(errors) if errors else f"no error in its log ({self.log_file})"
        return f"Triton Inference Server {what}: {detail}"

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking requests, answer those in flight (HTTP, then gRPC, each up to
        ``drain_timeout_s``), stop Triton, then remove every process, shared-memory segment
        and file of the server (those still running ``grace_s`` after SIGTERM are killed).
        Safe to call at any point, and more than once."""
        with _signals_held():
            front, self._front = self._front, None
            if front is not None:
                front.stop()
            triton, self._triton = self._triton, None
            if triton is not None:
                atexit.unregister(triton.stop)  # PyTriton's own, at exit: done here instead
                # PyTriton sends SIGINT and waits up to 30 s for Triton's drain; a start cut
                # short has nothing to drain: the sweep below ends it
                drain = self.options.drain_timeout_s + 10 if front is not None else grace_s
                _bounded(triton.stop, drain)
                self._release.set()  # only now may the thread that spawned the server end
            work, self._work = self._work, None
            if work is not None:
                sweep(work, os.getpid(), grace_s)
            watchdog, self._watchdog = self._watchdog, None
            if watchdog is not None:
                stop_watchdog(watchdog)

    def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT (or until the server dies), then stop, draining."""
        stop = threading.Event()
        previous = {
            s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            while not stop.wait(0.5):
                if self._triton is None or not self._triton.is_alive():
                    raise WorkerError(self._failure("stopped unexpectedly"))
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def describe(self) -> list[str]:
        """Lines saying what is served where."""
        lines = [
            f"HTTP  http://{self.http_url}   gRPC  {self.grpc_url}   metrics  {self.metrics_url}",
        ]
        for name, meta in self.metadata.items():
            inputs = " + ".join(meta.inputs)
            lines.append(
                f"model {name}: {self.engines[name]} ({meta.mode}, {meta.precision}); "
                f"inputs {inputs}; outputs {', '.join(meta.outputs)}"
            )
        tasks = [m for m in self.models if m not in self.metadata]
        if tasks:
            lines.append(f"task models (encoded image bytes in, top-k out): {', '.join(tasks)}")
        lines.append(
            f"HTTP requests: bodies up to {self.options.max_request_mb} MiB after decompression, "
            "shapes checked against each model's config"
        )
        header = f"triton-access-token: $(cat {self.token_file})"
        lines.append(
            "statistics and the repository API take the header in the access token file: "
            f'curl -H "{header}" http://{self.http_url}/v2/models/{self.options.name}/stats'
        )
        lines.append(
            f"per-model counts and queue times: surgery-edge serve-stats {self.http_url} "
            f"--token-file {self.token_file}"
        )
        return lines

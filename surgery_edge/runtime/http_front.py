"""The HTTP front of ``surgery-edge serve``: every HTTP request is bounded before Triton sees it.

The tritonserver that nvidia-pytriton 0.7 bundles (Triton 2.51) reads an HTTP request whole,
inflates a gzip or deflate body without a bound, and allocates the tensors a KServe JSON
request declares before it checks them against the model: a 1 MB gzip body inflated to 2.1 GB
of server memory, a shape of 2^31 task ids grew the server to 16 GB, and a shape of 2^31
images aborted it, so every client lost the service. (Triton's ``--http-max-input-size`` came
in a later release.) So ``serve`` binds Triton's HTTP and metrics endpoints to loopback ports
of their own and puts this front (aiohttp) on the public ports. For every request it:

- reads at most ``max_request_bytes`` of body, and inflates a gzip or deflate body (the two
  encodings Triton takes) to at most that many bytes, in C (``zlib``, told the most it may
  write), so a compression bomb costs that much memory and a few milliseconds: beyond, 413;
- for an inference request (``POST /v2/models/<model>[/versions/<v>]/infer``) parses the JSON
  header (the whole body, or its first ``Inference-Header-Content-Length`` bytes when binary
  tensors follow) and checks every input against the model's ``config.pbtxt``: a name the
  model has, the config's dims, a batch from 1 to ``max_batch_size``; so what Triton then
  allocates is bounded by what the model takes. A body that is not such JSON, or an input
  that does not fit, gets 400 with a one-line message (Triton's own answer to a body that is
  not JSON is 500); an unknown model 404;
- forwards everything else as it came (health, metadata, statistics and their access token,
  and the metrics port's ``/metrics``), and returns Triton's answer as Triton gave it.

The inflated body is forwarded without its ``Content-Encoding``. gRPC does not pass through
here (see :mod:`surgery_edge.runtime.serving`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery_edge.errors import ExportError
from surgery_edge.runtime.triton_config import model_config_pb2

# headers of one connection, not of the request (RFC 9110 7.6.1), and those the front rewrites
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect"}  # fmt: skip
HEADER_LENGTH = "Inference-Header-Content-Length"
_SHOWN = 80  # characters of a client's value quoted in a message
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # zlib's names for the encodings


@dataclass(frozen=True)
class ModelLimits:
    """What one model takes: at most ``max_batch`` rows, each input of its ``dims``."""

    max_batch: int
    inputs: dict[str, tuple[int, ...]]


def model_limits(repo: str | os.PathLike) -> dict[str, ModelLimits]:
    """``{model: ModelLimits}`` from the ``config.pbtxt`` files Triton loads from ``repo``."""
    from google.protobuf import text_format  # deferred: with tritonclient (the serve extra)

    pb2 = model_config_pb2()
    if pb2 is None:
        raise ExportError("Serving needs tritonclient: `pip install 'surgery-edge[serve]'`.")
    limits = {}
    for path in sorted(Path(repo).glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(encoding="utf-8"), pb2.ModelConfig())
        inputs = {i.name: tuple(i.dims) for i in config.input}
        limits[config.name] = ModelLimits(config.max_batch_size, inputs)
    return limits


def check_inference(
    model: str, limits: ModelLimits, body: bytes, header_length: str | None
) -> str | None:
    """``None`` if the KServe v2 inference request ``body`` fits ``model``; else why not.

    Checked: the JSON (an object; ``inputs`` a non-empty list, ``outputs`` a list of named
    objects, ``parameters`` objects), each input (a name the model has, a ``datatype``, the
    config's dims with a batch from 1 to ``max_batch``, and unless the tensor comes as binary
    data or shared memory, ``data`` an array of as many values of that type as the shape
    holds). Triton answers 500 to several of these; the rest it checks itself (400).

    Args:
        model: the model the request is for.
        limits: what that model takes.
        body: the (inflated) request body.
        header_length: the ``Inference-Header-Content-Length`` header, if the request has one.
    """
    size = len(body)
    if header_length is not None:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= size:
            return (
                f"{HEADER_LENGTH} {_short(header_length)} is not a length within the "
                f"{size}-byte body."
            )
        size = int(header_length)
    try:
        header = json.loads(body[:size])
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        return f"the request body is not JSON ({_short(str(e))})."
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or not inputs:
        return "a KServe v2 inference request is a JSON object with a non-empty 'inputs' list."
    if not isinstance(header.get("parameters", {}), dict):
        return "the request's 'parameters' must be a JSON object."
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list) or not all(_named(o) for o in outputs):
        return "'outputs' must be a list of JSON objects with a 'name' each."
    for item in inputs:
        refused = _check_input(model, limits, item)
        if refused is not None:
            return refused
    return None


def _named(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("name"), str)
        and isinstance(item.get("parameters", {}), dict)
    )


def _check_input(model: str, limits: ModelLimits, item: Any) -> str | None:
    if not _named(item):
        return (
            "each input is a JSON object with a 'name' (and an object of 'parameters'), got "
            f"{_short(json.dumps(item))}."
        )
    name = item["name"]
    if name not in limits.inputs:
        known = ", ".join(repr(n) for n in limits.inputs)
        return f"model {model!r} has no input {_short(name)!r}; its inputs: {known}."
    shape, dims = item.get("shape"), limits.inputs[name]
    fits = (
        isinstance(shape, list)
        and len(shape) == 1 + len(dims)
        and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        and 1 <= shape[0] <= limits.max_batch
        and tuple(shape[1:]) == dims
    )
    if not fits:
        want = ", ".join(["B", *map(str, dims)])
        return (
            f"input {name!r} of model {model!r} has an unexpected shape "
            f"{_short(json.dumps(shape))}: expected [{want}] with B from 1 to {limits.max_batch}."
        )
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        return f"input {name!r} has no 'datatype' (e.g. \"FP32\")."
    if {"binary_data_size", "shared_memory_region"} & set(item.get("parameters", {})):
        return None  # the tensor is not in the JSON; Triton checks its size against the shape
    kind = _JSON_KINDS.get(datatype)
    if kind is None:
        return None  # Triton names the unknown datatype itself (400)
    want = math.prod(shape)
    data = item.get("data")
    got = _count(data, kind) if isinstance(data, list) else None
    if got != want:
        what = "an array" if not isinstance(data, list) else f"{want} {datatype} values"
        found = "" if got is None else f", got {got}"
        return f"input {name!r}: 'data' must be {what} for shape {shape}{found}."
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# the JSON values each KServe datatype takes in 'data'
_JSON_KINDS = {
    "BOOL": lambda v: isinstance(v, bool),
    "BYTES": lambda v: isinstance(v, str),
    **dict.fromkeys(["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"],
                    _integer),
    **dict.fromkeys(["FP16", "FP32", "FP64", "BF16"], _number),
}  # fmt: skip


def _count(data: list, kind) -> int | None:
    """How many values the (nested) array ``data`` holds; ``None`` if one is not ``kind``."""
    count, stack = 0, [data]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif kind(value):
            count += 1
        else:
            return None
    return count


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


class HttpFront:
    """The public HTTP and metrics ports of a server, in a thread of their own.

    Args:
        host: the address to bind.
        port, upstream_port: the public HTTP port; Triton's, on loopback.
        metrics_port, upstream_metrics_port: the same for Prometheus metrics.
        limits: ``{model: ModelLimits}`` (:func:`model_limits`).
        max_request_bytes: the most bytes a request body may hold, after inflating.
        drain_s: on :meth:`stop`, how long requests in flight may take to finish.
    """

    def __init__(
        self,
        host: str,
        port: int,
        upstream_port: int,
        metrics_port: int,
        upstream_metrics_port: int,
        limits: dict[str, ModelLimits],
        max_request_bytes: int,
        drain_s: float,
    ):
        self.host, self.limits, self.max_request_bytes = host, limits, max_request_bytes
        # {model: why it cannot answer yet}: set while a new engine version rolls in
        self.loading: dict[str, str] = {}
        self._ports = ((port, upstream_port, max_request_bytes, True),
                       (metrics_port, upstream_metrics_port, 1 << 16, False))  # fmt: skip
        self._drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[Any] = []
        self._session = None

    def start(self) -> HttpFront:
        """Bind the ports and serve; ExportError naming the port when one cannot be bound."""
        self._loop = asyncio.new_event_loop()
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="http-front", daemon=True
        )
        self._thread.start()
        try:
            started.result(timeout=60)
        except OSError as e:
            self.stop()
            raise ExportError(f"Cannot listen on {self.host} ({e}); check --host.") from None
        return self

    def stop(self) -> None:
        """Stop taking connections, let requests in flight finish (up to ``drain_s``), close
        every connection to Triton."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self._close(), loop)
            try:
                done.result(timeout=self._drain_s + 10)
            except (concurrent.futures.TimeoutError, OSError):
                pass
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self, started: concurrent.futures.Future) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as e:  # reported to start()
            loop.run_until_complete(self._close())
            loop.close()
            started.set_exception(e)
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _open(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web  # deferred: serve

        self._session = ClientSession(
            connector=TCPConnector(limit=256),
            auto_decompress=False,  # Triton's answer goes back as it came
            timeout=ClientTimeout(total=None, sock_connect=10),
        )
        for port, upstream, max_body, guarded in self._ports:
            app = web.Application(client_max_size=max_body)
            forward = self._handler(f"http://127.0.0.1:{upstream}", guarded)
            app.router.add_route("*", "/{path:.*}", forward)
            # bodies are inflated here (_inflate), not by aiohttp: its own inflation runs in
            # small Python-level steps (64 MiB took seconds) and goes on while it lingers
            runner = web.AppRunner(
                app, access_log=None, shutdown_timeout=self._drain_s, auto_decompress=False
            )
            await runner.setup()
            self._runners.append(runner)
            await web.TCPSite(runner, self.host, port, reuse_address=True).start()

    async def _close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
        if self._session is not None:
            await self._session.close()

    def _handler(self, upstream: str, guarded: bool):
        from aiohttp import ClientError, web  # deferred: serve
        from yarl import URL  # deferred: aiohttp's

        async def forward(request: web.Request) -> web.StreamResponse:
            body = await self._body(request)
            if isinstance(body, tuple):
                return _error(*body)
            if guarded and request.method == "POST":
                refused = self._check(request.path, body, request.headers.get(HEADER_LENGTH))
                if refused is not None:
                    return _error(*refused)
            headers = [(k, v) for k, v in request.headers.items()
                       if k.lower() not in _HOP and k.lower() != "content-encoding"]  # fmt: skip
            url = URL(upstream + request.raw_path, encoded=True)
            try:
                async with self._session.request(
                    request.method, url, headers=headers, data=body
                ) as reply:
                    payload = await reply.read()
                    back = [(k, v) for k, v in reply.headers.items() if k.lower() not in _HOP]
                    return web.Response(status=reply.status, body=payload, headers=back)
            except ClientError as e:
                return _error(503, f"Triton Inference Server did not answer ({e}).")

        return forward

    async def _body(self, request) -> bytes | tuple[int, str]:
        """The request's body, inflated; or the status and message that refuse it."""
        from aiohttp import web  # deferred: serve

        limit = self.max_request_bytes
        too_large = (413, f"the request body is larger than {limit} bytes (counted after "
                          "decompression; serve --max-request-mb).")  # fmt: skip
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large
        except Exception as e:  # a body aiohttp cannot read
            return 400, f"cannot read the request body ({_short(str(e))})."
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "identity":
            return body
        if encoding not in _WBITS:
            return 415, (
                f"Content-Encoding {_short(encoding)!r} is not taken: send gzip, deflate or an "
                "unencoded body."
            )
        inflated = _inflate(body, _WBITS[encoding], limit)
        if inflated is True:
            return too_large
        if inflated is False:
            return 400, f"the request body is not one valid {encoding} stream."
        return inflated

    def _check(self, path: str, body: bytes, header_length: str | None) -> tuple[int, str] | None:
        parts = path.strip("/").split("/")
        # v2/models/<model>/infer or v2/models/<model>/versions/<version>/infer
        if parts[:2] != ["v2", "models"] or parts[-1] != "infer" or len(parts) not in (4, 6):
            return None
        model = parts[2]
        if model in self.loading:  # a task whose model is loading with a new engine version
            return 503, self.loading[model]
        if model not in self.limits:
            served = ", ".join(sorted(self.limits))
            return 404, f"Request for unknown model: {model!r} is not served here ({served})."
        refused = check_inference(model, self.limits[model], body, header_length)
        return None if refused is None else (400, refused)


def _inflate(data: bytes, wbits: int, limit: int) -> bytes | bool:
    """``data`` inflated, if it is one whole stream of at most ``limit`` bytes; ``True`` if it
    would be larger (zlib stops after ``limit + 1`` bytes), ``False`` if it is not valid."""
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        return False
    if len(out) > limit:
        return True
    return out if inflater.eof and not inflater.unused_data else False


def _error(status: int, message: str):
    from aiohttp import web  # deferred: serve

    return web.json_response({"error": message}, status=status)

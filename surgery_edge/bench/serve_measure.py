"""The serving benchmark's measurements: one window of load and what the server's processes
did in it, the summary of a point's repeated windows, the whole run through one server, and
the same engines alone in ONNX Runtime in this process (the reference the serving efficiency
divides by).

CPU time is split by hop of the per-request chain: the client process (gRPC client, tensor
conversion), tritonserver itself (gRPC front, queues, the dynamic batcher, shared memory to
the stubs), and the Python-backend stubs (Python, tensor conversion, copies, the engine); the
engine's own share of a stub's time is what the engine costs alone in this process.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from surgery_edge.bench.proc import CpuClock, MemorySampler, server_processes
from surgery_edge.bench.report import fmt
from surgery_edge.bench.serve_load import WORKLOADS, Requests, Route, counters, label, load, plan
from surgery_edge.engine_format import EngineMode
from surgery_edge.runtime.serve_options import ServeOptions
from surgery_edge.runtime.triton_models import FLUSH_S


@dataclass(frozen=True)
class ServeBenchConfig:
    """What to serve and how to load it."""

    arch: str = "tiny-vit-32"
    tasks: int = 8
    rank: int = 16
    concurrency: tuple[int, ...] = (1, 4, 16)
    seconds: float = 3.0  # one measured window
    warmup_s: float = 1.0  # before each window
    repeats: int = 5  # windows per point, taken in turns with the compared configurations
    max_batch: int = 32
    max_queue_delay_us: int = 0  # Triton's default: batch what is queued, wait for nothing
    threads: int = 1  # ONNX Runtime threads per model instance
    instances: int = 1  # instances of every model (each its own stub process)
    seed: int = 0


@dataclass
class ServeResult:
    """One (workload, configuration, concurrency) measurement."""

    workload: str
    config: str
    concurrency: int
    models: list[str]
    answers_per_request: int  # task answers one request gets
    requests: int  # completed in the window
    errors: int
    seconds: float
    requests_per_s: float  # the median over the repeated windows
    rates: list[float]  # requests/s of each window
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    engine_calls: int
    mean_rows_per_call: float | None
    batch_histogram: dict[int, int] = field(default_factory=dict)  # rows per call -> calls
    task_mix: dict[str, int] = field(default_factory=dict)  # distinct tasks per call -> calls
    histogram_requests: int = 0  # the requests the histograms hold (warm-ups included)
    server_rss_mb: float | None = None  # tritonserver + every stub, peak in the window
    models_rss_mb: float | None = None  # the stubs of this configuration's models, peak
    # CPU time in the windows (medians over them): the server's processes and this client's,
    # per answered request, and as cores kept busy; requests/s = cores_busy / CPU per request
    server_cpu_ms_per_request: float | None = None
    client_cpu_ms_per_request: float | None = None
    cores_busy: float | None = None
    cores_stolen: float | None = None  # by the hypervisor, from the whole machine (noise)
    # the server's CPU per request by process: the stubs (the engine inside them) and
    # tritonserver itself; and the range of the windows' CPU per request (server + client)
    stub_cpu_ms_per_request: float | None = None
    triton_cpu_ms_per_request: float | None = None
    cpu_ms_per_request_range: list[float] = field(default_factory=list)


@dataclass
class Window:
    """What one measured window saw."""

    latencies_ms: list[float]  # of the requests answered in the window
    errors: int
    histogram: dict[int, int]  # rows per engine call -> calls, over the whole load
    mix: dict[str, int]  # distinct tasks per engine call -> calls, over the whole load
    counted: int  # the requests the histograms hold: all of the load's, the warm-up's too
    server_rss: int  # bytes, peak
    models_rss: int
    server_cpu_s: float  # CPU time in the window: the server's processes
    client_cpu_s: float  # and this process, the clients
    stolen_s: float  # the machine's, by the hypervisor
    stub_cpu_s: float = 0.0  # the part of server_cpu_s the Python-backend stubs spent


def measure_window(
    server,
    requests: Requests,
    models: list[str],
    route: Route,
    concurrency: int,
    cfg: ServeBenchConfig,
) -> Window:
    """Load ``models`` at ``concurrency`` for ``warmup_s + seconds``; measure the last part.

    The engine-call counters are read before the load and after it: the models send them
    every ``FLUSH_S``, off the request path, so a reading during the load would miss up to
    that much. The histograms cover every request of the load, the warm-up included
    (``Window.counted``); rates and latencies cover the window only."""
    name = "surgery_edge_engine_calls_total"
    time.sleep(2 * FLUSH_S)  # what the last load left in the models' sums is sent
    before = counters(server.metrics_url, name)
    processes = server_processes()
    stubs = [pid for pid, model in processes.items() if model is not None]
    start = time.monotonic()
    window = (start + cfg.warmup_s, start + cfg.warmup_s + cfg.seconds)
    with (
        MemorySampler(processes) as memory,
        CpuClock(processes, *window) as cpu,
        CpuClock(stubs, *window) as stub_cpu,
    ):
        done = asyncio.run(load(server.grpc_url, requests, route, concurrency, window[1], cfg.seed))
    time.sleep(2 * FLUSH_S)
    after = counters(server.metrics_url, name)
    inside = [(s, e, ok) for s, e, ok in done if window[0] <= e <= window[1]]
    histogram: dict[int, int] = {}
    mix: dict[str, int] = {}
    for labels, value in after.items():
        calls = int(round(value - before.get(labels, 0.0)))
        if label(labels, "model") not in models or calls <= 0:
            continue
        rows, tasks_in_call = int(label(labels, "rows")), label(labels, "tasks")
        histogram[rows] = histogram.get(rows, 0) + calls
        mix[tasks_in_call] = mix.get(tasks_in_call, 0) + calls
    return Window(
        latencies_ms=[(e - s) * 1e3 for s, e, ok in inside if ok],
        errors=sum(1 for _, _, ok in inside if not ok),
        histogram=histogram,
        mix=mix,
        counted=len(done),
        server_rss=memory.total,
        models_rss=sum(memory.models.get(m, 0) for m in models),
        server_cpu_s=cpu.server_s,
        client_cpu_s=cpu.client_s,
        stolen_s=cpu.stolen_s,
        stub_cpu_s=stub_cpu.server_s,
    )


def summarise(
    workload: str,
    config: str,
    concurrency: int,
    models: list[str],
    answers: int,
    windows: list[Window],
    seconds: float,
) -> ServeResult:
    """One result from the repeated windows of a point: the median request rate, latency
    percentiles over every request, the summed histograms, the peak memory."""
    latencies = sorted(x for w in windows for x in w.latencies_ms)
    histogram: dict[int, int] = {}
    mix: dict[str, int] = {}
    for w in windows:
        for k, v in w.histogram.items():
            histogram[k] = histogram.get(k, 0) + v
        for k, v in w.mix.items():
            mix[k] = mix.get(k, 0) + v
    calls, rows = sum(histogram.values()), sum(r * c for r, c in histogram.items())
    rates = [len(w.latencies_ms) / seconds for w in windows]
    answered = [w for w in windows if w.latencies_ms]

    def each(cpu_s: Callable[[Window], float]) -> list[float]:
        return [cpu_s(w) / len(w.latencies_ms) * 1e3 for w in answered]

    def per_request(cpu_s: Callable[[Window], float]) -> float | None:
        values = each(cpu_s)
        return statistics.median(values) if values else None

    total = each(lambda w: w.server_cpu_s + w.client_cpu_s)
    return ServeResult(
        workload=workload,
        config=config,
        concurrency=concurrency,
        models=models,
        answers_per_request=answers,
        requests=len(latencies),
        errors=sum(w.errors for w in windows),
        seconds=seconds * len(windows),
        requests_per_s=statistics.median(rates),
        rates=[round(r, 1) for r in rates],
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        mean_ms=statistics.fmean(latencies) if latencies else None,
        engine_calls=calls,
        mean_rows_per_call=rows / calls if calls else None,
        batch_histogram=dict(sorted(histogram.items())),
        task_mix=dict(sorted(mix.items())),
        histogram_requests=sum(w.counted for w in windows),
        server_rss_mb=max(w.server_rss for w in windows) / 2**20,
        models_rss_mb=max(w.models_rss for w in windows) / 2**20,
        server_cpu_ms_per_request=per_request(lambda w: w.server_cpu_s),
        client_cpu_ms_per_request=per_request(lambda w: w.client_cpu_s),
        cores_busy=statistics.median((w.server_cpu_s + w.client_cpu_s) / seconds for w in windows),
        cores_stolen=statistics.median(w.stolen_s / seconds for w in windows),
        stub_cpu_ms_per_request=per_request(lambda w: w.stub_cpu_s),
        triton_cpu_ms_per_request=per_request(lambda w: w.server_cpu_s - w.stub_cpu_s),
        cpu_ms_per_request_range=[round(min(total), 3), round(max(total), 3)] if total else [],
    )


def percentile(sorted_ms: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``sorted_ms`` (a value it holds: numpy's ``higher``)."""
    if not sorted_ms:
        return None
    return float(np.percentile(np.asarray(sorted_ms), q, method="higher"))


def engines_alone(
    engines: dict[str, Path], cfg: ServeBenchConfig, tasks: list[str]
) -> dict[str, dict[str, float]]:
    """The CPU time per request of each configuration's engines alone: the same ONNX Runtime
    backend the server's models run (``OnnxBackend``, ``cfg.threads`` intra-op threads), in
    this process, one image per call, in ``cfg.repeats`` interleaved rounds of a tenth of a
    window per configuration. ``{workload/config: {"median", "min", "max"}}`` in ms."""
    block_s = cfg.seconds / 10
    from surgery_edge.runtime.backends import OnnxBackend  # deferred: imports onnxruntime

    backends = {n: OnnxBackend(p, device="cpu", threads=cfg.threads) for n, p in engines.items()}
    size = next(iter(backends.values())).meta.preprocessing.image_size
    image = np.random.default_rng(cfg.seed).normal(size=(1, 3, size, size)).astype(np.float32)
    calls = {}
    for workload, configs in WORKLOADS.items():
        for config in configs:
            models, route = plan(workload, config, tasks)
            calls[f"{workload}/{config}"] = route
    rng = np.random.default_rng(cfg.seed)
    samples: dict[str, list[float]] = {key: [] for key in calls}

    def run(route: Route) -> None:
        for model, task in route(rng):
            backend = backends[model]
            ids = None if backend.meta.mode is EngineMode.ALL_TASKS else np.array([task])
            backend.run(image, ids)

    for route in calls.values():
        run(route)  # warm-up: first calls allocate
    for _ in range(cfg.repeats):
        for key, route in calls.items():
            n, start, until = 0, time.process_time(), time.monotonic() + block_s
            while time.monotonic() < until:
                run(route)
                n += 1
            samples[key].append((time.process_time() - start) / n * 1e3)
    return {
        key: {"median": statistics.median(v), "min": min(v), "max": max(v)}
        for key, v in samples.items()
    }


def run_serve_bench(
    cfg: ServeBenchConfig, engines: dict[str, Path], log: Callable[[str], None] | None = None
) -> list[ServeResult]:
    """Serve ``engines`` in one server and measure every workload at every concurrency."""
    from surgery_edge.runtime.serving import Server  # deferred: PyTriton
    from surgery_edge.runtime.triton_config import check_model_name  # deferred: with serving

    log = log or (lambda msg: None)
    for name in engines:
        check_model_name(name)
    results = []
    with Server(engines, server_options(cfg)) as server:
        log(f"serving {len(engines)} models: {', '.join(server.models)}")
        import tritonclient.grpc as grpc  # deferred: optional, the serve extra

        size = next(iter(server.metadata.values())).preprocessing.image_size
        image = np.random.default_rng(cfg.seed).normal(size=(1, 3, size, size))
        requests = Requests(grpc, server.metadata, image.astype(np.float32))
        tasks = list(server.metadata["v2"].tasks)
        # The configurations compared at one concurrency take turns, window by window, so
        # that a shared machine's drifting load touches them alike; each point reports the
        # median of its windows.
        for workload, configs in WORKLOADS.items():
            answers = len(tasks) if workload == "all-tasks" else 1
            for concurrency in cfg.concurrency:
                plans = {c: plan(workload, c, tasks) for c in configs}
                windows: dict[str, list[Window]] = {c: [] for c in configs}
                for _ in range(cfg.repeats):
                    for config, (models, route) in plans.items():
                        windows[config].append(
                            measure_window(server, requests, models, route, concurrency, cfg)
                        )
                for config, (models, _) in plans.items():
                    r = summarise(
                        workload, config, concurrency, models, answers, windows[config], cfg.seconds
                    )
                    log(
                        f"  {workload:9s} {config:17s} c={concurrency:<3d} "
                        f"{r.requests_per_s:8.1f} req/s {r.rates}  p99 {fmt(r.p99_ms, '.2f')} ms"
                        f"  CPU/req {fmt(r.server_cpu_ms_per_request, '.2f')} + "
                        f"{fmt(r.client_cpu_ms_per_request, '.2f')} ms  cores "
                        f"{fmt(r.cores_busy, '.2f')}  errors {r.errors}"
                    )
                    results.append(r)
    return results


class ServerSettings(Protocol):
    """What a serving benchmark's config says of its server (:class:`ServeBenchConfig`'s
    fields; the version roll's config has them too)."""

    @property
    def max_batch(self) -> int: ...
    @property
    def max_queue_delay_us(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @property
    def instances(self) -> int: ...


def server_options(cfg: ServerSettings, **given: Any) -> ServeOptions:
    """The options of a benchmark's server: free loopback ports, the CPU, ``cfg``'s batching,
    threads and instances, no per-task models, 5 s to drain on stop; ``given`` sets others
    (the model's name, the startup timeout)."""
    return ServeOptions(
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        max_batch=cfg.max_batch,
        max_queue_delay_us=cfg.max_queue_delay_us,
        device="cpu",
        threads=cfg.threads,
        instances=cfg.instances,
        task_models=False,
        drain_timeout_s=5,
        **given,
    )


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket  # deferred: only here

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

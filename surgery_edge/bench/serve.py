"""Serving under load: one Triton Inference Server, the engines against eight expert models.

Every model runs in the **same** server (``surgery-edge serve``'s Python-backend models over
ONNX Runtime, :mod:`surgery_edge.runtime.serving`), with the same batching settings, and is
driven over loopback gRPC by a closed-loop load generator (``tritonclient.grpc.aio``:
``concurrency`` clients, each sending its next request when the last is answered):

* ``all-tasks``: each request is one image that must be answered for every task:
  - ``v1``: one request to the V1 engine (Surgery, all-tasks: backbone once, then every
    task's adapter and head), which answers with every task's logits in one tensor;
  - ``experts``: one request to each of the eight expert models, together; the request is
    answered when the last expert is;
* ``mixed``: each request is one image for one task, drawn at random (a mixed-task stream):
  - ``v2``: the V2 engine (SurgeryV2, routed by task id);
  - ``merged``: the merged backbone alone with each task's head (routed, no adapters): the
    lower bound on what one shared backbone costs;
  - ``experts``: the expert model of the request's task.

Each request names the one output it needs: a routed engine's ``logits`` (not ``probs``), an
expert's logits, the V1 engine's stacked ``logits`` (B, T, C_max) rather than T tensors.

Per (workload, configuration, concurrency), over ``--repeats`` windows that take turns with the
configurations it is compared with (a shared machine's load drifts): requests/s (the median
window), latency p50/p99/mean (every request), and, read from the server's Prometheus counters
(``surgery_edge_engine_calls_total``), the histogram of rows per engine call (the batch sizes
Triton's dynamic batcher formed) and of the distinct tasks per call, over the whole load, its
warm-up included (the models send their counters every 50 ms, so they are read before and
after a load, not while it runs); the server's resident
memory (tritonserver and every model's stub process, peak during the windows) and that of the
models the configuration uses; and the CPU time (user + system) that tritonserver, every stub
and the client process spent in the windows, per answered request and as cores kept busy, with
the time the hypervisor stole from the machine (a slow phase of a shared machine need not show
there; it does show as more CPU per request). The request rate is cores busy / CPU per
request, so a ratio of request rates splits into what one configuration saves per request and
how many cores the load let each use (one client's single request in flight is one chain of
processes taking turns, at most about one core; eight expert calls sent together can use
every core). Batching:
``--max-queue-delay-us`` 0 by default, Triton's own default (a batch holds what queued while
the model was busy; nothing waits for more).

The engines are built with random weights at the demo's architecture and class counts (timing
only: the values do not change the work), into ``--engines DIR`` when given (reused by the next
run); or a run's own engines are taken from there: ``v1.onnx``, ``v2.onnx``, ``merged.onnx``
and ``expert-<task>.onnx`` for every task of ``v2.onnx``.

    python benchmarks/bench_serve.py --instances 2 --out benchmarks/results/cpu  # the record
    python benchmarks/bench_serve.py --arch micro-vit-16 --tasks 2 --concurrency 1 2 \\
        --seconds 1 --out /tmp/serve-bench                               # a smoke run

Outputs under ``--out``: ``serve-<arch>.json`` (the command, the environment with the load
averages before and after, every measurement, the targets) and ``serve-<arch>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import re
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from surgery_edge.bench.env import environment
from surgery_edge.bench.report import command_line, fmt, table, write_record_set
from surgery_edge.bench.workloads import RANDOM_WEIGHTS_NOTE, Parts, build_engine_model
from surgery_edge.engine_format import EngineMetadata, EngineMode, read_onnx_metadata
from surgery_edge.errors import ConfigError, SurgeryEdgeError
from surgery_edge.runtime.triton_models import FLUSH_S, STACKED_OUTPUT
from surgery_edge.surgery.methods import SURGERY, SURGERY_V2, engine_name, method_engines

WORKLOADS = {"all-tasks": ("v1", "experts"), "mixed": ("v2", "merged", "experts")}
# the targets of the serving issue: (workload, engine, baseline, least ratio, p99 no worse)
TARGETS = (
    ("all-tasks", "v1", "experts", 5.0, True),
    ("mixed", "v2", "merged", 0.9, False),
)


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


# --- engines -------------------------------------------------------------------------------


def engine_files(root: Path, tasks: Sequence[str]) -> dict[str, Path]:
    """``{model name: file}`` of the benchmark's engines under ``root``."""
    files = {"v1": root / "v1.onnx", "v2": root / "v2.onnx", "merged": root / "merged.onnx"}
    return {**files, **{f"expert-{t}": root / f"expert-{t}.onnx" for t in tasks}}


def build_engines(
    config: ServeBenchConfig, root: Path, log: Callable[[str], None]
) -> dict[str, Path]:
    """The benchmark's engines in ``root``: those there already (``v2.onnx`` names the tasks:
    then every engine must be there, e.g. exported from a run), or all of them exported with
    random weights at ``config.arch``."""
    given = root / "v2.onnx"
    if given.is_file():
        files = engine_files(root, read_onnx_metadata(given).tasks)
        missing = [p.name for p in files.values() if not p.is_file()]
        if missing:
            raise ConfigError(
                f"{root} holds v2.onnx but not {missing}: give every engine of the benchmark "
                "(v1, v2, merged and one expert per task of v2), or an empty folder to build "
                "them with random weights."
            )
        return files
    import torch  # deferred: only building engines needs torch

    from surgery_edge.export.onnx import export_onnx  # deferred: imports torch
    from surgery_edge.models import get_arch  # deferred: imports torch
    from surgery_edge.surgery.model import MultiTaskModel  # deferred: imports torch

    parts = Parts.random(get_arch(config.arch), config.tasks, config.seed)
    files = engine_files(root, parts.tasks)
    plans = {
        "v1": method_engines()[engine_name(SURGERY)],
        "v2": method_engines()[engine_name(SURGERY_V2)],
        "merged": ("merged", EngineMode.ROUTED),
    }
    cpu = torch.device("cpu")
    for name, path in sorted(files.items(), key=lambda item: item[0] == "v2"):  # v2 last
        log(f"exporting {path.name} ({config.arch}, random weights)")
        if name in plans:
            method, mode = plans[name]
            model = build_engine_model(parts, method, config.rank, cpu, torch.float32)
        else:  # one expert: its own encoder and head, answering its one task
            t = parts.tasks.index(name.removeprefix("expert-"))
            encoder = copy.deepcopy(parts.encoder)
            model, mode = (
                MultiTaskModel(encoder, [parts.heads[t]], [parts.tasks[t]]),
                EngineMode.ALL_TASKS,
            )
        export_onnx(model.eval(), path, mode, metadata={"benchmark": RANDOM_WEIGHTS_NOTE})
    return files


# --- load ----------------------------------------------------------------------------------


class _Requests:
    """The requests of one configuration: inputs prepared once per task, sent over gRPC."""

    def __init__(self, grpc, metas: dict[str, EngineMetadata], image: np.ndarray):
        self._grpc, self._metas, self._cache, self._outputs = grpc, metas, {}, {}
        self._image = image  # (1, 3, S, S) float32

    def outputs(self, model: str):
        """The one output each model is asked for: a routed engine's ``logits``, an expert's
        logits, the V1 engine's stacked ``logits`` (every task in one tensor, not eight)."""
        if model not in self._outputs:
            meta = self._metas[model]
            if meta.mode is EngineMode.ROUTED:
                name = "logits"
            else:
                name = meta.outputs[0] if len(meta.outputs) == 1 else STACKED_OUTPUT
            self._outputs[model] = [self._grpc.InferRequestedOutput(name)]
        return self._outputs[model]

    def inputs(self, model: str, task: int):
        key = (model, task)
        if key not in self._cache:
            first = self._grpc.InferInput("images", list(self._image.shape), "FP32")
            first.set_data_from_numpy(self._image)
            inputs = [first]
            if self._metas[model].mode is EngineMode.ROUTED:
                ids = self._grpc.InferInput("task_ids", [1, 1], "INT64")
                ids.set_data_from_numpy(np.full((1, 1), task, np.int64))
                inputs.append(ids)
            self._cache[key] = inputs
        return self._cache[key]


def _plan(workload: str, config: str, tasks: list[str]) -> tuple[list[str], Callable]:
    """The models a configuration uses, and ``route(rng) -> [(model, task id)]``: the calls
    that answer one request."""
    experts = [f"expert-{t}" for t in tasks]
    if workload == "all-tasks":
        if config == "v1":
            return ["v1"], lambda rng: [("v1", 0)]
        return experts, lambda rng: [(m, 0) for m in experts]
    if config == "experts":
        return experts, lambda rng: [(experts[int(rng.integers(len(tasks)))], 0)]
    return [config], lambda rng: [(config, int(rng.integers(len(tasks))))]


async def _load(
    url: str, requests: _Requests, route: Callable, concurrency: int, until: float, seed: int
) -> list[tuple[float, float, bool]]:
    """Closed-loop clients until ``until`` (monotonic); returns (start, end, ok) per request."""
    import tritonclient.grpc.aio as aio  # deferred: optional, the serve extra

    done: list[tuple[float, float, bool]] = []
    async with aio.InferenceServerClient(url) as client:

        async def user(k: int) -> None:
            rng = np.random.default_rng(seed * 1000 + k)
            while time.monotonic() < until:
                calls = route(rng)
                start = time.monotonic()
                try:
                    await asyncio.gather(
                        *(
                            client.infer(m, requests.inputs(m, t), outputs=requests.outputs(m))
                            for m, t in calls
                        )
                    )
                    ok = True
                except Exception:  # a failed request is counted, the load goes on
                    ok = False
                done.append((start, time.monotonic(), ok))

        await asyncio.gather(*(user(k) for k in range(concurrency)))
    return done


def _counters(metrics_url: str, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {labels: float(v) for labels, v in re.findall(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M)}


def _label(labels: str, key: str) -> str:
    return re.search(rf'{key}="([^"]*)"', labels)[1]


# --- memory --------------------------------------------------------------------------------


def server_processes() -> dict[int, str | None]:
    """This process's server: ``{pid: model}`` of its descendants (tritonserver and the
    Python-backend stubs; ``None`` for processes that serve no one model)."""
    out = {}
    for process in psutil.Process().children(recursive=True):
        try:
            args = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        stub = args and args[0].endswith("triton_python_backend_stub") and len(args) > 1
        out[process.pid] = Path(args[1]).parent.parent.name if stub else None  # <model>/1/model.py
    return out


def _rss(pid: int) -> int:
    """The resident set size of ``pid`` in bytes (``VmRSS``), 0 once it has exited."""
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


class _MemorySampler:
    """Peak RSS of the server (total, and per model) while a window runs; the process tree is
    read once, then only the RSS of its processes, so sampling costs the load next to nothing."""

    def __init__(self, processes: dict[int, str | None], period_s: float = 0.5):
        self.period_s, self.total, self.models = period_s, 0, {}
        self._processes = processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            rss = {pid: _rss(pid) for pid in self._processes}
            self.total = max(self.total, sum(rss.values()))
            per_model: dict[str, int] = {}
            for pid, model in self._processes.items():
                if model is not None:
                    per_model[model] = per_model.get(model, 0) + rss[pid]
            for m, value in per_model.items():
                self.models[m] = max(self.models.get(m, 0), value)
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> _MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of ``pids`` (every thread of each, not their children's), in
    seconds; a process that has exited counts nothing."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += times.user + times.system
    return total


def _stolen_seconds() -> float:
    """CPU time the hypervisor gave to others, summed over this machine's CPUs (``steal``, Linux
    only): on a shared virtual machine, what makes one run slower than the next."""
    return getattr(psutil.cpu_times(), "steal", 0.0)


class _CpuClock:
    """The CPU time the server's processes and this process (the clients) spend between two
    moments (monotonic), and the time stolen from the machine, read by a thread of its own."""

    def __init__(self, pids: Sequence[int], start: float, end: float):
        self.server_s = self.client_s = self.stolen_s = 0.0
        self._pids = list(pids)
        self._marks = (start, end)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> tuple[float, float, float]:
        return _cpu_seconds(self._pids), time.process_time(), _stolen_seconds()

    def _run(self) -> None:
        readings = []
        for mark in self._marks:
            time.sleep(max(0.0, mark - time.monotonic()))
            readings.append(self._read())
        self.server_s, self.client_s, self.stolen_s = (b - a for a, b in zip(*readings))

    def __enter__(self) -> _CpuClock:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join()


# --- one measurement -----------------------------------------------------------------------


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


def measure_window(
    server,
    requests: _Requests,
    models: list[str],
    route: Callable,
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
    before = _counters(server.metrics_url, name)
    processes = server_processes()
    start = time.monotonic()
    window = (start + cfg.warmup_s, start + cfg.warmup_s + cfg.seconds)
    with _MemorySampler(processes) as memory, _CpuClock(processes, *window) as cpu:
        done = asyncio.run(
            _load(server.grpc_url, requests, route, concurrency, window[1], cfg.seed)
        )
    time.sleep(2 * FLUSH_S)
    after = _counters(server.metrics_url, name)
    inside = [(s, e, ok) for s, e, ok in done if window[0] <= e <= window[1]]
    histogram: dict[int, int] = {}
    mix: dict[str, int] = {}
    for labels, value in after.items():
        calls = int(round(value - before.get(labels, 0.0)))
        if _label(labels, "model") not in models or calls <= 0:
            continue
        rows, tasks_in_call = int(_label(labels, "rows")), _label(labels, "tasks")
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

    def per_request(cpu_s: Callable[[Window], float]) -> float | None:
        answered = [w for w in windows if w.latencies_ms]
        if not answered:
            return None
        return statistics.median(cpu_s(w) / len(w.latencies_ms) * 1e3 for w in answered)

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
        p50_ms=_percentile(latencies, 50),
        p99_ms=_percentile(latencies, 99),
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
    )


def _percentile(sorted_ms: list[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    return float(np.percentile(np.asarray(sorted_ms), q, method="higher"))


def run_serve_bench(
    cfg: ServeBenchConfig, engines: dict[str, Path], log: Callable[[str], None] | None = None
) -> list[ServeResult]:
    """Serve ``engines`` in one server and measure every workload at every concurrency."""
    from surgery_edge.runtime.serving import ServeOptions, Server  # deferred: PyTriton
    from surgery_edge.runtime.triton_config import check_model_name  # deferred: with serving

    log = log or (lambda msg: None)
    for name in engines:
        check_model_name(name)
    options = ServeOptions(
        http_port=_free_port(),
        grpc_port=_free_port(),
        metrics_port=_free_port(),
        max_batch=cfg.max_batch,
        max_queue_delay_us=cfg.max_queue_delay_us,
        device="cpu",
        threads=cfg.threads,
        instances=cfg.instances,
        task_models=False,
        drain_timeout_s=5,
    )
    results = []
    with Server(engines, options) as server:
        log(f"serving {len(engines)} models: {', '.join(server.models)}")
        import tritonclient.grpc as grpc  # deferred: optional, the serve extra

        size = next(iter(server.metadata.values())).preprocessing.image_size
        image = np.random.default_rng(cfg.seed).normal(size=(1, 3, size, size))
        requests = _Requests(grpc, server.metadata, image.astype(np.float32))
        tasks = list(server.metadata["v2" if "v2" in server.metadata else "v1"].tasks)
        # The configurations compared at one concurrency take turns, window by window, so
        # that a shared machine's drifting load touches them alike; each point reports the
        # median of its windows.
        for workload, configs in WORKLOADS.items():
            answers = len(tasks) if workload == "all-tasks" else 1
            for concurrency in cfg.concurrency:
                plans = {c: _plan(workload, c, tasks) for c in configs}
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
                        f"  {workload:9s} {config:8s} c={concurrency:<3d} "
                        f"{r.requests_per_s:8.1f} req/s {r.rates}  p50 {fmt(r.p50_ms, '.2f')} ms  "
                        f"p99 {fmt(r.p99_ms, '.2f')} ms  rows/call "
                        f"{fmt(r.mean_rows_per_call, '.2f')}  cores {fmt(r.cores_busy, '.2f')}  "
                        f"stolen {fmt(r.cores_stolen, '.2f')}  errors {r.errors}"
                    )
                    results.append(r)
    return results


def _free_port() -> int:
    import socket  # deferred: only here

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- report --------------------------------------------------------------------------------


def targets(results: list[ServeResult]) -> list[dict[str, Any]]:
    """Each target at each concurrency: the request-rate ratio, the p99s, and whether it holds."""
    by_key = {(r.workload, r.config, r.concurrency): r for r in results}
    out = []
    for workload, engine, baseline, least, p99_no_worse in TARGETS:
        for c in sorted({r.concurrency for r in results}):
            a, b = by_key.get((workload, engine, c)), by_key.get((workload, baseline, c))
            if a is None or b is None or not b.requests_per_s:
                continue
            ratio = a.requests_per_s / b.requests_per_s
            cpu = [_cpu_per_request(a), _cpu_per_request(b)]
            p99_ok = a.p99_ms is not None and b.p99_ms is not None and a.p99_ms <= b.p99_ms
            out.append(
                {
                    "target": f"{workload}: {engine} >= {least}x the request rate of {baseline}"
                    + (", p99 no higher" if p99_no_worse else ""),
                    "concurrency": c,
                    "ratio": round(ratio, 3),
                    "p99_ms": [a.p99_ms, b.p99_ms],
                    # the ratio = (baseline's CPU per request / the engine's) x (the cores each
                    # kept busy): what sharing the backbone saves, and what the load let it use
                    "cpu_ms_per_request": cpu,
                    "cpu_ratio": round(cpu[1] / cpu[0], 3) if None not in cpu else None,
                    "cores_busy": [a.cores_busy, b.cores_busy],
                    "met": bool(ratio >= least and (p99_ok or not p99_no_worse)),
                }
            )
    return out


def _cpu_per_request(r: ServeResult) -> float | None:
    if r.server_cpu_ms_per_request is None or r.client_cpu_ms_per_request is None:
        return None
    return r.server_cpu_ms_per_request + r.client_cpu_ms_per_request


LABELS = {
    ("all-tasks", "v1"): "V1 engine (1 request = all tasks)",
    ("all-tasks", "experts"): "{tasks} expert models (1 request = one call to each)",
    ("mixed", "v2"): "V2 engine, routed",
    ("mixed", "merged"): "merged backbone alone, routed",
    ("mixed", "experts"): "the task's expert model",
}


def markdown(record: dict[str, Any]) -> str:
    """The results as Markdown: settings, one table per workload, the targets."""
    cfg, env = record["config"], record["environment"]
    lines = [
        f"# Serving benchmark: {cfg['arch']}, {cfg['tasks']} tasks, one Triton server",
        "",
        f"`{record['command']}`",
        "",
        f"- {env['device_name']}; load average before {record['loadavg_before']}, after "
        f"{record['loadavg_after']} (1/5/15 min; a shared machine: other work ran too)",
        f"- one tritonserver (PyTriton {record['pytriton']}), Python-backend models over ONNX "
        f"Runtime {env['onnxruntime']}, {cfg['instances']} instance(s) of each model, "
        f"{cfg['threads']} thread(s) per instance; dynamic batching: "
        f"max batch {cfg['max_batch']}, queue delay {cfg['max_queue_delay_us']} us",
        f"- closed-loop gRPC clients on the same machine; per point {cfg['repeats']} windows of "
        f"{cfg['seconds']} s (each after {cfg['warmup_s']} s of warm-up), taken in turns with the "
        "configurations it is compared with; req/s is their median (the windows' range beside "
        "it), the latencies pool them",
        "- CPU: user + system time in the windows of tritonserver, every stub and the client "
        "process, per answered request (server + client) and as cores kept busy (medians over "
        "the windows); req/s = cores busy / CPU per request; stolen: the cores' worth of time the "
        "hypervisor gave to other machines (`steal` in /proc/stat). A slow phase of a shared "
        "machine need not show as steal: it shows as more CPU per request than another run's",
        "- engines with random weights at the demo's architecture (timing only)",
        "",
    ]
    header = [
        "configuration",
        "clients",
        "req/s",
        "windows req/s",
        "answers/s",
        "p50 ms",
        "p99 ms",
        "rows/call",
        "batch sizes (rows: calls)",
        "tasks per call",
        "CPU ms/req (server + client)",
        "cores busy",
        "stolen",
        "models RSS MB",
        "server RSS MB",
    ]
    for workload in WORKLOADS:
        rows = []
        for r in (r for r in record["results"] if r["workload"] == workload):
            hist = " ".join(f"{k}:{v}" for k, v in r["batch_histogram"].items())
            mix = " ".join(f"{k}:{v}" for k, v in r["task_mix"].items())
            mix = mix if r["config"] != "experts" else "—"  # one task per expert model
            rows.append(
                [
                    LABELS[(workload, r["config"])].format(tasks=cfg["tasks"]),
                    str(r["concurrency"]),
                    fmt(r["requests_per_s"], ".1f"),
                    f"{min(r['rates']):.0f}–{max(r['rates']):.0f}" if r["rates"] else "—",
                    fmt(r["requests_per_s"] * r["answers_per_request"], ".1f"),
                    fmt(r["p50_ms"], ".2f"),
                    fmt(r["p99_ms"], ".2f"),
                    fmt(r["mean_rows_per_call"], ".2f"),
                    hist or "—",
                    mix or "—",
                    _cpu_cell(r),
                    fmt(r["cores_busy"], ".2f"),
                    fmt(r["cores_stolen"], ".2f"),
                    fmt(r["models_rss_mb"], ".0f"),
                    fmt(r["server_rss_mb"], ".0f"),
                ]
            )
        title = "every task for each image" if workload == "all-tasks" else "a mixed-task stream"
        lines += [f"## {workload}: {title}", "", *table(header, rows), ""]
    lines += ["## Targets", ""]
    rows = [
        [
            t["target"],
            str(t["concurrency"]),
            f"{t['ratio']:.2f}x",
            " / ".join(fmt(p, ".2f") for p in t["p99_ms"]),
            f"{t['cpu_ratio']:.2f}x" if t["cpu_ratio"] is not None else "—",
            " / ".join(fmt(c, ".2f") for c in t["cores_busy"]),
            "met" if t["met"] else "not met",
        ]
        for t in record["targets"]
    ]
    header = ["target", "clients", "ratio", "p99 ms (engine / baseline)"]
    header += ["CPU per request (baseline / engine)", "cores busy (engine / baseline)", ""]
    lines += table(header, rows)
    return "\n".join(lines) + "\n"


def _cpu_cell(r: dict[str, Any]) -> str:
    server, client = r["server_cpu_ms_per_request"], r["client_cpu_ms_per_request"]
    if server is None or client is None:
        return "—"
    return f"{server + client:.2f} ({server:.2f} + {client:.2f})"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    d = ServeBenchConfig()
    p.add_argument("--arch", default=d.arch)
    p.add_argument("--tasks", type=int, default=d.tasks)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--concurrency", type=int, nargs="+", default=list(d.concurrency))
    p.add_argument("--seconds", type=float, default=d.seconds, help="measured window per point")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s)
    p.add_argument("--repeats", type=int, default=d.repeats, help="windows per point")
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--max-queue-delay-us", type=int, default=d.max_queue_delay_us)
    p.add_argument("--threads", type=int, default=d.threads, help="ONNX Runtime threads/model")
    p.add_argument("--instances", type=int, default=d.instances, help="instances of each model")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--engines", type=Path, help="folder of the engines (built there if missing)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Build or reuse the engines, serve them, load them, write ``serve-<arch>.json`` and
    ``.md`` under ``--out``; returns the record."""
    import tempfile  # deferred: only the command line needs a scratch folder

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if min(args.tasks, args.repeats, args.instances, *args.concurrency) < 1 or args.seconds <= 0:
        parser.error("--tasks, --repeats, --instances, --concurrency, --seconds must be positive")
    cfg = ServeBenchConfig(
        arch=args.arch,
        tasks=args.tasks,
        rank=args.rank,
        concurrency=tuple(args.concurrency),
        seconds=args.seconds,
        warmup_s=args.warmup_s,
        repeats=args.repeats,
        max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
        threads=args.threads,
        instances=args.instances,
        seed=args.seed,
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as scratch:
        root = args.engines or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        try:
            engines = build_engines(cfg, root, log)
            results = run_serve_bench(cfg, engines, log)
        except SurgeryEdgeError as e:  # a user error: one paragraph, exit 2, no traceback
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    record = {
        "benchmark": "serve",
        "command": command_line(argv, prog or f"{__name__}.main"),
        "environment": environment("cpu"),
        "pytriton": _version("nvidia-pytriton"),
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "config": asdict(cfg),
        "note": RANDOM_WEIGHTS_NOTE,
        "results": [asdict(r) for r in results],
        "targets": targets(results),
    }
    write_record_set(args.out, f"serve-{cfg.arch}", record, markdown(record))
    print(markdown(record))
    return record


def _version(distribution: str) -> str | None:
    import importlib.metadata  # deferred: only the record needs it

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None

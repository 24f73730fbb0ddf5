"""A version roll under load: latency while ``serve REPO --watch`` rolls to a new engine version.

One server (``surgery-edge serve``'s :class:`~surgery_edge.runtime.rolling.VersionedServer`,
Python-backend models over ONNX Runtime on the CPU) serves version 1 of a model folder while
bench_serve's closed-loop client (:mod:`surgery_edge.bench.serve`: ``concurrency`` gRPC
clients, each sending its next request when the last is answered) sends a steady mixed-task
stream to the engine model: one image per request, for a task drawn at random. While the load
runs, the engines given are published into the folder in turn (``--rolls`` times: version 2,
3, ...; each with the repository writer, as ``export --triton-repo`` does, on the serving
machine), and the server picks each up and rolls to it. The load never stops; it is cut into:

- ``steady``: the requests that started and ended in the ``--steady-s`` before a publication;
- ``roll``: those that were in flight at any time from the publication's start (the writer
  copies and hashes the engine) until the new version serves (the server has opened the new
  engine, Triton has loaded it and switched to it);

and the benchmark reports, per roll and over every roll, the p50 / p99 of each part, the failed
requests, and the target: no failed request and the roll's p99 at most twice the steady p99.

    python benchmarks/bench_roll.py --engine runs/demo/engines/surgeryv2-routed.onnx \\
        --rolls 4 --out benchmarks/results/cpu
    python benchmarks/bench_roll.py --arch tiny-vit-32 --tasks 7 8 --engines /tmp/roll \\
        --out benchmarks/results/cpu      # SurgeryV2 engines of 7 and 8 tasks, random weights

The engines are published in turn (7 tasks, 8, 7, ...: a task added, then dropped; the load asks
for the tasks every version has), or one engine again and again (each publication then uses
another Triton instance count in the repository's ``config.pbtxt``, a setting of the official
container that ``serve`` does not read, so that the writer adds a version rather than finding
the newest one unchanged). ``--tasks`` builds routed SurgeryV2 engines of the demo's
architecture and class counts with random weights (timing only, as bench_serve's), one per
count, the smaller ones holding the first tasks of the largest. Outputs under ``--out``:
``serve-roll-<arch>.json`` (the command, the environment, every roll's timings) and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from surgery_edge.bench.env import environment
from surgery_edge.bench.proc import cpu_seconds, package_version, server_processes
from surgery_edge.bench.report import command_line, fmt, table, write_record_set
from surgery_edge.bench.serve_load import Requests
from surgery_edge.bench.serve_measure import free_port, percentile
from surgery_edge.errors import SurgeryEdgeError
from surgery_edge.surgery.methods import SURGERY_V2

TARGET_RATIO = 2.0  # the roll's p99 over the steady p99, at most (issue 39)


@dataclass(frozen=True)
class RollBenchConfig:
    """What to serve and how to load it."""

    concurrency: int = 4
    steady_s: float = 20.0  # load before each publication, measured
    settle_s: float = 5.0  # load after the last roll, so its tail is answered
    rolls: int = 3
    max_batch: int = 32
    max_queue_delay_us: int = 0
    threads: int = 1  # ONNX Runtime threads per engine instance
    instances: int = 1
    poll_s: float = 0.5  # how often the server looks for a new version
    seed: int = 0


@dataclass
class Roll:
    """One publication and the roll that followed, and the load around them."""

    version: int
    engine: str
    publish_s: float  # the writer: copy, hash, check, rename
    roll_s: float  # from the publication's start until the new version served
    steady_requests: int
    steady_p50_ms: float | None
    steady_p99_ms: float | None
    roll_requests: int
    roll_p50_ms: float | None
    roll_p99_ms: float | None
    roll_max_ms: float | None
    failed: int  # over the steady part and the roll
    # cores kept busy (CPU seconds per second): the server's processes, the machine's (every
    # process, other users' too); and the CPU the new version's engine stub spent in the roll
    steady_server_cores: float | None = None
    roll_server_cores: float | None = None
    steady_machine_cores: float | None = None
    roll_machine_cores: float | None = None
    new_engine_cpu_s: float | None = None


class _CpuSampler:
    """CPU time of each of the server's processes (those that start during the load too) and
    of the whole machine, read every ``period_s`` by a thread of its own."""

    def __init__(self, period_s: float = 0.25):
        self.samples: list[tuple[float, dict[int, float], float]] = []  # (t, {pid: s}, machine)
        self.models: dict[int, str | None] = {}  # pid -> its model (None: tritonserver)
        self.born: dict[int, float] = {}  # pid -> when it was first seen
        self._period_s, self._stop = period_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            for pid, model in server_processes().items():
                self.models.setdefault(pid, model)
                self.born.setdefault(pid, now if self.samples else -math.inf)  # there before
            machine = psutil.cpu_times()
            busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
            self.samples.append((now, {p: cpu_seconds([p]) for p in self.models}, busy))
            if self._stop.wait(self._period_s):
                return

    def cores(self, start: float, end: float) -> tuple[float | None, float | None]:
        """Cores the server and the machine kept busy from ``start`` to ``end``."""
        inside = [x for x in self.samples if start <= x[0] <= end]
        if len(inside) < 2:
            return None, None
        (t0, first, busy0), (t1, last, busy1) = inside[0], inside[-1]
        server = sum(max(0.0, v - first.get(p, 0.0)) for p, v in last.items())
        return server / (t1 - t0), (busy1 - busy0) / (t1 - t0)

    def new_engine_cpu(self, start: float, end: float) -> float | None:
        """CPU seconds of the engine stubs born from ``start`` to ``end``, by ``end``."""
        born = [p for p, t in self.born.items() if start <= t <= end and self.models[p]]
        inside = [x for x in self.samples if x[0] <= end]
        if not inside:
            return None
        return sum(inside[-1][1].get(p, 0.0) for p in born if self.models[p] == "engine")

    def __enter__(self) -> _CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def build_task_set_engines(
    arch: str, task_counts: Sequence[int], rank: int, root: Path, log: Callable[[str], None]
) -> list[Path]:
    """Routed SurgeryV2 engines of ``arch`` with random weights, one per task count (the
    same backbone and heads: a smaller one holds the first tasks of the largest), in
    ``root`` (those there already are reused)."""
    files = [root / f"surgeryv2-{n}-tasks.onnx" for n in task_counts]
    if all(f.is_file() for f in files):
        return files
    import torch  # deferred: only building engines needs torch

    # deferred with torch: building engines imports the model code
    from surgery_edge.bench.workloads import RANDOM_WEIGHTS_NOTE, Parts, build_engine_model
    from surgery_edge.engine_format import EngineMode
    from surgery_edge.export.onnx import export_onnx  # deferred: imports torch
    from surgery_edge.models import get_arch  # deferred: imports torch

    root.mkdir(parents=True, exist_ok=True)
    parts = Parts.random(get_arch(arch), max(task_counts), seed=0)
    for n, path in zip(task_counts, files):
        log(f"exporting {path.name} ({arch}, {n} tasks, random weights)")
        some = Parts(parts.arch, parts.encoder, parts.heads[:n], parts.tasks[:n])
        torch.manual_seed(n)
        model = build_engine_model(some, SURGERY_V2, rank, torch.device("cpu"), torch.float32)
        export_onnx(
            model.eval(), path, EngineMode.ROUTED, metadata={"benchmark": RANDOM_WEIGHTS_NOTE}
        )
    return files


def _part(
    done: list[tuple[float, float, bool]], start: float, end: float, overlap: bool
) -> tuple[list[float], int]:
    """The latencies (ms) of the answered requests in ``[start, end]`` (inside it, or, with
    ``overlap``, in flight at some time in it), and how many there failed."""
    if overlap:
        inside = [(s, e, ok) for s, e, ok in done if s <= end and e >= start]
    else:
        inside = [(s, e, ok) for s, e, ok in done if s >= start and e <= end]
    return sorted((e - s) * 1e3 for s, e, ok in inside if ok), sum(1 for *_, ok in inside if not ok)


def run_roll_bench(
    cfg: RollBenchConfig,
    engines: Sequence[Path],
    folder: Path,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Roll], dict[str, Any]]:
    """Serve ``engines[0]`` from ``folder``, load it, publish ``cfg.rolls`` versions (the
    engines in turn) and time each roll; returns the rolls and the run's totals."""
    import tritonclient.grpc as grpc  # deferred: optional, the serve extra

    # deferred with tritonclient: the serving modules need the serve extra
    from surgery_edge.engine_format import read_onnx_metadata
    from surgery_edge.export.triton import TritonOptions, write_repository
    from surgery_edge.runtime.rolling import VersionedServer
    from surgery_edge.runtime.serving import ServeOptions

    log = log or (lambda msg: None)
    name = "engine"

    def publish(k: int) -> None:  # k-th publication: the engines in turn, instances alternate
        options = TritonOptions(name="m", kind="cpu", instances=1 + k % 2)
        write_repository(engines[k % len(engines)], folder, options)

    publish(0)
    options = ServeOptions(http_port=free_port(), grpc_port=free_port(),
                           metrics_port=free_port(), name=name, max_batch=cfg.max_batch,
                           max_queue_delay_us=cfg.max_queue_delay_us, device="cpu",
                           threads=cfg.threads, instances=cfg.instances, task_models=False,
                           drain_timeout_s=5, startup_timeout_s=600)  # fmt: skip
    served: dict[int, float] = {}  # version -> when it served
    with VersionedServer(folder / "m", options, watch=True, poll_s=cfg.poll_s, log=log) as server:
        served[server.version] = time.monotonic()
        meta = server.metadata[name]
        common = min(len(read_onnx_metadata(e).tasks) for e in engines)  # the first tasks
        log(f"serving version {server.version}: {meta.tasks} ({meta.precision})")
        size = meta.preprocessing.image_size
        image = np.random.default_rng(cfg.seed).normal(size=(1, 3, size, size))
        requests = Requests(grpc, server.metadata, image.astype(np.float32))

        def route(rng: np.random.Generator) -> list[tuple[str, int]]:
            return [(name, int(rng.integers(common)))]

        marks: list[tuple[int, float, float]] = []  # (version, publication start, its end)
        failure: list[BaseException] = []

        def publisher() -> None:
            try:
                for k in range(1, cfg.rolls + 1):
                    time.sleep(cfg.steady_s)
                    before = time.monotonic()
                    publish(k)
                    marks.append((k + 1, before, time.monotonic()))
                    log(f"published version {k + 1} in {marks[-1][2] - before:.1f} s")
                    while server.version < k + 1:
                        if time.monotonic() - before > 600:
                            raise TimeoutError(f"version {k + 1} did not serve in 600 s")
                        time.sleep(0.01)
                    served[k + 1] = time.monotonic()
                    log(f"version {k + 1} served {served[k + 1] - before:.1f} s after")
                time.sleep(cfg.settle_s)
            except BaseException as e:  # reported by the caller
                failure.append(e)
            finally:
                stopping.set()

        stopping = threading.Event()
        thread = threading.Thread(target=publisher, daemon=True)
        with _CpuSampler() as cpu:
            thread.start()
            done = asyncio.run(
                _load_until(server.grpc_url, requests, route, cfg.concurrency, stopping, cfg.seed)
            )
            thread.join()
        if failure:
            raise failure[0]
    rolls = []
    for version, published_at, published_end in marks:
        steady, steady_failed = _part(done, published_at - cfg.steady_s, published_at, False)
        during, roll_failed = _part(done, published_at, served[version], True)
        steady_cores = cpu.cores(published_at - cfg.steady_s, published_at)
        roll_cores = cpu.cores(published_at, served[version])
        rolls.append(
            Roll(
                version=version,
                engine=str(engines[(version - 1) % len(engines)]),
                publish_s=published_end - published_at,
                roll_s=served[version] - published_at,
                steady_requests=len(steady),
                steady_p50_ms=percentile(steady, 50),
                steady_p99_ms=percentile(steady, 99),
                roll_requests=len(during),
                roll_p50_ms=percentile(during, 50),
                roll_p99_ms=percentile(during, 99),
                roll_max_ms=during[-1] if during else None,
                failed=steady_failed + roll_failed,
                steady_server_cores=steady_cores[0],
                roll_server_cores=roll_cores[0],
                steady_machine_cores=steady_cores[1],
                roll_machine_cores=roll_cores[1],
                new_engine_cpu_s=cpu.new_engine_cpu(published_at, served[version]),
            )
        )
    steady_all = sorted(x for _, p, _ in marks for x in _part(done, p - cfg.steady_s, p, False)[0])
    roll_all = sorted(x for v, p, _ in marks for x in _part(done, p, served[v], True)[0])
    totals = {
        "requests": len(done),
        "failed": sum(1 for *_, ok in done if not ok),
        "seconds": done[-1][1] - done[0][0] if done else 0.0,
        "steady_requests": len(steady_all),
        "steady_p50_ms": percentile(steady_all, 50),
        "steady_p99_ms": percentile(steady_all, 99),
        "roll_requests": len(roll_all),
        "roll_p50_ms": percentile(roll_all, 50),
        "roll_p99_ms": percentile(roll_all, 99),
        "load_tasks": list(meta.tasks[:common]),  # what the load asks for
        "task_counts": [len(read_onnx_metadata(e).tasks) for e in engines],
    }
    ratio = _ratio(totals["roll_p99_ms"], totals["steady_p99_ms"])
    totals["p99_ratio"] = ratio
    each = [_ratio(r.roll_p99_ms, r.steady_p99_ms) for r in rolls]
    totals["roll_p99_ratios"] = each
    totals["rolls_within_target"] = sum(1 for x in each if x is not None and x <= TARGET_RATIO)
    totals["target"] = {
        "what": f"0 failed requests and roll p99 <= {TARGET_RATIO:g}x steady p99",
        "met": totals["failed"] == 0 and ratio is not None and ratio <= TARGET_RATIO,
    }
    return rolls, totals


async def _load_until(
    url: str,
    requests: Requests,
    route: Callable,
    concurrency: int,
    stopping: threading.Event,
    seed: int,
) -> list[tuple[float, float, bool]]:
    """The closed loop of bench_serve's ``_load`` (its requests, one in flight per client),
    written again to run until ``stopping`` is set rather than until a time known in advance
    (a roll's length is not); (start, end, ok) per request."""
    import tritonclient.grpc.aio as aio  # deferred: optional, the serve extra

    done: list[tuple[float, float, bool]] = []
    async with aio.InferenceServerClient(url) as client:

        async def user(k: int) -> None:
            rng = np.random.default_rng(seed * 1000 + k)
            while not stopping.is_set():
                ((model, task),) = route(rng)
                start = time.monotonic()
                try:
                    await client.infer(
                        model, requests.inputs(model, task), outputs=requests.outputs(model)
                    )
                    ok = True
                except Exception:  # a failed request is counted, the load goes on
                    ok = False
                done.append((start, time.monotonic(), ok))

        await asyncio.gather(*(user(k) for k in range(concurrency)))
    return done


# --- report --------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def markdown(record: dict[str, Any]) -> str:
    """The record as a page: the verdict, every roll, what the parts are."""
    t, cfg = record["totals"], record["config"]
    met = "met" if t["target"]["met"] else "**not met**"
    lines = [
        f"# A version roll under load ({record['arch']}, CPU timings)",
        "",
        f"CPU timings: {record['environment']['device_name']}, ONNX Runtime "
        f"{record['environment']['onnxruntime']}, PyTriton {record['pytriton']}; load average "
        f"{record['loadavg_before']} before, {record['loadavg_after']} after (a shared machine: "
        "the ratio of two parts of one load matters, not the absolute times).",
        "",
        f"{cfg['concurrency']} closed-loop gRPC clients send one image each to the routed "
        f"engine (versions of {' / '.join(str(n) for n in t['task_counts'])} tasks in turn; "
        f"a task at random per request among the {len(t['load_tasks'])} every version has) for "
        f"{t['seconds']:.0f} s; {cfg['rolls']} versions are published meanwhile, each after "
        f"{cfg['steady_s']:g} s of steady load, and served by `serve REPO --watch` "
        f"(poll every {cfg['poll_s']:g} s). Steady: the requests in the {cfg['steady_s']:g} s "
        "before a publication; roll: those in flight at any time from the publication's start "
        "until the new version served.",
        "",
        f"Target ({t['target']['what']}): {met}. {t['requests']} requests, {t['failed']} failed; "
        f"p99 steady {fmt(t['steady_p99_ms'], '.1f')} ms ({t['steady_requests']} requests), "
        f"during the rolls {fmt(t['roll_p99_ms'], '.1f')} ms ({t['roll_requests']} requests): "
        f"{fmt(t['p99_ratio'], '.2f')}x over every roll; roll by roll, {t['rolls_within_target']} "
        f"of {len(record['rolls'])} within {TARGET_RATIO:g}x.",
        "",
    ]
    header = ["version", "publish s", "roll s", "steady n", "steady p50", "steady p99",
              "roll n", "roll p50", "roll p99", "roll max", "p99 ratio", "failed",
              "server cores steady / roll", "machine cores steady / roll",
              "new engine stub CPU s"]  # fmt: skip
    rows = [
        [
            str(r["version"]),
            fmt(r["publish_s"], ".1f"),
            fmt(r["roll_s"], ".1f"),
            str(r["steady_requests"]),
            fmt(r["steady_p50_ms"], ".1f"),
            fmt(r["steady_p99_ms"], ".1f"),
            str(r["roll_requests"]),
            fmt(r["roll_p50_ms"], ".1f"),
            fmt(r["roll_p99_ms"], ".1f"),
            fmt(r["roll_max_ms"], ".1f"),
            fmt(_ratio(r["roll_p99_ms"], r["steady_p99_ms"]), ".2f"),
            str(r["failed"]),
            f"{fmt(r['steady_server_cores'], '.2f')} / {fmt(r['roll_server_cores'], '.2f')}",
            f"{fmt(r['steady_machine_cores'], '.2f')} / {fmt(r['roll_machine_cores'], '.2f')}",
            fmt(r["new_engine_cpu_s"], ".2f"),
        ]
        for r in record["rolls"]
    ]
    lines += table(header, rows)
    lines += [
        "",
        "Latencies in ms; publish: the repository writer (copy, hash, check, rename); cores: "
        "CPU seconds per second of the server's processes (tritonserver and every stub, the new "
        "version's included) and of the whole machine (other users' processes too); new engine "
        "stub: the CPU the process that loads the new version spent by the time it served.",
    ]
    if record.get("note"):
        lines += ["", record["note"]]
    return "\n".join(lines) + "\n"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    d = RollBenchConfig()
    p.add_argument(
        "--engine", type=Path, nargs="+", help="engines published in turn; the first is version 1"
    )
    p.add_argument("--arch", help="else build engines of this architecture (random weights)")
    p.add_argument("--tasks", type=int, nargs="+", default=[7, 8], help="their task counts")
    p.add_argument("--rank", type=int, default=16, help="their adapters' rank")
    p.add_argument("--engines", type=Path, help="folder for the built engines (reused)")
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--steady-s", type=float, default=d.steady_s)
    p.add_argument("--settle-s", type=float, default=d.settle_s)
    p.add_argument("--rolls", type=int, default=d.rolls)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--max-queue-delay-us", type=int, default=d.max_queue_delay_us)
    p.add_argument("--threads", type=int, default=d.threads, help="ONNX Runtime threads")
    p.add_argument("--instances", type=int, default=d.instances)
    p.add_argument("--poll-s", type=float, default=d.poll_s)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--note", default="", help="a sentence recorded with the results")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Publish and roll ``--rolls`` versions under load; write ``serve-roll-<arch>.json`` and
    ``.md`` under ``--out``; returns the record."""
    from surgery_edge.engine_format import read_onnx_metadata  # deferred: the engine's arch

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if min(args.concurrency, args.rolls, args.instances, args.threads) < 1 or args.steady_s <= 0:
        parser.error("--concurrency, --rolls, --instances, --threads, --steady-s must be positive")
    if (args.engine is None) == (args.arch is None):
        parser.error("give --engine FILE... or --arch ARCH (engines built with random weights)")
    cfg = RollBenchConfig(
        concurrency=args.concurrency,
        steady_s=args.steady_s,
        settle_s=args.settle_s,
        rolls=args.rolls,
        max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
        threads=args.threads,
        instances=args.instances,
        poll_s=args.poll_s,
        seed=args.seed,
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            engines = args.engine or build_task_set_engines(
                args.arch, args.tasks, args.rank, args.engines or Path(scratch) / "engines", log
            )
            meta = read_onnx_metadata(engines[0])
            rolls, totals = run_roll_bench(cfg, engines, Path(scratch) / "repository", log)
    except SurgeryEdgeError as e:  # a user error: one paragraph, exit 2, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    arch = (meta.get("architecture") or {}).get("name", "engine")
    record = {
        "benchmark": "serve-roll",
        "command": command_line(argv, prog or f"{__name__}.main"),
        "environment": environment("cpu"),
        "pytriton": package_version("nvidia-pytriton"),
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "arch": arch,
        "engines": [str(e) for e in engines],
        "random_weights": args.engine is None,
        "config": asdict(cfg),
        "note": args.note,
        "totals": totals,
        "rolls": [asdict(r) for r in rolls],
    }
    write_record_set(args.out, f"serve-roll-{arch}", record, markdown(record))
    print(markdown(record))
    return record

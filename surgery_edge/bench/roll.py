"""A version roll under load: latency while ``serve REPO --watch`` rolls to a new engine version.

One server (``surgery-edge serve``'s :class:`~surgery_edge.runtime.rolling.VersionedServer`,
Python-backend models over ONNX Runtime on the CPU) serves version 1 of a model folder while
bench_serve's closed-loop client (:mod:`surgery_edge.bench.serve_load`: ``concurrency``
gRPC clients, each sending its next request when the last is answered) sends a steady mixed-task
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
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.bench.proc import ServerCpuSampler, load_average
from surgery_edge.bench.report import (
    command_line,
    config_from_args,
    fmt,
    table,
    user_errors_exit_2,
    write_record_set,
)
from surgery_edge.bench.serve_load import Requests, load, plan
from surgery_edge.bench.serve_measure import percentile, server_options
from surgery_edge.bench.serve_report import record_head
from surgery_edge.engine_format import read_onnx_metadata
from surgery_edge.export.triton import TritonOptions, write_repository
from surgery_edge.runtime.rolling import VersionedServer
from surgery_edge.surgery.methods import SURGERY_V2

TARGET_RATIO = 2.0  # the roll's p99 over the steady p99, at most (issue 39)
MODEL = "engine"  # the served engine model's name


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


@dataclass(frozen=True)
class _Observed:
    """What a run saw: every request, each publication, when each version served, the CPU."""

    done: list[tuple[float, float, bool]]  # (start, end, ok) per request, monotonic
    marks: list[tuple[int, float, float]]  # (version, publication start, its end)
    served: dict[int, float]  # version -> when it served
    cpu: ServerCpuSampler


def run_roll_bench(
    cfg: RollBenchConfig,
    engines: Sequence[Path],
    folder: Path,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Roll], dict[str, Any]]:
    """Serve ``engines[0]`` from ``folder``, load it, publish ``cfg.rolls`` versions (the
    engines in turn) and time each roll; returns the rolls and the run's totals."""
    import tritonclient.grpc as grpc  # deferred: optional, the serve extra

    log = log or (lambda msg: None)
    _publish(engines, folder, 0)
    options = server_options(cfg, name=MODEL, startup_timeout_s=600)
    with VersionedServer(folder / "m", options, watch=True, poll_s=cfg.poll_s, log=log) as server:
        meta = server.metadata[MODEL]
        task_counts = [len(read_onnx_metadata(e).tasks) for e in engines]
        common = min(task_counts)  # the first tasks: every version has them
        log(f"serving version {server.version}: {meta.tasks} ({meta.precision})")
        size = meta.preprocessing.image_size
        image = np.random.default_rng(cfg.seed).normal(size=(1, 3, size, size))
        requests = Requests(grpc, server.metadata, image.astype(np.float32))
        # a mixed-task stream: one image per request, for a task every version has
        _, route = plan("mixed", MODEL, list(meta.tasks[:common]))
        publisher = _Publisher(cfg, engines, folder, server, log)
        with ServerCpuSampler() as cpu:
            publisher.start()
            url, until = server.grpc_url, math.inf  # the publisher ends the load
            done = asyncio.run(
                load(url, requests, route, cfg.concurrency, until, cfg.seed, publisher.stop)
            )
            publisher.join()
    seen = _Observed(done, publisher.marks, publisher.served, cpu)
    rolls = [_roll(seen, cfg, engines, mark) for mark in seen.marks]
    return rolls, _totals(seen, cfg, rolls, list(meta.tasks[:common]), task_counts)


def _publish(engines: Sequence[Path], folder: Path, k: int) -> None:
    """The ``k``-th publication into ``folder``: the engines in turn, each with another
    instance count than the last (so that the writer adds a version for the same engine)."""
    options = TritonOptions(name="m", kind="cpu", instances=1 + k % 2)
    write_repository(engines[k % len(engines)], folder, options)


class _Publisher:
    """Publishes versions 2 to ``cfg.rolls + 1`` from a thread of its own while the load runs:
    each after ``cfg.steady_s`` of steady load, once the last one serves; then lets the load
    run ``cfg.settle_s`` more and sets :attr:`stop`. :attr:`marks` holds each publication's
    start and end, :attr:`served` when each version served."""

    def __init__(
        self,
        cfg: RollBenchConfig,
        engines: Sequence[Path],
        folder: Path,
        server: VersionedServer,
        log: Callable[[str], None],
    ):
        self.cfg, self.engines, self.folder = cfg, engines, folder
        self.server, self.log = server, log
        self.marks: list[tuple[int, float, float]] = []  # (version, publication start, end)
        self.served: dict[int, float] = {server.version: time.monotonic()}
        self.stop = threading.Event()
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Start publishing."""
        self._thread.start()

    def join(self) -> None:
        """Wait for the last roll and the settling load; raise what stopped the publisher."""
        self._thread.join()
        if self._failure:
            raise self._failure[0]

    def _run(self) -> None:
        try:
            for k in range(1, self.cfg.rolls + 1):
                time.sleep(self.cfg.steady_s)
                self._roll_to(k + 1)
            time.sleep(self.cfg.settle_s)
        except BaseException as e:  # raised again by join, in the caller's thread
            self._failure.append(e)
        finally:
            self.stop.set()

    def _roll_to(self, version: int) -> None:
        """Publish ``version`` and wait until it serves (600 s at the most)."""
        before = time.monotonic()
        _publish(self.engines, self.folder, version - 1)
        self.marks.append((version, before, time.monotonic()))
        self.log(f"published version {version} in {self.marks[-1][2] - before:.1f} s")
        while self.server.version < version:
            if time.monotonic() - before > 600:
                raise TimeoutError(f"version {version} did not serve in 600 s")
            time.sleep(0.01)
        self.served[version] = time.monotonic()
        self.log(f"version {version} served {self.served[version] - before:.1f} s after")


def _roll(
    seen: _Observed, cfg: RollBenchConfig, engines: Sequence[Path], mark: tuple[int, float, float]
) -> Roll:
    """One publication's roll: its steady part and its roll, their latencies, failures and CPU."""
    version, published_at, published_end = mark
    served = seen.served[version]
    steady, steady_failed = _part(seen.done, published_at - cfg.steady_s, published_at, False)
    during, roll_failed = _part(seen.done, published_at, served, True)
    steady_cores = seen.cpu.cores(published_at - cfg.steady_s, published_at)
    roll_cores = seen.cpu.cores(published_at, served)
    return Roll(
        version=version,
        engine=str(engines[(version - 1) % len(engines)]),
        publish_s=published_end - published_at,
        roll_s=served - published_at,
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
        new_engine_cpu_s=seen.cpu.new_process_cpu(published_at, served, MODEL),
    )


def _totals(
    seen: _Observed,
    cfg: RollBenchConfig,
    rolls: list[Roll],
    load_tasks: list[str],
    task_counts: list[int],
) -> dict[str, Any]:
    """The run's totals: every request, the steady parts and the rolls over every roll, the
    p99 ratios and the verdict; ``load_tasks`` and the versions' ``task_counts`` recorded."""
    done, marks = seen.done, seen.marks
    steady_all = sorted(x for _, p, _ in marks for x in _part(done, p - cfg.steady_s, p, False)[0])
    roll_all = sorted(x for v, p, _ in marks for x in _part(done, p, seen.served[v], True)[0])
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
        "load_tasks": load_tasks,  # what the load asks for
        "task_counts": task_counts,
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
    return totals


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
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if min(args.concurrency, args.rolls, args.instances, args.threads) < 1 or args.steady_s <= 0:
        parser.error("--concurrency, --rolls, --instances, --threads, --steady-s must be positive")
    if (args.engine is None) == (args.arch is None):
        parser.error("give --engine FILE... or --arch ARCH (engines built with random weights)")
    cfg = config_from_args(RollBenchConfig, args)
    log = partial(print, file=sys.stderr, flush=True)
    loadavg_before = load_average()
    with user_errors_exit_2(), tempfile.TemporaryDirectory() as scratch:
        engines = args.engine or build_task_set_engines(
            args.arch, args.tasks, args.rank, args.engines or Path(scratch) / "engines", log
        )
        meta = read_onnx_metadata(engines[0])
        rolls, totals = run_roll_bench(cfg, engines, Path(scratch) / "repository", log)
    arch = (meta.get("architecture") or {}).get("name", "engine")
    record = {
        **record_head("serve-roll", command_line(argv, prog or f"{__name__}.main"), loadavg_before),
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

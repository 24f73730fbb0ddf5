"""Serving under load: one Triton Inference Server, the engines against eight expert models.

Every model runs in the **same** server (``surgery-edge serve``'s Python-backend models over
ONNX Runtime, :mod:`surgery_edge.runtime.serving`), with the same batching settings, and is
driven over loopback gRPC by a closed-loop load generator (``tritonclient.grpc.aio``:
``concurrency`` clients, each sending its next request when the last is answered):

* ``all-tasks``: each request is one image that must be answered for every task:
  - ``v1``: one request to the V1 engine (Surgery, all-tasks: backbone once, then every
    task's adapter and head), which answers with every task's logits in one tensor;
  - ``experts-one-graph``: the eight experts as one model (their engines composed into one
    ONNX graph, :mod:`~surgery_edge.bench.one_graph`), one request answered with every task's
    logits in one tensor, as V1's: the fairest baseline, the same chain as V1's around it;
  - ``experts``: one request to each of the eight expert models, together; the request is
    answered when the last expert is;
* ``mixed``: each request is one image for one task, drawn at random (a mixed-task stream):
  - ``v2``: the V2 engine (SurgeryV2, routed by task id);
  - ``merged``: the merged backbone alone with each task's head (routed, no adapters): the
    lower bound on what one shared backbone costs;
  - ``experts``: the expert model of the request's task.

Each request names the one output it needs: a routed engine's ``logits`` (not ``probs``), an
expert's logits, the V1 engine's and the one graph's stacked ``logits`` (B, T, C_max) rather
than T tensors.

Then the same engines alone, in this process (ONNX Runtime, the same threads, one image per
call): their CPU per request gives the **serving efficiency** (the served CPU-per-request
ratio over the engines' own) and the engine's share of the per-request chain, hop by hop
(:mod:`~surgery_edge.bench.serve_report`). The load is :mod:`~surgery_edge.bench.serve_load`,
the measurement :mod:`~surgery_edge.bench.serve_measure`.

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
import copy
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from surgery_edge.bench.choices import ONE_GRAPH
from surgery_edge.bench.one_graph import compose_experts
from surgery_edge.bench.proc import load_average
from surgery_edge.bench.report import (
    command_line,
    config_from_args,
    user_errors_exit_2,
    write_record_set,
)
from surgery_edge.bench.serve_measure import (  # the benchmark's parts, importable from here
    ServeBenchConfig,
    ServeResult,
    engines_alone,
    run_serve_bench,
)
from surgery_edge.bench.serve_report import breakdown, markdown, record_head, targets
from surgery_edge.bench.workloads import RANDOM_WEIGHTS_NOTE, Parts, build_engine_model
from surgery_edge.engine_format import EngineMode, read_onnx_metadata
from surgery_edge.errors import ConfigError
from surgery_edge.surgery.methods import (
    SURGERY,
    SURGERY_METHODS,
    SURGERY_V2,
    engine_name,
    method_engines,
)

__all__ = ["ServeBenchConfig", "ServeResult", "build_engines", "ceilings", "main"]

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
    random weights at ``config.arch``; and the experts as one graph (``experts-one-graph.onnx``),
    composed from the expert engines when it is not there."""
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
    else:
        files = _export_random(config, root, log)
    one = root / f"{ONE_GRAPH}.onnx"
    if not one.is_file():
        log(f"composing {one.name} from the {len(files) - 3} expert engines")
        experts = {n[len("expert-") :]: p for n, p in files.items() if n.startswith("expert-")}
        compose_experts(experts, one)
    return {**files, ONE_GRAPH: one}


def _export_random(
    config: ServeBenchConfig, root: Path, log: Callable[[str], None]
) -> dict[str, Path]:
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


def ceilings(engines: dict[str, Path]) -> dict[str, dict[str, float]]:
    """The most each compared pair's CPU-per-request ratio can be, per request of one image:
    ``{"workload/baseline/engine": {"FLOPs": F_b / F_e, "bytes": M_b / M_e}}``, the FLOPs
    analytic (:mod:`~surgery_edge.bench.flops`), the bytes the weights each request reads
    (the engine files), the image and the logits (:func:`~surgery_edge.bench.flops.workload_bytes`).
    A mixed stream's ratios are averaged over the tasks (each drawn alike)."""
    from surgery_edge.bench.flops import workload_bytes, workload_flops  # deferred: torch
    from surgery_edge.models import ArchSpec  # deferred: imports torch

    metas = {name: read_onnx_metadata(path) for name, path in engines.items()}
    v2 = metas["v2"]
    arch, classes, tasks = ArchSpec.from_dict(v2["architecture"]), list(v2.class_counts), v2.tasks
    experts = [f"expert-{t}" for t in tasks]
    rank = metas["v1"].get("rank", 0)

    def cost(workload: str, config: str, task: int) -> tuple[float, float]:
        size = {c: engines[c].stat().st_size for c in engines}
        if workload == "all-tasks":
            flops_config = {"v1": metas["v1"].method}.get(config, "experts")
            weights = size[config] if config in size else sum(size[e] for e in experts)
            return (
                workload_flops(arch, flops_config, "all-tasks", [0], classes, rank),
                workload_bytes(arch, "experts", "all-tasks", [0], classes, weights, 4),
            )
        model = experts[task] if config == "experts" else config
        method = "experts" if config == "experts" else metas[model].method
        method = method if method in SURGERY_METHODS or method == "experts" else "merged"
        flops = workload_flops(arch, method, "routed", [task], classes, metas[model].get("rank", 0))
        return flops, workload_bytes(arch, "v2", "routed", [task], classes, size[model], 4)

    pairs = {"all-tasks": [(b, "v1") for b in (ONE_GRAPH, "experts")]}
    pairs["mixed"] = [("merged", "v2"), ("experts", "v2")]
    out = {}
    for workload, compared in pairs.items():
        draws = [0] if workload == "all-tasks" else range(len(tasks))
        for baseline, engine in compared:
            b = [cost(workload, baseline, t) for t in draws]
            e = [cost(workload, engine, t) for t in draws]
            out[f"{workload}/{baseline}/{engine}"] = {
                "FLOPs": sum(x[0] for x in b) / sum(x[0] for x in e),
                "bytes": sum(x[1] for x in b) / sum(x[1] for x in e),
            }
    return out


# --- command line ---------------------------------------------------------------------------


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
    cfg = config_from_args(ServeBenchConfig, args, concurrency=tuple(args.concurrency))
    log = partial(print, file=sys.stderr, flush=True)
    loadavg_before = load_average()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.engines or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        given = (root / "v2.onnx").is_file()
        with user_errors_exit_2():
            engines = build_engines(cfg, root, log)
            tasks = list(read_onnx_metadata(engines["v2"]).tasks)
            bounds = ceilings(engines)  # before the load: a failure here costs nothing
            results = run_serve_bench(cfg, engines, log)
            log("the engines alone, in this process")
            alone = engines_alone(engines, cfg, tasks)
    record = {
        **record_head("serve", command_line(argv, prog or f"{__name__}.main"), loadavg_before),
        "config": asdict(cfg),
        "note": f"engines of {args.engines}" if given else f"engines with {RANDOM_WEIGHTS_NOTE}",
        "results": [asdict(r) for r in results],
        "engines_alone_cpu_ms": alone,
        "ceilings": bounds,
        "targets": targets(results, alone, bounds),
        "breakdown": breakdown(results, alone),
    }
    write_record_set(args.out, f"serve-{cfg.arch}", record, markdown(record))
    print(markdown(record))
    return record

"""The engine benchmark's peak memory: which (configuration, mode, path) each child process of
:mod:`~surgery_edge.bench.memory` measures, and its record put into the rows it belongs to."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from surgery_edge.bench.memory import MemorySpec
from surgery_edge.bench.runners import EXPERT_CONFIGS, ArchBench, Workload
from surgery_edge.bench.workloads import EngineBenchConfig, EngineResult


def memory_specs(
    config: EngineBenchConfig,
    bench: ArchBench,
    works: Sequence[Workload],
    results: Sequence[EngineResult],
) -> list[MemorySpec]:
    """One child process per (configuration, mode, path of ``config.memory_paths``) that was
    timed at some batch size in ``results``, with those batch sizes; the ONNX Runtime path
    (on the CPU only) opens the engines the timing exported into ``bench.folder``."""
    specs = []
    for work in works:
        if config.memory_configs is not None and work.config not in config.memory_configs:
            continue
        for path in config.memory_paths:
            where = (bench.arch.name, work.config, work.mode, path)
            measured = [
                r
                for r in results
                if r.status == "ok" and (r.arch, r.config, r.mode, r.path) == where
            ]
            onnx = path == "onnxruntime"
            if not measured or (onnx and bench.device.type != "cpu"):
                continue
            specs.append(
                MemorySpec(
                    arch=bench.arch.name,
                    config=work.config,
                    mode=work.mode,
                    path=path,
                    batches=tuple(sorted(r.batch for r in measured)),
                    device=config.device,
                    dtype=config.resolved_dtype(),
                    num_tasks=config.num_tasks,
                    rank=work.rank,
                    threads=bench.threads,
                    seed=config.seed,
                    onnx_files=_onnx_files(work, config.num_tasks, bench) if onnx else (),
                    concurrent_workers=work.workers if onnx else 1,
                )
            )
    return specs


def _onnx_files(work: Workload, num_tasks: int, bench: ArchBench) -> tuple[str, ...]:
    """The engines ``work`` runs on ONNX Runtime: its own, or the experts' (one for one expert
    alone), as the timing exported them."""
    names = [f"expert-{t}.onnx" for t in range(num_tasks)]
    if work.config not in EXPERT_CONFIGS:
        names = [f"{work.config}-{work.mode}.onnx"]
    elif work.config == "one-expert":
        names = names[:1]
    return tuple(str(bench.folder / n) for n in names)


def attach_records(
    results: list[EngineResult], records: Iterable[dict[str, Any]], log: Callable[[str], None]
) -> None:
    """Each child's record into the rows of its (configuration, mode, path), in place: the peak
    at each batch size and the memory held; or, where the child failed, why (logged)."""
    index = {(r.arch, r.config, r.mode, r.path, r.batch): i for i, r in enumerate(results)}
    for record in records:
        spec = record["spec"]
        where = (spec["arch"], spec["config"], spec["mode"], spec["path"])
        if record["status"] != "ok":
            log(f"  memory {' / '.join(where[1:])}: failed: {record['reason']}")
            for batch in spec["batches"]:
                i = index[(*where, batch)]
                results[i] = dataclasses.replace(results[i], peak_mem_error=record["reason"])
            continue
        for entry in record["batches"]:
            i = index[(*where, entry["batch"])]
            results[i] = dataclasses.replace(
                results[i],
                peak_mem_bytes=entry["peak_bytes"],
                held_mem_bytes=record["held_bytes"],
                peak_mem_kind=record["kind"],
            )

"""The ratios the engine benchmark's targets are phrased in, derived from one architecture's
results: weight memory, throughput and latency against the eight experts, and the V2 routed
overhead over the merged backbone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from surgery_edge.bench.workloads import EngineResult


def _counterpart(path: str) -> str:
    """The path of a configuration without adapters that matches an engine path."""
    return {"fused": "eager", "fused+cuda-graph": "cuda-graph"}.get(path, path)


def _index(results: Sequence[EngineResult]) -> dict[tuple[str, str, str, int], EngineResult]:
    return {(r.config, r.mode, r.path, r.batch): r for r in results if r.status == "ok"}


def _best(
    results: Sequence[EngineResult], config: str, mode: str, batch: int
) -> EngineResult | None:
    ok = [
        r
        for r in results
        if r.status == "ok" and (r.config, r.mode, r.batch) == (config, mode, batch)
    ]
    return min(ok, key=lambda r: r.median_ms) if ok else None


def _pairs(
    results: Sequence[EngineResult],
    engine: tuple[str, str],
    baseline: tuple[str, str],
    batches: Sequence[int],
    value: Callable[[EngineResult, EngineResult], float],
) -> list[dict[str, Any]]:
    """``value(engine, baseline)`` per batch for each engine path against the baseline's
    counterpart path, then for the fastest path of each side (``path: best``)."""
    index, rows = _index(results), []
    for batch in batches:
        for r in results:
            if r.status != "ok" or (r.config, r.mode, r.batch) != (*engine, batch):
                continue
            b = index.get((*baseline, _counterpart(r.path), batch))
            if b is not None:
                rows.append(dict(batch=batch, path=r.path, baseline_path=b.path, value=value(r, b)))
        e, b = _best(results, *engine, batch), _best(results, *baseline, batch)
        paired = any(
            x["batch"] == batch
            and x["path"] == getattr(e, "path", None)
            and x["baseline_path"] == getattr(b, "path", None)
            for x in rows
        )
        if e is not None and b is not None and not paired:
            rows.append(
                dict(batch=batch, path=f"best ({e.path})", baseline_path=b.path, value=value(e, b))
            )
    return rows


def derive_ratios(
    results: Sequence[EngineResult], one_expert: int, overhead_batch: int = 64
) -> dict[str, Any]:
    """The figures the issue's targets are phrased in, for one architecture's results."""
    batches = sorted({r.batch for r in results})
    weights = {"one_expert": one_expert}
    for r in results:
        weights.setdefault(r.config, r.weight_bytes)
    measured = sorted({r.batch for r in results if r.status == "ok"})
    if overhead_batch in measured:
        at, note = overhead_batch, None
    else:
        at = max((b for b in measured if b <= overhead_batch), default=None)
        note = f"batch {overhead_batch} not measured; using batch {at}"
    overhead = _pairs(
        results,
        ("surgeryv2", "routed"),
        ("merged", "routed"),
        [at] if at else [],
        lambda e, b: e.median_ms / b.median_ms - 1.0,
    )
    return {
        "weight_bytes": weights,
        "weight_ratio_vs_one_expert": {k: v / one_expert for k, v in weights.items()},
        "v1_all_tasks_throughput_over_experts": _pairs(
            results,
            ("surgery", "all-tasks"),
            ("experts", "all-tasks"),
            batches,
            lambda e, b: e.answers_per_s / b.answers_per_s,
        ),
        "v2_all_tasks_throughput_over_experts": _pairs(
            results,
            ("surgeryv2", "all-tasks"),
            ("experts", "all-tasks"),
            batches,
            lambda e, b: e.answers_per_s / b.answers_per_s,
        ),
        "v2_batch1_latency_over_experts": {
            mode: _pairs(
                results,
                ("surgeryv2", mode),
                ("experts", mode),
                [1],
                lambda e, b: e.median_ms / b.median_ms,
            )
            for mode in ("all-tasks", "routed")
        },
        "v2_routed_overhead_over_merged": {"batch": at, "note": note, "ratios": overhead},
    }

"""The ratios the engine benchmark reports, each beside its analytic ceiling.

Two kinds of comparison, never one runtime against another:

* ``same-runtime``: an engine on a path against the fastest eight-expert baseline on that same
  path (``fused`` counts as eager PyTorch, ``fused+cuda-graph`` as a CUDA graph);
* ``best-vs-best``: the engine's fastest path against the fastest baseline on any path.

The ceiling of a speedup is what the work allows: an engine that does ``F_e`` FLOPs and moves
``M_e`` bytes per call cannot beat a baseline doing ``F_b`` and ``M_b`` by more than
``max(F_b / F_e, M_b / M_e)`` when both run equally well (one backbone pass instead of eight
bounds the V1 engine at about 8x from FLOPs). Where the device's rates were measured, the
roofline ratio ``max(F_b/P, M_b/BW) / max(F_e/P, M_e/BW)`` is given too (tighter: it knows
which bound applies at this batch). A measured speedup above the ceiling says the baseline ran
worse than its work explains, so it is flagged, and the cause is measured: the baseline's time
against its experts run one at a time alone on the same path (``penalty``: the cost of eight
sets of weights competing for the caches), beside the weight bytes and the cache sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from surgery_edge.bench.choices import (
    ALL_TASKS,
    BASELINES,
    ENGINES,
    MERGED,
    ONE_EXPERT,
    ONE_GRAPH,
    ROUTED,
)
from surgery_edge.bench.roofline import DeviceRates
from surgery_edge.bench.workloads import EngineResult, config_modes

SAME_RUNTIME, BEST_VS_BEST = "same-runtime", "best-vs-best"
# the baseline path an engine path runs on the same runtime as
COUNTERPART = {"fused": "eager", "fused+cuda-graph": "cuda-graph"}


def _ok(results: Sequence[EngineResult]) -> list[EngineResult]:
    return [r for r in results if r.status == "ok"]


def _fastest(rows: Sequence[EngineResult]) -> EngineResult | None:
    return min(rows, key=lambda r: r.median_ms) if rows else None


def _rows(
    results: Sequence[EngineResult], configs: Sequence[str], mode: str, batch: int
) -> list[EngineResult]:
    return [r for r in _ok(results) if r.config in configs and (r.mode, r.batch) == (mode, batch)]


def ceilings(engine: EngineResult, baseline: EngineResult, rates: DeviceRates | None) -> dict:
    """The largest speedup of ``engine`` over ``baseline`` their work allows (per answer)."""
    per_e, per_b = engine.answers_per_call, baseline.answers_per_call
    flops = (baseline.flops_per_call / per_b) / (engine.flops_per_call / per_e)
    nbytes = (baseline.bytes_per_call / per_b) / (engine.bytes_per_call / per_e)
    out = {
        "flops_ratio": flops,
        "bytes_ratio": nbytes,
        "ceiling": max(flops, nbytes),
        "ceiling_basis": "FLOPs" if flops >= nbytes else "bytes",
        "roofline_ceiling": None,
    }
    if rates is not None:
        t_b = rates.roofline_s(baseline.flops_per_call, baseline.bytes_per_call) / per_b
        t_e = rates.roofline_s(engine.flops_per_call, engine.bytes_per_call) / per_e
        out["roofline_ceiling"] = t_b / t_e
    return out


def penalty(results: Sequence[EngineResult], baseline: EngineResult) -> dict | None:
    """How much slower ``baseline`` ran than its experts would one at a time, each alone: the
    ``one-expert`` row on the same path, times the number of experts the call runs, at the
    batch each of them gets (all-tasks: the whole batch, eight times; routed: equal groups of
    B / T images, or the single expert at batch 1). Above 1, the eight sets of weights cost
    more than their work (caches, queues, threads). None where that row was not measured."""
    if baseline.config not in BASELINES:
        return None
    if baseline.mode == ALL_TASKS:
        calls, per_call = baseline.answers_per_call // baseline.batch, baseline.batch
    else:  # the inputs cycle through the tasks: B images over min(B, T) experts
        calls = min(baseline.batch, _tasks(results))
        if baseline.batch % calls:
            return None  # unequal groups: no single one-expert batch to compare with
        per_call = baseline.batch // calls
    one = [r for r in _rows(results, [ONE_EXPERT], ALL_TASKS, per_call) if r.path == baseline.path]
    if not one:
        return None
    return {
        "one_expert_ms": one[0].median_ms,
        "one_expert_batch": per_call,
        "experts_run": calls,
        "value": baseline.median_ms / (calls * one[0].median_ms),
    }


def _tasks(results: Sequence[EngineResult]) -> int:
    """T, from any all-tasks row of a baseline (its answers per image)."""
    for r in results:
        if r.config in BASELINES and r.mode == ALL_TASKS:
            return r.answers_per_call // r.batch
    return 1


def compare(
    results: Sequence[EngineResult],
    engine: EngineResult,
    baseline: EngineResult,
    kind: str,
    rates: DeviceRates | None,
) -> dict[str, Any]:
    """One ratio row: the speedup, its ceilings, and the measured cause when it is above."""
    speedup = baseline.median_ms / engine.median_ms  # both answer the same per call
    row: dict[str, Any] = {
        "kind": kind,
        "batch": engine.batch,
        "mode": engine.mode,
        "engine": engine.config,
        "engine_path": engine.path,
        "baseline": baseline.config,
        "baseline_path": baseline.path,
        "speedup": speedup,
        "latency_ratio": 1.0 / speedup,
        **ceilings(engine, baseline, rates),
    }
    # beaten: the work's ceiling, or the roofline's (tighter, where the rates were measured)
    roof = row["roofline_ceiling"]
    row["above_ceiling"] = speedup > row["ceiling"] or (roof is not None and speedup > roof)
    row["penalty"] = penalty(results, baseline)
    row["explained"] = None
    if row["above_ceiling"] and row["penalty"] is not None:
        # against eight times one expert alone, the ratio the work would give
        row["speedup_vs_8x_one_expert"] = speedup / row["penalty"]["value"]
        row["explained"] = row["speedup_vs_8x_one_expert"] <= row["ceiling"]
    return row


def versus_baselines(
    results: Sequence[EngineResult],
    engine: str,
    mode: str,
    batch: int,
    rates: DeviceRates | None,
) -> list[dict[str, Any]]:
    """The engine against the eight-expert baselines at one batch: one same-runtime row per
    path (against the fastest eight-model baseline on that runtime, and, on the exported
    paths, against the eight experts as one graph beside it), then best vs best."""
    engines = _rows(results, [engine], mode, batch)
    baselines = _rows(results, [b for b in BASELINES if b != ONE_GRAPH], mode, batch)
    one_graph = _rows(results, [ONE_GRAPH], mode, batch)
    rows = []
    for e in engines:
        path = COUNTERPART.get(e.path, e.path)
        b = _fastest([r for r in baselines if r.path == path])
        if b is not None:
            rows.append(compare(results, e, b, SAME_RUNTIME, rates))
        b = _fastest([r for r in one_graph if r.path == path])
        if b is not None:
            rows.append(compare(results, e, b, SAME_RUNTIME, rates))
    best_e, best_b = _fastest(engines), _fastest(baselines)
    if best_e is not None and best_b is not None:
        rows.append(compare(results, best_e, best_b, BEST_VS_BEST, rates))
    return rows


def overhead_over_merged(
    results: Sequence[EngineResult], engine: str, batch: int
) -> list[dict[str, Any]]:
    """Routed latency of ``engine`` over the bare merged backbone, per runtime and best vs best,
    beside the floor its extra FLOPs set."""
    engines = _rows(results, [engine], ROUTED, batch)
    merged = _rows(results, [MERGED], ROUTED, batch)

    def row(e: EngineResult, m: EngineResult, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "batch": batch,
            "engine_path": e.path,
            "merged_path": m.path,
            "overhead": e.median_ms / m.median_ms - 1.0,
            "flops_floor": e.flops_per_call / m.flops_per_call - 1.0,
            # the engine does the merged model's work and more: faster than that is a merged
            # row that ran worse than its work (flagged, not cited)
            "below_floor": e.median_ms / m.median_ms < 0.99 * e.flops_per_call / m.flops_per_call,
        }

    rows = []
    for e in engines:
        path = COUNTERPART.get(e.path, e.path)
        m = next((r for r in merged if r.path == path), None)
        if m is not None:
            rows.append(row(e, m, SAME_RUNTIME))
    if engines and merged:
        rows.append(row(_fastest(engines), _fastest(merged), BEST_VS_BEST))
    return rows


def penalties(results: Sequence[EngineResult]) -> list[dict[str, Any]]:
    """Every baseline against its experts run one at a time alone, per path, mode and batch."""
    out = []
    for r in _ok(results):
        p = penalty(results, r)
        if p is not None:
            where = {"config": r.config, "mode": r.mode, "path": r.path, "batch": r.batch}
            out.append(where | {"median_ms": r.median_ms} | p)
    return out


def derive_ratios(
    results: Sequence[EngineResult],
    one_expert: int,
    overhead_batch: int = 64,
    rates: DeviceRates | None = None,
    caches: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Every reported ratio of one architecture's results, with ceilings and flags."""
    weights = {"one_expert": one_expert}
    for r in results:
        weights.setdefault(r.config, r.weight_bytes)
    measured = sorted({r.batch for r in _ok(results)})
    at = overhead_batch if overhead_batch in measured else None
    note = None
    if at is None:
        at = max((b for b in measured if b <= overhead_batch), default=None)
        note = f"batch {overhead_batch} not measured; using batch {at}"
    vs = {
        engine: {
            mode: [
                row for b in measured for row in versus_baselines(results, engine, mode, b, rates)
            ]
            for mode in config_modes(engine)
        }
        for engine in ENGINES
    }
    overhead = {
        engine: overhead_over_merged(results, engine, at) if at else []
        for engine in ENGINES
        if ROUTED in config_modes(engine)
    }
    flagged, seen = [], set()  # a best-vs-best row may repeat a same-runtime pair
    for row in (r for modes in vs.values() for rows in modes.values() for r in rows):
        pair = tuple(row[k] for k in ("engine", "engine_path", "baseline", "baseline_path"))
        if row["above_ceiling"] and (row["mode"], row["batch"], *pair) not in seen:
            seen.add((row["mode"], row["batch"], *pair))
            flagged.append(row)
    merged_peak = [
        {"batch": r.batch, "path": r.path, "tflops": r.tflops, "peak_fraction": r.peak_fraction}
        for r in _ok(results)
        if r.config == MERGED and r.mode == ALL_TASKS and r.peak_fraction is not None
    ]
    return {
        "weight_bytes": weights,
        "weight_ratio_vs_one_expert": {k: v / one_expert for k, v in weights.items()},
        "caches": caches or {},
        "device_rates": None if rates is None else vars(rates),
        "vs_experts": vs,
        "routed_overhead_over_merged": {"batch": at, "note": note, "rows": overhead},
        "eight_expert_penalty": penalties(results),
        "merged_peak_fraction": merged_peak,
        "above_ceiling": flagged,
    }

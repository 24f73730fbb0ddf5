"""The GPU run's targets (issue 17), read from the files its steps leave under ``--out``: per
target, the measured value (None: not measured), whether it was met, and a note that says which
peak a fraction was judged against or which baselines a "best" was taken over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surgery_edge.bench.choices import BASELINES
from surgery_edge.bench.roofline import Peaks, peaks_for
from surgery_edge.surgery.methods import SURGERY, SURGERY_V2


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON file at ``path``, or None where it is missing or unreadable (a step that
    failed or ran out of time)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def env_peaks(env: dict[str, Any] | None) -> Peaks | None:
    """The peaks the targets are judged against: those the env step recorded for the device
    (its datasheet's, or measured for a GPU not in the table), else the datasheet's for the
    device name in ``env``; None without a GPU's."""
    if not env:
        return None
    if env.get("peaks"):
        return Peaks(**env["peaks"])
    return peaks_for(env.get("device_name") or "")


def targets(
    out: Path, b32: str, l14: str, env: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Issue 17's targets against what the files under ``out`` hold (None: not measured), the
    fractions of peak against the peaks of the device in ``env`` (:func:`env_peaks`). Each
    row's ``note`` says which peak, or which baselines a "best" was taken over."""
    peaks = env_peaks(env)
    rows: list[dict[str, Any]] = []
    for arch in (b32, l14):
        record = read_json(out / f"engine-{arch}.json") or {}
        rows += _engine_targets(arch, record)
        if arch == l14:
            rows.append(_backbone_target(arch, record.get("results", []), peaks))
    rows += _kernel_targets(read_json(out / "kernels.json") or {}, peaks)
    training = read_json(out / "training.json") or {}
    v2 = [r for r in training.get("results", []) if r["config"]["method"] == SURGERY_V2]
    value = v2[0]["seconds_per_1000_steps"] if v2 else None
    target = "SurgeryV2 training 8 tasks x 1,000 steps x 16 <= 60 s"
    return [*rows, _target(target, value, _le(value, 60.0), " s")]


def _target(
    target: str, value: float | None, ok: bool | None, unit: str = "x", note: str = ""
) -> dict[str, Any]:
    """One target's row: what it asks, the measured value (None: not measured), whether it was
    met, the value's unit and a note."""
    return {"target": target, "measured": value, "unit": unit, "met": ok, "note": note}


def _engine_targets(arch: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The engine benchmark's targets at ``arch``, from its record: V1's speedup over the best
    eight-expert baseline at batch 1, 8 and 64, V1's weights, V2's batch-1 latency and its
    routed overhead over the merged backbone."""
    rows = []
    results, derived = record.get("results", []), record.get("derived", {})
    vs = derived.get("vs_experts", {})
    best = [r for rows_ in vs.get("surgery", {}).values() for r in rows_]
    best = [r for r in best if r["kind"] == "best-vs-best"]
    for batch in (1, 8, 64):
        row = next((r for r in best if r["batch"] == batch), None)
        value = None if row is None else row["speedup"]
        note = baselines_note(results, batch, "all-tasks", row)
        target = f"{arch}: V1 >= 7x best 8-expert baseline, B={batch}"
        rows.append(_target(target, value, _ge(value, 7.0), note=note))
    weight = derived.get("weight_ratio_vs_one_expert", {}).get(SURGERY)
    rows.append(_target(f"{arch}: V1 weights <= 1.05x one expert", weight, _le(weight, 1.05)))
    v2 = [r for rows_ in vs.get(SURGERY_V2, {}).values() for r in rows_]
    where = ("best-vs-best", 1, "all-tasks")
    row = next((r for r in v2 if (r["kind"], r["batch"], r["mode"]) == where), None)
    value = None if row is None else row["latency_ratio"]
    note = baselines_note(results, 1, "all-tasks", row)
    target = f"{arch}: V2 batch-1 latency <= 0.35x eight experts"
    rows.append(_target(target, value, _le(value, 0.35), note=note))
    over = derived.get("routed_overhead_over_merged", {})
    rows_ = over.get("rows", {}).get(SURGERY_V2, []) if over.get("batch") == 64 else []
    row = next((r for r in rows_ if r["kind"] == "best-vs-best"), None)
    value = None if row is None else 100 * row["overhead"]
    target = f"{arch}: V2 routed overhead over merged <= 5% at B=64"
    rows.append(_target(target, value, _le(value, 5.0), "%"))
    return rows


def _backbone_target(
    arch: str, results: list[dict[str, Any]], peaks: Peaks | None
) -> dict[str, Any]:
    """The merged backbone's fraction of the device's dense fp16 peak at batch 128, its fastest
    path's."""
    merged = [
        r
        for r in results
        if (r["config"], r["mode"], r["batch"], r["status"]) == ("merged", "all-tasks", 128, "ok")
    ]
    fastest = max(merged, key=lambda r: r["tflops"], default=None)
    value, note = None, "no GPU peak: the environment names no GPU"
    if peaks is not None:
        note = f"of {peaks.describe('tflops')}"
        if fastest is not None:
            value = 100 * fastest["tflops"] / peaks.dense_fp16_tflops
            note = f"{fastest['path']}, {fastest['tflops']:.0f} TFLOP/s {note}"
    target = f"{arch}: backbone >= 50% of dense fp16 peak at B=128"
    return _target(target, value, _ge(value, 50), "%", note)


def _kernel_targets(kernels: dict[str, Any], peaks: Peaks | None) -> list[dict[str, Any]]:
    """The fused kernel's targets at ViT-L/14 batch 64, from the kernel benchmark's record: its
    speedups over eager and ``torch.compile``, and its fraction of the HBM bandwidth."""
    at = [
        r
        for r in kernels.get("results", [])
        if r["shape"]["model"] == "ViT-L/14" and r["shape"]["batch"] == 64
    ]
    rows = []
    for name, key, bound in (
        ("fused kernel >= 1.5x unfused eager (ViT-L/14 B=64)", "speedup_vs_torch", 1.5),
        ("fused kernel >= 1.1x torch.compile (ViT-L/14 B=64)", "speedup_vs_compile", 1.1),
    ):
        value = min((r[key] for r in at if r[key] is not None), default=None)
        rows.append(_target(name, value, _ge(value, bound)))
    gbps = [t["gbps"] for r in at for t in r["timings"] if t["impl"] == "fused"]
    value, note = None, "no GPU peak: the environment names no GPU"
    if peaks is not None:
        note = f"of {peaks.describe('bw')}"
        if gbps:  # the slowest of the shapes (ranks 4 and 16)
            value = 100 * min(gbps) * 1e9 / peaks.hbm_bytes_per_s
            note = f"{min(gbps):.0f} GB/s {note}"
    target = "fused kernel >= 70% of HBM bandwidth (ViT-L/14 B=64)"
    rows.append(_target(target, value, _ge(value, 70.0), "%", note))
    return rows


def serve_targets(out: Path) -> list[dict[str, Any]]:
    """The serving benchmark's own targets (``serve-<arch>.json`` under ``out``), as rows of the
    run's table: a ratio flagged beyond its ceiling is shown but judged "not measured"."""
    rows = []
    for path in sorted(out.glob("serve-*.json")):
        for t in (read_json(path) or {}).get("targets", []):
            if "ceiling" in t:
                note = f"ceiling {t['ceiling']:.3g} ({t['ceiling_basis']})"
            else:  # a cost ratio: bounded below by the work's own ratio
                note = f"floor {t['floor']:.3g} (FLOPs)" if "floor" in t else ""
            flagged = bool(t.get("above_ceiling"))  # the record's flag, for either bound
            if flagged:
                note = f"flagged beyond its bound, not judged: {note}"
            rows.append(
                {
                    "target": f"serving, {t['concurrency']} client(s): {t['target']}",
                    "measured": t["ratio"],
                    "unit": "x",
                    "met": None if flagged else t["met"],
                    "note": note,
                }
            )
    return rows


def baselines_note(
    results: list[dict[str, Any]], batch: int, mode: str, best: dict[str, Any] | None
) -> str:
    """Which eight-expert baselines a "best" was taken over at (batch, mode): the fastest, the
    configurations measured on each path, and why the others were not (a compile that did not
    fit its budget, a path unavailable here)."""
    rows = [
        r for r in results if r["config"] in BASELINES and (r["batch"], r["mode"]) == (batch, mode)
    ]
    if not rows:
        return "no baseline measured"
    paths = list(dict.fromkeys(r["path"] for r in rows))
    measured = []
    missing = []
    for path in paths:
        ok = [r["config"] for r in rows if r["path"] == path and r["status"] == "ok"]
        if ok:
            measured.append(f"{path} ({', '.join(ok)})")
        for r in rows:
            if r["path"] == path and r["status"] != "ok":
                missing.append((path, r["config"], r["status"], r["reason"] or ""))
    parts = []
    if best is not None:
        parts.append(f"best: {best['baseline']} / {best['baseline_path']}")
    parts.append("over " + ("; ".join(measured) if measured else "nothing measured"))
    unmeasured = {}
    for path, config, status, reason in missing:
        unmeasured.setdefault((path, status, reason), []).append(config)
    parts += [
        f"not measured: {path} for {', '.join(configs)} ({status}: {reason[:120]})"
        for (path, status, reason), configs in unmeasured.items()
    ]
    return "; ".join(parts)


def _ge(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def _le(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound

"""The demo's export step: one engine per surgery method, checked against PyTorch.

:func:`export_and_check` exports the run's task-arithmetic model
- with Surgery (V1) as an all-tasks engine (the backbone runs once, only the final adapters and
  heads fan out), and
- with SurgeryV2 as a routed engine (one task id per image), also in fp16,
to ONNX and AOTInductor ``.pt2``, and measures parity with PyTorch on the suite's test split. It
also exports a single expert alone (plain, routed, one task): the size every extra task would
cost if each task shipped its own model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from surgery_edge.engine_format import EngineMode
from surgery_edge.errors import ExportError
from surgery_edge.export.aoti import export_aoti
from surgery_edge.export.onnx import export_onnx
from surgery_edge.export.parity import check_forward
from surgery_edge.io import fingerprint, write_json_atomic
from surgery_edge.surgery.model import MultiTaskModel

if TYPE_CHECKING:
    from surgery_edge.run.pipeline import Run

MERGE = "task_arithmetic"
# (engine name, surgery method, mode): V1 answers every task from one backbone pass; V2 routes.
PLANS = (
    ("surgery-all-tasks", "surgery", EngineMode.ALL_TASKS),
    ("surgeryv2-routed", "surgeryv2", EngineMode.ROUTED),
)


def _single_expert_model(run: Run) -> tuple[MultiTaskModel, str]:
    task = run.tasks[0]
    return run.layout.model(run.experts.experts[task], None, [task], run.arch, "cpu"), task


def export_and_check(run: Run, out_dir: Path, aoti: bool = True) -> dict[str, Any]:
    """Export the demo engines into ``out_dir`` and measure them; returns a JSON-able dict.

    Args:
        run: a run with its experts loaded (:meth:`Run.require_experts`), the
            ``task_arithmetic`` merge and both surgery methods' adapters.
        out_dir: where the engines go.
        aoti: also compile ``.pt2`` packages (needs a C++ compiler; ~30 s or more each on CPU).
            A failed compile is recorded as ``{"error": ...}`` and the rest still runs.

    Returns:
        ``{"tasks", "arch", "single_expert": {...}, "engines": {name: {artefact: {...}}}}``:
        per artefact its file name, ``bytes``, ``parity`` (rows, max_abs_diff,
        argmax_agreement in %, max_abs_logit) and export seconds; plus ``bytes_vs_single_expert``
        and ``bytes_vs_all_experts`` for the ONNX engines.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The built-in suite's whole test split; a sample of 256 per task for data from disk.
    per_task = None if run.config.builtin else 256
    images, task_ids, _ = suite_test_split(run.suite, run.tasks, per_task, run.config.seed)

    expert, expert_task = _single_expert_model(run)
    t0 = time.perf_counter()
    single = {"task": expert_task, **_describe(export_onnx(expert, out / "single-expert.onnx"), t0)}
    result: dict[str, Any] = {
        "arch": run.arch.name,
        "tasks": run.tasks,
        "merge": MERGE,
        "test_images": int(len(images)),
        "single_expert": single,
        "engines": {},
    }

    for name, method, mode in PLANS:
        model, extra = run.layout.export_model(MERGE, method, device="cpu")
        ids = task_ids if mode is EngineMode.ROUTED else None
        engine: dict[str, Any] = {"method": method, "mode": mode.value}
        routed = mode is EngineMode.ROUTED
        targets = [("onnx", False), ("onnx-fp16", True)] if routed else [("onnx", False)]
        for key, fp16 in targets:
            t0 = time.perf_counter()
            path = export_onnx(
                model, out / f"{name}{'-fp16' if fp16 else ''}.onnx", mode, fp16, metadata=extra
            )
            engine[key] = _describe(path, t0)
            engine[key]["parity"] = check_forward(model, path, images, ids).to_dict()
            size = engine[key]["bytes"]
            engine[key]["bytes_vs_single_expert"] = round(size / single["bytes"], 3)
            engine[key]["bytes_vs_all_experts"] = round(
                size / (single["bytes"] * len(run.tasks)), 3
            )
        if aoti:
            t0 = time.perf_counter()
            try:
                path = export_aoti(model, out / f"{name}.pt2", mode, metadata=extra, device="cpu")
                engine["pt2"] = _describe(path, t0)
                engine["pt2"]["parity"] = check_forward(model, path, images, ids).to_dict()
            except ExportError as e:
                engine["pt2"] = {"error": str(e)}
        result["engines"][name] = engine
    return result


def suite_test_split(
    suite, tasks: list[str], per_task: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every task's test images (N, H, W, 3) uint8, their task ids and labels, concatenated.

    Args:
        per_task: at most this many images per task, a seeded sample (large datasets: the
            parity check needs a few hundred images, not a whole test set in memory).
    """
    xs, ids, ys = [], [], []
    rng = np.random.default_rng(seed)
    for t, name in enumerate(tasks):
        data = suite.task(name)
        x, y = data.test_x, data.test_y
        if per_task is not None and len(x) > per_task:
            keep = np.sort(rng.choice(len(x), per_task, replace=False))
            x, y = x[keep], y[keep]
        xs.append(x)
        ids.append(np.full(len(x), t, np.int64))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ids), np.concatenate(ys)


def _describe(path: Path, t0: float) -> dict[str, Any]:
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "export_s": round(time.perf_counter() - t0, 2),
    }


def export_engines(run: Run) -> dict:
    """The demo's export stage: the task-arithmetic engines, checked for parity.

    Reuses ``engines/summary.json`` when the merged model, adapters and experts are unchanged
    (by content) and every engine it lists is still there, unchanged (by content hash).
    """
    needed = [run.merged.get(MERGE)] + [run.adapters.get((MERGE, m)) for _, m, _ in PLANS]
    if any(p is None for p in needed):
        return {"skipped": "needs the task_arithmetic merge with both surgery methods"}
    fp = fingerprint(*(run.hashes.digest(p) for p in needed), run.experts.fingerprint(run.hashes))
    folder = run.layout.engines
    summary = folder / "summary.json"
    if summary.is_file():
        try:
            cached = json.loads(summary.read_text())
        except (OSError, ValueError):
            cached = {}
        if isinstance(cached, dict) and cached.get("fingerprint") == fp and _intact(run, cached):
            run.log("reusing exported engines")
            return cached
    with run.stage("export"):
        result = export_and_check(run, folder)
    result["fingerprint"] = fp
    result["sha256"] = {f: run.hashes.digest(folder / f) for f in _files(result)}
    write_json_atomic(summary, result)
    return result


def _files(result: Any) -> list[str]:
    """The engine file names a summary lists (every ``"file"`` entry)."""
    if isinstance(result, dict):
        own = [result["file"]] if isinstance(result.get("file"), str) else []
        return own + [f for v in result.values() for f in _files(v)]
    return []


def _intact(run: Run, cached: dict) -> bool:
    """Every engine of a summary is present with the content it was measured with."""
    recorded = cached.get("sha256")
    files = _files(cached)
    if not isinstance(recorded, dict) or set(recorded) != set(files):
        return False
    for name in files:
        path = run.layout.engines / name
        if Path(name).name != name or not path.is_file():
            return False
        if run.hashes.digest(path) != recorded[name]:
            return False
    return True

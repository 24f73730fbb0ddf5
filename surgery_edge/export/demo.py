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

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.errors import ExportError

MERGE = "task_arithmetic"


def _single_expert_model(run):
    from surgery_edge.experts import load_heads
    from surgery_edge.models import load_encoder
    from surgery_edge.surgery.model import MultiTaskModel

    task = run.tasks[0]
    encoder = load_encoder(run.experts.experts[task], run.arch).build("cpu")
    head = load_heads({task: run.experts.heads[task]}, run.arch)[task]
    names = [run.suite.task(task).class_names]
    return MultiTaskModel(encoder, [head], [task], None, names).eval(), task


def export_and_check(run, out_dir: str | os.PathLike, aoti: bool = True) -> dict[str, Any]:
    """Export the demo engines into ``out_dir`` and measure them; returns a JSON-able dict.

    Args:
        run: a :class:`surgery_edge.pipeline.Run` (or its directory) with experts, the
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
    from surgery_edge.export.aoti import export_aoti
    from surgery_edge.export.from_run import load_run_model
    from surgery_edge.export.onnx import export_onnx
    from surgery_edge.export.parity import check_forward
    from surgery_edge.pipeline import Run

    if not isinstance(run, Run):
        run = Run.open(run, log=lambda *a: None)
    if run.experts is None:
        run.require_experts()
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

    plans = [
        ("surgery-all-tasks", "surgery", "all-tasks", None),
        ("surgeryv2-routed", "surgeryv2", "routed", task_ids),
    ]
    for name, method, mode, ids in plans:
        model, extra = load_run_model(run, MERGE, method)
        model = model.cpu()
        engine: dict[str, Any] = {"method": method, "mode": mode}
        targets = [("onnx", False), ("onnx-fp16", True)] if mode == "routed" else [("onnx", False)]
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

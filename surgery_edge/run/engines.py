"""The demo's export step: one engine per surgery method, in every precision, measured.

:func:`export_and_check` exports the run's task-arithmetic model
- with Surgery (V1) as an all-tasks engine (the backbone runs once, only the final adapters and
  heads fan out), in fp32 and int8, and
- with SurgeryV2 as a routed engine (one task id per image), in fp32, fp16, int8 and fp8,
to ONNX, and the routed V2 engine (the one a deployment serves) also as an fp32 AOTInductor
``.pt2`` (the all-tasks engine compiles the same way, through ``surgery-edge export --aoti``;
the demo leaves it out to keep within its time budget). It also exports a single expert alone
(plain, routed, one task) in fp32, fp16 and int8: the size every extra task would cost if each
task shipped its own model, at each precision. Every artefact is checked for parity with PyTorch
and every ONNX engine is evaluated through the runtime (:mod:`surgery_edge.run.engine_eval`):
accuracy from the stored test images, the change against the PyTorch model, file size, and ONNX
Runtime CPU latency at batch 1 and 8.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.engine_format import FORMAT_VERSION, EngineMode, Precision
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.evaluation.accuracy import accuracy_on
from surgery_edge.evaluation.engine import TaskImages, engine_report, split_images
from surgery_edge.export.aoti import export_aoti
from surgery_edge.export.gate import Calibration, GateError
from surgery_edge.export.onnx import export_onnx
from surgery_edge.export.parity import check_forward
from surgery_edge.export.quantize import (
    Target,
    default_recipe,
    export_half,
    quantize_engine,
)
from surgery_edge.io import fingerprint, write_json_atomic
from surgery_edge.merging import task_arithmetic
from surgery_edge.progress import progress_bar
from surgery_edge.run.calibration import DEFAULT_CALIBRATION_IMAGES, calibration_set
from surgery_edge.run.state import Run, unlabelled_split
from surgery_edge.surgery.methods import SINGLE_EXPERT, SURGERY, SURGERY_V2, method_engines
from surgery_edge.surgery.model import MultiTaskModel

MERGE = task_arithmetic.NAME  # the merge every engine of the demo is exported from
_P = Precision
# each method's precisions and whether a .pt2 is compiled too; fp32 first: int8 and fp8
# quantise it
_PRECISIONS = {
    SURGERY: ((_P.FP32, _P.INT8), False),
    SURGERY_V2: ((_P.FP32, _P.FP16, _P.INT8, _P.FP8), True),
}
# (engine name, surgery method, mode, precisions, also .pt2): each method's engine in the mode
# its registry names (V1 answers every task from one backbone pass; V2 routes). None: the
# single expert.
PLANS = (
    (SINGLE_EXPERT, None, EngineMode.ROUTED, (_P.FP32, _P.FP16, _P.INT8), False),
    *((name, m, mode, *_PRECISIONS[m]) for name, (m, mode) in method_engines().items()),
)


def artefact_key(precision: Precision) -> str:
    """``onnx`` for fp32, ``onnx-<precision>`` otherwise (the summary's and report's names)."""
    return "onnx" if precision is Precision.FP32 else f"onnx-{precision}"


@dataclass(frozen=True)
class _TestSet:
    """What every engine of the stage is checked and measured on."""

    images: np.ndarray  # (N, H, W, 3) uint8: every task's test images, for the parity check
    task_ids: np.ndarray  # (N,) int64: each image's task
    data: dict[str, TaskImages]  # the same images with labels per task: the evaluation's
    split: str  # the unlabelled split the calibration images come from


@dataclass(frozen=True)
class _Subject:
    """The model one plan exports, and the rows its parity is checked on."""

    model: MultiTaskModel
    method: str | None  # the surgery method; None: the single expert
    mode: EngineMode
    metadata: dict[str, Any]  # what the engine metadata records it was made from
    images: np.ndarray  # (n, H, W, 3) uint8
    task_ids: np.ndarray | None  # (n,) int64; None for an all-tasks engine


@dataclass(frozen=True)
class _Stage:
    """What every engine of one :func:`export_and_check` shares."""

    run: Run
    out: Path  # where the engines go
    tests: _TestSet
    bar: Any  # the progress bar: advanced once per artefact


def _test_set(run: Run) -> _TestSet:
    """The built-in suite's whole test split; a sample of 256 per task for data from disk."""
    per_task = None if run.config.builtin else 256
    images, task_ids, _ = suite_test_split(run.suite, run.tasks, per_task, run.config.seed)
    data = split_images(run.suite, run.tasks, "test", per_task, run.config.seed)
    split = unlabelled_split(run.config)  # calibration_set refuses an empty one, with advice
    return _TestSet(images, task_ids, data, split)


def _subject(run: Run, method: str | None, mode: EngineMode, tests: _TestSet) -> _Subject:
    """The model of a plan: the merge with ``method``'s adapters (every task's test rows), or
    the first task's expert alone (that task's rows) when ``method`` is None."""
    if method is None:
        task = run.tasks[0]
        # hashed from its bytes: an engine is published from it
        expert = run.experts.experts[task]
        model = run.layout.model(expert, None, [task], run.arch, "cpu", fresh=True)
        rows = tests.task_ids == 0
        ids, images = tests.task_ids[rows], tests.images[rows]
        return _Subject(model, method, mode, {"expert": task}, images, ids)
    model, extra = run.layout.export_model(MERGE, method, device="cpu")
    ids = tests.task_ids if mode is EngineMode.ROUTED else None
    return _Subject(model, method, mode, extra, tests.images, ids)


def export_and_check(run: Run, out_dir: Path, aoti: bool = True) -> dict[str, Any]:
    """Export the demo engines into ``out_dir`` and measure them; returns a JSON-able dict.

    Args:
        run: a run with its experts loaded (:meth:`Run.require_experts`), the
            ``task_arithmetic`` merge and both surgery methods' adapters.
        out_dir: where the engines go.
        aoti: also compile the routed V2 engine as an fp32 ``.pt2`` package (needs a C++
            compiler; about 30 s on a 2-core CPU). A failed compile or quantisation is
            recorded as ``{"error": ...}`` and the rest still runs.

    Returns:
        ``{"tasks", "arch", "single_expert": {...}, "engines": {name: {artefact: {...}}}}``:
        per artefact its file name, ``bytes``, ``parity`` (rows, max_abs_diff,
        argmax_agreement in %, max_abs_logit), export seconds, ``evaluation`` (accuracy per
        task and average through the runtime, ``pytorch`` and ``delta``, ``latency``); plus
        ``bytes_vs_single_expert`` (against the fp32 expert), ``bytes_vs_expert_same_precision``
        and ``bytes_vs_all_experts`` for the multi-task ONNX engines.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tests = _test_set(run)
    result: dict[str, Any] = {
        "arch": run.arch.name,
        "tasks": run.tasks,
        "merge": MERGE,
        "test_images": int(len(tests.images)),
        "calibration": {"split": tests.split, "per_task": DEFAULT_CALIBRATION_IMAGES},
        "engines": {},
    }
    expert_bytes: dict[str, int] = {}
    steps = sum(len(p) + (aoti and pt2) for _, _, _, p, pt2 in PLANS)
    with progress_bar(steps, "export, parity, evaluation") as bar:
        stage = _Stage(run, out, tests, bar)
        for name, method, mode, precisions, pt2 in PLANS:
            subject = _subject(run, method, mode, tests)
            engine = _onnx_engines(stage, name, subject, precisions)
            if method is None:  # first in PLANS: what the multi-task engines are held against
                expert_bytes = {k: v["bytes"] for k, v in engine.items() if _ok(v)}
                result["single_expert"] = {"task": subject.metadata["expert"], **engine["onnx"]}
            else:
                _compare_sizes(engine, expert_bytes, len(run.tasks))
            if aoti and pt2:
                engine["pt2"] = _compile_pt2(subject, out / f"{name}.pt2")
                bar.advance(engine=f"{name}.pt2")
            result["engines"][name] = engine
    return result


def _onnx_engines(
    stage: _Stage, name: str, subject: _Subject, precisions: tuple[Precision, ...]
) -> dict[str, Any]:
    """One plan's ONNX engines, fp32 first (the others are made from it and checked against
    it): what they are made from, then each engine's entry under :func:`artefact_key`."""
    run = stage.run
    source = {k: subject.metadata[k] for k in ("merge", "expert") if k in subject.metadata}
    engine: dict[str, Any] = {
        "method": subject.method or "none",
        "mode": subject.mode.value,
        **source,
    }
    reference = accuracy_on(subject.model, stage.tests.data, "cpu")
    # made when the first fp16 or quantised engine needs it; an error is not cached, so each
    # precision that needs it records it
    calibration = functools.cache(
        functools.partial(
            calibration_set,
            run.suite,
            stage.tests.split,
            subject.model.tasks,
            run.arch.preprocessing,
            DEFAULT_CALIBRATION_IMAGES,
            run.config.seed,
        )
    )
    fp32 = stage.out / f"{name}.onnx"
    for precision in precisions:
        path = stage.out / f"{name}{'' if precision is Precision.FP32 else f'-{precision}'}.onnx"
        t0 = time.perf_counter()
        try:
            check = _write_onnx(subject, precision, path, fp32, calibration)
        except (ConfigError, ExportError) as e:
            if precision is Precision.FP32:  # every other engine is made from it
                raise
            # no adaptation images, a missing quantisation extra or a failed check is
            # recorded, not fatal
            entry = {"error": str(e)}
            if isinstance(e, GateError):  # what the refused engine measured
                entry.update(check=e.check, quantization=e.record)
        else:
            entry = _measure(stage, subject, path, t0, check, reference)
        engine[artefact_key(precision)] = entry
        stage.bar.advance(engine=path.name)
    return engine


def _write_onnx(
    subject: _Subject,
    precision: Precision,
    path: Path,
    fp32: Path,
    calibration: Callable[[], Calibration],
) -> dict[str, Any] | None:
    """Write ``subject``'s ``precision`` engine to ``path``: fp32 exported from PyTorch, fp16
    and the quantised ones checked against the fp32 engine ``fp32`` (written first).

    Returns:
        The fp16 engine's check against the fp32 engine (a quantised engine records its own in
        its metadata); None otherwise.

    Raises:
        ConfigError, ExportError: no calibration images, no quantiser, or a refused engine.
    """
    if precision is Precision.FP32:
        export_onnx(subject.model, path, subject.mode, metadata=subject.metadata)
        return None
    calib = calibration()
    if precision is Precision.FP16:
        metadata = subject.metadata
        _, check = export_half(subject.model, path, subject.mode, calib, metadata, fp32)
        return check
    quantize_engine(fp32, path, default_recipe(precision, Target.ONNXRUNTIME), calib)
    return None


def _measure(
    stage: _Stage,
    subject: _Subject,
    path: Path,
    t0: float,
    check: dict[str, Any] | None,
    reference: dict[str, float],
) -> dict[str, Any]:
    """An engine's entry: its file, size and export time, its check against the fp32 engine
    (fp16), its parity with PyTorch and its evaluation through the runtime."""
    entry = _describe(path, t0)
    if check is not None:
        entry["check"] = check
    parity = check_forward(subject.model, path, subject.images, subject.task_ids)
    entry["parity"] = parity.to_dict()
    entry["evaluation"] = engine_report(path, stage.tests.data, reference)
    return entry


def _compare_sizes(engine: dict[str, Any], expert_bytes: dict[str, int], tasks: int) -> None:
    """Add each multi-task engine's size against the single expert's (fp32 and the same
    precision) and against ``tasks`` fp32 experts."""
    single = expert_bytes.get("onnx")
    for key, entry in engine.items():
        if not _ok(entry):
            continue
        same = expert_bytes.get(key)
        if single:
            entry["bytes_vs_single_expert"] = round(entry["bytes"] / single, 3)
            entry["bytes_vs_all_experts"] = round(entry["bytes"] / (single * tasks), 3)
        if same:
            entry["bytes_vs_expert_same_precision"] = round(entry["bytes"] / same, 3)


def _compile_pt2(subject: _Subject, path: Path) -> dict[str, Any]:
    """The AOTInductor package of ``subject`` at ``path``, checked for parity with PyTorch (a
    failed compile is recorded as ``{"error": ...}``)."""
    t0 = time.perf_counter()
    try:
        path = export_aoti(
            subject.model, path, subject.mode, metadata=subject.metadata, device="cpu"
        )
        entry = _describe(path, t0)
        parity = check_forward(subject.model, path, subject.images, subject.task_ids)
        entry["parity"] = parity.to_dict()
    except ExportError as e:
        return {"error": str(e)}
    return entry


def _ok(entry: Any) -> bool:
    return isinstance(entry, dict) and "bytes" in entry


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
    """The demo's export stage: the task-arithmetic engines in every precision, checked for
    parity and evaluated through the runtime.

    Reuses ``engines/summary.json`` when the merged model, adapters and experts are unchanged
    (by content) and every engine it lists is still there, unchanged (by content hash).
    """
    fp = _fingerprint(run)
    if fp is None:
        return {"skipped": "needs the task_arithmetic merge with both surgery methods"}
    cached = cached_engines(run, fp)
    if cached is not None:
        run.log("reusing exported engines")
        return cached
    folder = run.layout.engines
    summary = folder / "summary.json"
    with run.stage("export"):
        result = export_and_check(run, folder)
    result["fingerprint"] = fp
    result["sha256"] = {f: run.hashes.digest(folder / f) for f in _files(result)}
    write_json_atomic(summary, result)
    return result


def _fingerprint(run: Run) -> str | None:
    """What the export stage's engines are made from (None: the run lacks a part of it)."""
    methods = [m for _, m, _, _, _ in PLANS if m is not None]
    needed = [run.merged.get(MERGE)] + [run.adapters.get((MERGE, m)) for m in methods]
    if any(p is None for p in needed):
        return None
    plan = [(n, m, str(mode), list(p), pt2) for n, m, mode, p, pt2 in PLANS]
    # the engine format too: engines of an older format are exported again, not reused
    return fingerprint(
        *(run.hashes.digest(p) for p in needed),
        run.experts.fingerprint(run.hashes),
        plan,
        FORMAT_VERSION,
    )


def cached_engines(run: Run, fp: str | None = None) -> dict | None:
    """The export stage's ``engines/summary.json`` when it is up to date: made from the run's
    current merge, adapters and experts, and every engine it lists unchanged. Else None."""
    fp = fp or _fingerprint(run)
    summary = run.layout.engines / "summary.json"
    if fp is None or not summary.is_file():
        return None
    try:
        cached = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(cached, dict) and cached.get("fingerprint") == fp and _intact(run, cached):
        return cached
    return None


def _files(result: Any) -> list[str]:
    """The engine file names a summary lists (every ``"file"`` entry)."""
    if isinstance(result, dict):
        own = [result["file"]] if isinstance(result.get("file"), str) else []
        return own + [f for v in result.values() for f in _files(v)]
    if isinstance(result, list):
        return [f for v in result for f in _files(v)]
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

"""Evaluating an exported engine on a run's data: accuracy, the change against PyTorch, size,
and ONNX Runtime CPU latency.

The engine is opened by the runtime and fed the stored images through the runtime's
preprocessing (:mod:`surgery_edge.evaluation.engine`). The PyTorch model it was exported from
is rebuilt from the run's checkpoints, as the engine's metadata names it (``merge`` + ``method``,
or ``expert``), and evaluated on the same images: the difference is what exporting (and
quantising) cost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.data.suite import Suite
from surgery_edge.engine_format import EngineMetadata
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.evaluation.accuracy import accuracy_on
from surgery_edge.evaluation.engine import TaskImages, average, engine_accuracy, engine_latency
from surgery_edge.run.layout import RunLayout
from surgery_edge.run.pipeline import Run, prepare_suite
from surgery_edge.runtime.backends import OnnxBackend
from surgery_edge.runtime.predictor import Predictor, load
from surgery_edge.runtime.preprocess import preprocess
from surgery_edge.surgery.model import MultiTaskModel

SPLITS = ("test", "train")  # the labelled splits (adaptation images carry no labels)
LATENCY_BATCHES = (1, 8)


def split_images(
    suite: Suite, tasks: Sequence[str], split: str = "test", per_task: int | None = None, seed=0
) -> dict[str, TaskImages]:
    """Every task's stored images and labels of ``split`` (a seeded sample of ``per_task``)."""
    if split not in SPLITS:
        raise ConfigError(
            f"Unknown split {split!r}; engines are evaluated on a labelled split: "
            f"{', '.join(SPLITS)}."
        )
    rng = np.random.default_rng(seed)
    out = {}
    for task in tasks:
        data = suite.task(task)
        x, y = (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
        if per_task is not None and len(x) > per_task:
            keep = np.sort(rng.choice(len(x), per_task, replace=False))
            x, y = x[keep], y[keep]
        if len(x) == 0:
            raise ConfigError(f"Task {task!r} has no {split} images to evaluate on.")
        out[task] = TaskImages(x, np.asarray(y))
    return out


def source_model(layout: RunLayout, meta: EngineMetadata, device="cpu") -> MultiTaskModel | None:
    """The PyTorch model the engine was exported from, rebuilt from the run's checkpoints;
    None when its metadata does not say (an engine exported outside a run)."""
    if meta.get("expert"):
        task = meta["expert"]
        return layout.model(layout.expert(task), None, [task], device=device)
    if meta.get("merge"):
        model, _ = layout.export_model(meta["merge"], meta.method, device=device)
        if model.tasks != list(meta.tasks):
            raise ExportError(
                f"The engine serves {list(meta.tasks)} but the run's {meta['merge']} model "
                f"serves {model.tasks}: the engine was exported from another run."
            )
        return model
    return None


def file_bytes(path: Path) -> int:
    """The engine's size on disk, with an external-data file beside it."""
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.is_file() else 0)


def engine_report(
    path: str | os.PathLike,
    data: Mapping[str, TaskImages],
    reference: Mapping[str, float] | None = None,
    device: str = "cpu",
    latency_batches: Sequence[int] = LATENCY_BATCHES,
    threads: int | None = None,
) -> dict[str, Any]:
    """Accuracy of the engine at ``path`` on ``data``, against ``reference`` (PyTorch's
    per-task accuracy on the same images), its size and its latency.

    Latency is ONNX Runtime on the CPU (``threads`` intra-op threads; its default when None)
    for an ONNX engine, and the engine's own backend on ``device`` otherwise.
    """
    path = Path(path)
    predictor = load(path, device=device)
    meta = predictor.meta
    per_task = engine_accuracy(predictor, data)
    report: dict[str, Any] = {
        "engine": path.name,
        "kind": predictor.kind,
        "mode": str(meta.mode),
        "precision": str(meta.precision),
        "method": meta.method,
        "source": {"expert": meta["expert"]}
        if meta.get("expert")
        else {"merge": meta.get("merge"), "method": meta.method},
        "bytes": file_bytes(path),
        "images": int(sum(len(data[t].images) for t in predictor.tasks)),
        "per_task": {t: round(v, 3) for t, v in per_task.items()},
        "avg": round(average(per_task), 3),
    }
    if meta.get("quantization"):
        q = meta["quantization"]
        report["quantization"] = {
            "tool": q.get("tool"),
            "recipe": q.get("recipe"),
            "check": q.get("check"),
        }
    if reference is not None:
        delta = {t: round(per_task[t] - reference[t], 3) for t in per_task}
        report["pytorch"] = {
            "per_task": {t: round(reference[t], 3) for t in per_task},
            "avg": round(average({t: reference[t] for t in per_task}), 3),
        }
        report["delta"] = {
            "per_task": delta,
            "avg": round(report["avg"] - report["pytorch"]["avg"], 3),
            "worst_task": min(delta.values()),
        }
    if latency_batches:
        report["latency"] = latency_report(path, predictor, data, device, latency_batches, threads)
    return report


def latency_report(
    path: Path,
    predictor: Predictor,
    data: Mapping[str, TaskImages],
    device: str,
    batches: Sequence[int],
    threads: int | None,
) -> dict[str, Any]:
    if predictor.kind == "onnx":
        timed = Predictor(OnnxBackend(path, device="cpu", threads=threads))
        backend = "onnxruntime-cpu"
    else:
        timed, backend = predictor, f"{predictor.kind}-{predictor.backend.device}"
    pool = np.concatenate([np.asarray(data[t].images[: max(batches)]) for t in predictor.tasks])
    out: dict[str, Any] = {"backend": backend, "threads": threads}
    for b in batches:
        images = preprocess(list(np.resize(pool, (b, *pool.shape[1:]))), predictor.preprocessing)
        out[f"batch_{b}"] = engine_latency(timed, images)
    return out


def evaluate_engine(
    engine: str | os.PathLike,
    run_dir: str | os.PathLike,
    split: str = "test",
    device: str = "cpu",
    threads: int | None = None,
    latency_batches: Sequence[int] = LATENCY_BATCHES,
) -> dict[str, Any]:
    """``surgery-edge eval-engine``: the engine on every one of its tasks' ``split`` images of
    the run, against the PyTorch model it was exported from (on the run's device).

    Args:
        engine: an engine file (.onnx, .pt2, TensorRT .engine with its sidecar).
        run_dir: the run it was exported from.
        split: ``test`` or ``train``.
        device: where the engine runs for accuracy (``cpu``, ``cuda``, ``auto``).
        threads: ONNX Runtime's intra-op threads for the CPU latency (default: its own).
        latency_batches: batch sizes to time.

    Returns:
        :func:`engine_report`'s dict, plus ``split`` and ``run``.
    """
    engine = Path(engine)
    predictor = load(engine, device=device)  # a bad engine fails before the data is read
    run = Run.open(run_dir, log=lambda *a: None)
    unknown = [t for t in predictor.tasks if t not in run.tasks]
    if unknown:
        raise ConfigError(
            f"Engine {engine} serves tasks {unknown} that run {run_dir} does not have "
            f"({', '.join(run.tasks)}); evaluate it on the run it was exported from."
        )
    prepare_suite(run)
    data = split_images(run.suite, predictor.tasks, split)
    model = source_model(run.layout, predictor.meta, run.device)
    reference = None if model is None else accuracy_on(model, data, run.device)
    report = engine_report(engine, data, reference, device, latency_batches, threads)
    return {"run": str(run.out), "split": split, **report}

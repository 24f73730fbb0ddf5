"""Accuracy and latency of an exported engine, measured through the runtime.

What a user deploys is what is measured: the engine file is opened by the runtime
(:func:`surgery_edge.runtime.load`), fed the images as stored (uint8, any size) through the
runtime's own preprocessing (:meth:`~surgery_edge.runtime.Predictor.predict`), and its answers
are compared with the labels. Nothing here imports torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.data.suite import Suite
from surgery_edge.engine_format import EngineMode
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.progress import progress_bar
from surgery_edge.runtime.backends import OnnxBackend
from surgery_edge.runtime.predictor import Predictor, load
from surgery_edge.runtime.preprocess import preprocess

SPLITS = ("test", "train")  # the labelled splits (adaptation images carry no labels)
LATENCY_BATCHES = (1, 8)


@dataclass(frozen=True)
class TaskImages:
    """One task's stored images and labels."""

    images: np.ndarray  # (N, H, W, 3) uint8 (memory-mapped is fine)
    labels: np.ndarray  # (N,) int


def engine_accuracy(
    predictor: Predictor,
    data: Mapping[str, TaskImages],
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-1 accuracy (%) of the engine on each of its tasks, every image routed to its task.

    Args:
        predictor: the loaded engine.
        data: the images of (at least) every task the engine serves, by task name.
        batch_size: images per :meth:`~surgery_edge.runtime.Predictor.predict` call.

    Returns:
        ``{task: accuracy}`` in the engine's task order.
    """
    missing = [t for t in predictor.tasks if t not in data]
    if missing:
        raise ExportError(
            f"No images for the engine's tasks {missing}; it serves {predictor.tasks}."
        )
    out = {}
    total = sum(len(data[t].images) for t in predictor.tasks)
    with progress_bar(total, "engine accuracy") as bar:
        for task in predictor.tasks:
            images, labels = data[task].images, np.asarray(data[task].labels)
            if len(images) == 0:
                raise ExportError(f"Task {task!r} has no images to evaluate the engine on.")
            correct = 0
            for i in range(0, len(images), batch_size):
                batch = np.asarray(images[i : i + batch_size])
                results = predictor.predict(list(batch), task=task)
                failed = [r.error for r in results if not r.ok]
                if failed:
                    raise ExportError(f"The engine could not answer task {task!r}: {failed[0]}")
                predicted = np.array([r[task].index for r in results])
                correct += int((predicted == labels[i : i + batch_size]).sum())
                bar.advance(len(batch), task=task)
            out[task] = 100.0 * correct / len(images)
    return out


# how long each latency point of an engine report is timed at least (tests shorten it: their
# figures are not read)
MIN_SECONDS = 1.0


def engine_latency(
    predictor: Predictor,
    images: np.ndarray,  # (B, 3, S, S) float32, preprocessed
    min_calls: int = 30,
    min_seconds: float | None = None,
    warmup: int = 5,
) -> dict[str, float]:
    """Milliseconds per engine call on ``images`` (one batch), after ``warmup`` calls.

    A routed engine answers each image for one task (ids cycle through the tasks); an all-tasks
    engine answers every task. Calls repeat until both ``min_calls`` and ``min_seconds``
    (default :data:`MIN_SECONDS`) are reached. Returns the median and the 90th percentile.
    """
    min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
    backend = predictor.backend
    ids = None
    if predictor.mode is EngineMode.ROUTED:
        ids = np.arange(len(images), dtype=np.int64) % len(predictor.tasks)
    bind = getattr(backend, "bind", None)
    call = bind(images, ids) if bind is not None else (lambda: backend.run(images, ids))
    for _ in range(warmup):
        call()
    ms: list[float] = []
    start = time.perf_counter()
    while len(ms) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": round(float(np.median(ms)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "calls": len(ms),
    }


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


def average(per_task: Mapping[str, float]) -> float:
    return float(np.mean(list(per_task.values()))) if per_task else float("nan")

"""Accuracy and latency of an exported engine, measured through the runtime.

What a user deploys is what is measured: the engine file is opened by the runtime
(:func:`surgery_edge.runtime.load`), fed the images as stored (uint8, any size) through the
runtime's own preprocessing (:meth:`~surgery_edge.runtime.Predictor.predict`), and its answers
are compared with the labels. Nothing here imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from surgery_edge.engine_format import EngineMode
from surgery_edge.errors import ExportError
from surgery_edge.runtime.predictor import Predictor


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
        out[task] = 100.0 * correct / len(images)
    return out


def engine_latency(
    predictor: Predictor,
    images: np.ndarray,  # (B, 3, S, S) float32, preprocessed
    min_calls: int = 30,
    min_seconds: float = 1.0,
    warmup: int = 5,
) -> dict[str, float]:
    """Milliseconds per engine call on ``images`` (one batch), after ``warmup`` calls.

    A routed engine answers each image for one task (ids cycle through the tasks); an all-tasks
    engine answers every task. Calls repeat until both ``min_calls`` and ``min_seconds`` are
    reached. Returns the median and the 90th percentile.
    """
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


def average(per_task: Mapping[str, float]) -> float:
    return float(np.mean(list(per_task.values()))) if per_task else float("nan")

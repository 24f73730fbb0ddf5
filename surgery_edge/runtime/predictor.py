"""The Predictor: one multi-task engine, any backend, images in, labels and probabilities out."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.engine_format import EngineMode
from surgery_edge.errors import ExportError
from surgery_edge.runtime.backends import Backend, open_backend
from surgery_edge.runtime.preprocess import (
    DEFAULT_MAX_PIXELS,
    ENCODED,
    ImageLike,
    check_max_pixels,
    describe,
    normalise,
    open_image,
    resize_crop,
)

TaskRef = str | int


@dataclass(frozen=True)
class TaskPrediction:
    """One task's answer for one image."""

    task: str
    index: int  # the predicted class index
    label: str  # its class name
    probs: tuple[float, ...]  # one per class of this task

    @property
    def score(self) -> float:
        return self.probs[self.index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "index": self.index,
            "label": self.label,
            "score": self.score,
            "probs": list(self.probs),
        }


@dataclass(frozen=True)
class ImageResult:
    """Every requested task's answer for one input image, or why it could not be answered."""

    source: str
    predictions: list[TaskPrediction] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __getitem__(self, task: str) -> TaskPrediction:
        for p in self.predictions:
            if p.task == task:
                return p
        raise KeyError(task)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with the attributes' names: ``source``, then ``predictions`` (task ->
        answer) or ``error``."""
        out: dict[str, Any] = {"source": self.source}
        if self.error is not None:
            out["error"] = self.error
        else:
            out["predictions"] = {p.task: p.to_dict() for p in self.predictions}
        return out


def softmax(logits: np.ndarray) -> np.ndarray:  # (B, C) -> (B, C), -inf -> 0
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Predictor:
    """Serves a multi-task engine made by ``surgery-edge export``.

    Any engine answers any request: a routed engine answers "every task" by routing each image
    once per task; an all-tasks engine answers one task by running all and keeping that one.

    Images are decoded and answered ``batch_size`` at a time, so memory stays bounded however
    many are asked about; :meth:`iter_predict` yields the answers as each batch finishes.

    Args:
        backend: a loaded engine (see :func:`load`).
        max_pixels: the most pixels a file or encoded image may declare; a larger one gets an
            error result (decompression bombs are refused from their header).
        batch_size: images decoded and answered at a time (default: the backend's largest
            batch, 64 for ONNX Runtime).
    """

    def __init__(
        self,
        backend: Backend,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        batch_size: int | None = None,
    ):
        self.backend = backend
        self.max_pixels = check_max_pixels(max_pixels)
        self.batch_size = int(backend.max_batch if batch_size is None else batch_size)
        if self.batch_size < 1:
            raise ExportError(f"batch_size must be at least 1, not {batch_size}.")
        self.meta = backend.meta
        self.tasks: list[str] = list(self.meta.tasks)
        self.class_names: list[list[str]] = [list(c) for c in self.meta.class_names]
        self.class_counts = self.meta.class_counts
        self.preprocessing = self.meta.preprocessing
        self.image_size = self.preprocessing.image_size

    @property
    def mode(self) -> EngineMode:
        return self.meta.mode

    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def path(self) -> Path:
        return self.backend.path

    def __repr__(self) -> str:
        return (
            f"Predictor({self.path}, {self.kind}, {self.mode}, {self.meta.precision}, "
            f"method={self.meta.method}, tasks={self.tasks})"
        )

    # --- tasks -----------------------------------------------------------------------------

    def task_index(self, task: TaskRef) -> int:
        """A task name or id -> its id; ExportError listing the tasks when it is neither."""
        known = ", ".join(f"{i}={t}" for i, t in enumerate(self.tasks))
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
            if not 0 <= int(task) < len(self.tasks):
                raise ExportError(
                    f"Task id {int(task)} is out of range: this engine has {len(self.tasks)} "
                    f"tasks ({known})."
                )
            return int(task)
        if isinstance(task, str):
            if task in self.tasks:
                return self.tasks.index(task)
            if task.strip().lstrip("-").isdigit():
                return self.task_index(int(task))
        raise ExportError(f"Unknown task {task!r}; this engine serves {known}.")

    # --- raw logits ------------------------------------------------------------------------

    def _check_batch(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise ExportError(
                f"engine input must be (B, 3, {s}, {s}) float32, got {tuple(images.shape)}; "
                "use predict() for raw images."
            )
        return images

    def _chunks(self, n: int):
        step = max(1, int(self.backend.max_batch))
        for i in range(0, n, step):
            yield slice(i, min(i + step, n))

    def routed_logits(
        self,
        images: np.ndarray,  # (B, 3, S, S) float32, preprocessed
        task_ids: np.ndarray,  # (B,) int
    ) -> np.ndarray:  # (B, C_max) float32, -inf beyond each task's classes
        """Each image answered for its own task."""
        images = self._check_batch(images)
        ids = np.asarray(task_ids, np.int64).reshape(-1)
        if len(ids) != len(images):
            raise ExportError(f"{len(images)} images but {len(ids)} task ids.")
        for t in np.unique(ids):
            self.task_index(int(t))
        if self.mode is EngineMode.ROUTED:
            parts = [self.backend.run(images[s], ids[s])[0] for s in self._chunks(len(ids))]
            return np.concatenate(parts) if parts else np.zeros((0, max(self.class_counts)))
        per_task = self.all_task_logits(images)
        out = np.full((len(ids), max(self.class_counts)), -np.inf, np.float32)
        for t, logits in enumerate(per_task):
            rows = ids == t
            out[rows, : logits.shape[1]] = logits[rows]
        return out

    def all_task_logits(self, images: np.ndarray) -> list[np.ndarray]:
        """Every image answered for every task: a list of T arrays (B, C_t)."""
        images = self._check_batch(images)
        B, T = len(images), len(self.tasks)
        if self.mode is EngineMode.ALL_TASKS:
            parts = [self.backend.run(images[s], None) for s in self._chunks(B)]
            return [
                np.concatenate([p[t] for p in parts])
                if parts
                else np.zeros((0, self.class_counts[t]), np.float32)
                for t in range(T)
            ]
        # A routed engine: every image once per task, in one (chunked) pass.
        ids = np.repeat(np.arange(T, dtype=np.int64), B)
        logits = self.routed_logits(np.concatenate([images] * T), ids)  # (T * B, C_max)
        logits = logits.reshape(T, B, logits.shape[-1])  # -1 fails for an empty batch
        return [logits[t, :, : self.class_counts[t]] for t in range(T)]

    # --- images in, answers out ------------------------------------------------------------

    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        task: TaskRef | Sequence[TaskRef] | None = None,
        all_tasks: bool = False,
    ) -> list[ImageResult]:
        """Classify images.

        Args:
            images: one image or a sequence: file paths, encoded image bytes (PNG, JPEG, ...),
                PIL images, or (H, W, 3) uint8 arrays (any size; grey or RGBA is converted to
                RGB). An (N, H, W, 3) array is N images.
            task: the task (name or id) to answer, or one task per image. ``None`` with a
                single-task engine means that task.
            all_tasks: answer every task for every image.

        Returns:
            One :class:`ImageResult` per image, in order. An image that cannot be read (or
            declares more than ``max_pixels`` pixels) gets a result with ``error`` set; the
            others are still answered.
        """
        items = _as_list(images)
        if not items:
            raise ExportError("No images to predict.")
        ids = self._resolve_tasks(task, all_tasks, len(items))  # checks every task up front
        return list(self.iter_predict(items, None if ids is None else ids.tolist(), all_tasks))

    def iter_predict(
        self,
        images: Iterable[ImageLike],
        task: TaskRef | Iterable[TaskRef] | None = None,
        all_tasks: bool = False,
    ) -> Iterator[ImageResult]:
        """Like :meth:`predict`, but lazily: images are read ``batch_size`` at a time from any
        iterable (a generator of paths, say) and each batch's results are yielded before the
        next batch is read, so memory does not grow with the number of images."""
        per_image = task is not None and not isinstance(task, (str, int, np.integer))
        if per_image:
            if all_tasks:
                raise ExportError("Ask for one task or for all tasks, not both.")
            pairs, every = _strict_pairs(_as_iter(images), iter(task)), False
        else:
            fixed = self._resolve_tasks(task, all_tasks, 1)  # None: every task
            first = None if fixed is None else int(fixed[0])
            pairs, every = ((image, first) for image in _as_iter(images)), fixed is None
        offset = 0
        while chunk := list(itertools.islice(pairs, self.batch_size)):
            ids = None if every else [self.task_index(t) for _, t in chunk]
            yield from self._predict_chunk([image for image, _ in chunk], ids, offset)
            offset += len(chunk)

    def _predict_chunk(
        self, items: list[ImageLike], task_ids: list[int] | None, offset: int
    ) -> list[ImageResult]:
        """Decode, run and answer one batch; ``task_ids`` None means every task."""
        pre, s = self.preprocessing, self.image_size
        names, arrays, errors = [], [], {}
        for i, image in enumerate(items):
            names.append(describe(image, offset + i))
            try:
                decoded = open_image(image, self.max_pixels)
                arrays.append(resize_crop(decoded, s, pre.resize, pre.interpolation))
            except ExportError as e:
                errors[i] = str(e)
        good = [i for i in range(len(items)) if i not in errors]
        batch = np.stack(arrays) if arrays else np.zeros((0, s, s, 3), np.uint8)
        x = normalise(batch, pre.mean, pre.std)  # (len(good), 3, S, S)
        answers: dict[int, list[TaskPrediction]] = {}
        if good and task_ids is None:
            per_task = self.all_task_logits(x)
            for k, i in enumerate(good):
                answers[i] = [self._answer(t, per_task[t][k]) for t in range(len(self.tasks))]
        elif good:
            ids = np.asarray(task_ids, np.int64)[good]
            logits = self.routed_logits(x, ids)
            for k, i in enumerate(good):
                t = int(ids[k])
                answers[i] = [self._answer(t, logits[k, : self.class_counts[t]])]
        return [
            ImageResult(names[i], error=errors[i])
            if i in errors
            else ImageResult(names[i], answers[i])
            for i in range(len(items))
        ]

    def _resolve_tasks(
        self, task: TaskRef | Sequence[TaskRef] | None, all_tasks: bool, n: int
    ) -> np.ndarray | None:
        """Per-image task ids, or None for every task."""
        if all_tasks:
            if task is not None:
                raise ExportError("Ask for one task or for all tasks, not both.")
            return None
        if task is None:
            if len(self.tasks) == 1:
                return np.zeros(n, np.int64)
            raise ExportError(
                f"This engine serves {len(self.tasks)} tasks ({', '.join(self.tasks)}): choose "
                "one (task=... / --task) or ask for all of them (all_tasks=True / --all-tasks)."
            )
        if isinstance(task, (str, int, np.integer)):
            return np.full(n, self.task_index(task), np.int64)
        refs = list(task)
        if len(refs) != n:
            raise ExportError(f"{n} images but {len(refs)} tasks; give one task per image.")
        return np.array([self.task_index(t) for t in refs], np.int64)

    def check_finite(self) -> None:
        """Run every task once on a blank image; ExportError when an answer is NaN or infinite
        (weights that hold NaN or overflowed, e.g. in fp16), before any real image is served."""
        blank = np.zeros((1, 3, self.image_size, self.image_size), np.float32)
        for t, logits in enumerate(self.all_task_logits(blank)):
            if not np.isfinite(logits).all():
                raise ExportError(
                    f"Engine {self.path} gives non-finite logits for task {self.tasks[t]!r}: its "
                    "weights hold NaN or infinity (or overflow at its precision). Re-export it "
                    "from finite checkpoints (and at fp32 if it is fp16)."
                )

    def _answer(self, t: int, logits: np.ndarray) -> TaskPrediction:
        probs = softmax(np.asarray(logits, np.float64)[None])[0]
        index = int(np.argmax(logits))
        return TaskPrediction(
            self.tasks[t], index, self.class_names[t][index], tuple(float(p) for p in probs)
        )


def _as_list(images) -> list:
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike, *ENCODED)) or not isinstance(images, Sequence):
        return [images]
    return list(images)


def _as_iter(images) -> Iterator:
    if isinstance(images, (np.ndarray, str, os.PathLike, *ENCODED)):
        return iter(_as_list(images))
    return iter(images)


_END = object()


def _strict_pairs(images: Iterator, tasks: Iterator) -> Iterator[tuple[Any, TaskRef]]:
    """``zip(images, tasks)`` that fails when one runs out before the other."""
    for image, task in itertools.zip_longest(images, tasks, fillvalue=_END):
        if image is _END or task is _END:
            raise ExportError("The images and the tasks differ in number; give one task per image.")
        yield image, task


def load(
    path: str | os.PathLike,
    device: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int | None = None,
) -> Predictor:
    """Open an engine made by ``surgery-edge export``: ``.onnx`` (ONNX Runtime), ``.pt2``
    (AOTInductor) or ``.engine`` / ``.plan`` / ``.trt`` (TensorRT, with its ``.json`` sidecar).

    Args:
        path: the engine file.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (anything else is an error).
        max_pixels: the most pixels an image file may declare (see :class:`Predictor`).
        batch_size: images decoded and answered at a time (default: the backend's largest).

    The engine is verified against the digest its export recorded (a changed or damaged copy
    is refused with ExportError), then checked to answer every task with finite logits before
    it is returned.
    """
    backend = open_backend(path, device=device)
    predictor = Predictor(backend, max_pixels=max_pixels, batch_size=batch_size)
    predictor.check_finite()
    return predictor

"""The calibration data of a quantised (or fp16) engine, and the check before it is published.

The publishing gate, derived from the accuracy targets (:data:`ACCURACY_TARGETS`: int8 and fp8
within 1 point of the fp32 engine's average accuracy and 2 points on any task; fp16 within 0.1
and 0.5). On any set of labelled images, the two engines score the same on every image where
their top-1 answers agree, so

    accuracy(engine) - accuracy(fp32) = (right only by the engine - right only by fp32) / n,

and both counts are disagreements: the accuracy changes by at most the disagreement rate, on
any labelling. An agreement of at least ``100 - target`` % therefore bounds the change by the
target: 99% for int8 and fp8, 99.9% for fp16, averaged over the tasks (the average accuracy is
the tasks' mean), and 98% / 99.5% on each task. The gate measures the agreement without labels
on held-out adaptation images, drawn from the same distribution as the test images; on ``n``
held-out images it is an estimate, so the check also records the one-sided 95% upper
confidence bound of each task's disagreement (Clopper-Pearson). That bound is reported, not
gated: with no disagreement at all it is ``1 - 0.05 ** (1 / n)``, about ``3 / n``, so gating
on it would refuse every int8 engine checked on fewer than 299 images per task (2,995 for fp16).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.engine_format import EngineMode, Precision
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.runtime.backends import OnnxBackend
from surgery_edge.runtime.predictor import Predictor

# The accuracy targets against the fp32 engine, in points: (average over the tasks, any one task).
ACCURACY_TARGETS: dict[Precision, tuple[float, float]] = {
    Precision.FP16: (0.1, 0.5),
    Precision.INT8: (1.0, 2.0),
    Precision.FP8: (1.0, 2.0),
}


class GateError(ExportError):
    """An engine refused by :func:`gate`: ``check`` holds the agreement it measured and
    ``record`` (set by :func:`quantize_engine`) the engine's quantisation record."""

    def __init__(self, message: str, check: dict[str, Any]):
        super().__init__(message)
        self.check = check
        self.record: dict[str, Any] | None = None


# --- calibration data ------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Preprocessed engine inputs to calibrate on and, held out, to check the result with.

    Attributes:
        images: (N, 3, S, S) float32, preprocessed by the runtime.
        task_ids: (N,) int64, each image's own task.
        check_images, check_task_ids: held-out images (not calibrated on) for the agreement
            check against the fp32 engine.
        source: what the images are, for the metadata (split, images per task, ...).
    """

    images: np.ndarray
    task_ids: np.ndarray
    check_images: np.ndarray
    check_task_ids: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.images) == 0:
            raise ConfigError(
                "No calibration images: quantisation needs at least one adaptation image per "
                "task (--calibration-images N, N >= 1)."
            )
        if len(self.images) != len(self.task_ids) or len(self.check_images) != len(
            self.check_task_ids
        ):
            raise ValueError("calibration images and task ids differ in length")
        if image_digests(self.images) & image_digests(self.check_images):
            raise ValueError("a held-out check image is also a calibration image")

    def feeds(self, mode: EngineMode) -> dict[str, np.ndarray]:
        feeds = {"images": np.ascontiguousarray(self.images, np.float32)}
        if mode is EngineMode.ROUTED:
            feeds["task_ids"] = np.ascontiguousarray(self.task_ids, np.int64)
        return feeds

    def batches(self, mode: EngineMode, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        feeds = self.feeds(mode)
        for i in range(0, len(self.images), batch_size):
            yield {k: v[i : i + batch_size] for k, v in feeds.items()}


def image_digests(images: np.ndarray) -> set[bytes]:
    """One digest per image of ``images`` (N, ...): equal images, equal digests."""
    return {
        hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest() for x in images
    }


# --- the check ---------------------------------------------------------------------------------


def agreement(
    engine: Predictor, reference: Predictor, images: np.ndarray, task_ids: np.ndarray
) -> dict[str, Any]:
    """Top-1 agreement (%) of ``engine`` with ``reference``, over all images and per task, and
    their largest logit gap, over each image's own task's classes (an fp16 graph may pad with
    -65504 instead of -inf).

    Returns:
        ``images``, ``argmax_agreement`` (over all images), ``max_abs_logit_diff`` and
        ``per_task``: ``{task: {"images", "agree"}}`` for every task with images.
    """
    agree, gap, batch = 0, 0.0, 64
    counts = np.asarray(reference.class_counts)
    per_task = {t: [0, 0] for t in range(len(reference.tasks))}
    for i in range(0, len(images), batch):
        x, ids = images[i : i + batch], task_ids[i : i + batch]
        got, ref = engine.routed_logits(x, ids), reference.routed_logits(x, ids)
        valid = np.arange(ref.shape[1])[None, :] < counts[ids][:, None]
        if not np.isfinite(got[valid]).all():
            raise ExportError(
                f"The quantised engine {engine.path.name} returns non-finite logits for real "
                "classes: the quantisation is broken. Please report this with the model's "
                "architecture."
            )
        masked = np.where(valid, got, -np.inf)
        same = masked.argmax(-1) == ref.argmax(-1)
        agree += int(same.sum())
        for t in np.unique(ids):
            per_task[int(t)][0] += int((ids == t).sum())
            per_task[int(t)][1] += int(same[ids == t].sum())
        gap = max(gap, float(np.abs(got[valid] - ref[valid]).max(initial=0.0)))
    return {
        "images": int(len(images)),
        "argmax_agreement": round(100.0 * agree / max(len(images), 1), 3),
        "max_abs_logit_diff": round(gap, 5),
        "per_task": {
            reference.tasks[t]: {"images": n, "agree": k} for t, (n, k) in per_task.items() if n
        },
    }


def agreement_floor(precision: Precision) -> tuple[float, float]:
    """The least top-1 agreement (%) with the fp32 engine, (averaged over the tasks, on each
    task), that bounds the accuracy change by :data:`ACCURACY_TARGETS` (module docstring)."""
    average, task = ACCURACY_TARGETS[precision]
    return 100.0 - average, 100.0 - task


def disagreement_upper_bound(images: int, disagree: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound (%) of a disagreement rate seen as ``disagree`` of
    ``images`` (Clopper-Pearson: exact for a binomial sample)."""
    from scipy.stats import beta  # deferred: scikit-learn's dependency, only the gate needs it

    if disagree >= images:
        return 100.0
    return 100.0 * float(beta.ppf(confidence, disagree + 1, images - disagree))


def gate(
    engine: Predictor, reference: Predictor, calibration: Calibration, precision: Precision
) -> dict[str, Any]:
    """Check ``engine`` against the fp32 ``reference`` on the held-out images of
    ``calibration`` (never the calibration images) before it is published.

    Returns:
        :func:`agreement`'s record plus ``agreement_avg`` (the tasks' mean, %), each task's
        ``agreement`` and ``disagreement_upper_95`` (%), ``worst_task`` and the ``floor``.

    Raises:
        ExportError: a task has no held-out image, or the agreement is below
            :func:`agreement_floor` on average or on any task: the message names the worst
            task and its agreement.
    """
    floor_avg, floor_task = agreement_floor(precision)
    images, ids = calibration.check_images, calibration.check_task_ids
    check = agreement(engine, reference, images, ids)
    missing = [t for t in reference.tasks if t not in check["per_task"]]
    if missing:
        raise ExportError(
            f"No held-out adaptation image of task(s) {', '.join(missing)} to check the "
            f"{precision} engine against fp32 with (every image was used to calibrate); it was "
            "not written. Give those tasks more adaptation images, or fewer "
            "--calibration-images."
        )
    for entry in check["per_task"].values():
        n, k = entry["images"], entry["agree"]
        entry["agreement"] = round(100.0 * k / n, 3)
        entry["disagreement_upper_95"] = round(disagreement_upper_bound(n, n - k), 3)
    tasks = check["per_task"]
    worst = min(tasks, key=lambda t: (tasks[t]["agreement"], t))
    check["agreement_avg"] = round(float(np.mean([e["agreement"] for e in tasks.values()])), 3)
    check["worst_task"] = worst
    check["floor"] = {"average": floor_avg, "per_task": floor_task}
    low_avg, low_task = check["agreement_avg"] < floor_avg, tasks[worst]["agreement"] < floor_task
    if low_avg or low_task:
        target_avg, target_task = ACCURACY_TARGETS[precision]
        low = tasks[worst]["agreement"]
        raise GateError(
            f"The {precision} engine agrees with the fp32 engine on {low:.2f}% "
            f"of task {worst!r}'s {tasks[worst]['images']} held-out adaptation images (its worst "
            f"task; at least {floor_task:g}% on each is required) and on "
            f"{check['agreement_avg']:.2f}% of {check['images']} on average over the tasks (at "
            f"least {floor_avg:g}%): its accuracy could move by more than the target "
            f"({target_avg:g} point on average, {target_task:g} on a task). It was not "
            "written. Keep more node groups in higher precision, or use more calibration "
            "images.",
            check,
        )
    return check


def check_engine(path: str | Path, fp32: str | Path, calibration: Calibration) -> dict[str, Any]:
    """:func:`gate` for the engine file ``path`` against the fp32 engine file ``fp32``, at the
    floor of ``path``'s precision (fp16, int8 or fp8)."""
    engine = Predictor(OnnxBackend(path, device="cpu"))
    reference = Predictor(OnnxBackend(fp32, device="cpu"))
    return gate(engine, reference, calibration, engine.meta.precision)

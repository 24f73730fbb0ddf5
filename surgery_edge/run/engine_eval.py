"""Evaluating an exported engine on a run's data: accuracy, the change against PyTorch, size,
and ONNX Runtime CPU latency (``surgery-edge eval-engine``).

The engine is opened by the runtime and fed the stored images through the runtime's
preprocessing (:func:`surgery_edge.evaluation.engine.engine_report`). The PyTorch model it was
exported from is rebuilt from the run's checkpoints, as the engine's metadata names it
(``merge`` + ``method``, or ``expert``), and evaluated on the same images: the difference is
what exporting (and quantising) cost.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery_edge.engine_format import EngineMetadata
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.evaluation.accuracy import accuracy_on
from surgery_edge.evaluation.engine import LATENCY_BATCHES, engine_report, split_images
from surgery_edge.run.layout import RunLayout
from surgery_edge.run.state import Run, prepare_suite
from surgery_edge.runtime.predictor import load
from surgery_edge.surgery.model import MultiTaskModel


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
        :func:`~surgery_edge.evaluation.engine.engine_report`'s dict, plus ``split`` and
        ``run``.
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


def summary_line(report: dict[str, Any]) -> str:
    """One line of :func:`evaluate_engine`'s result, for ``surgery-edge export``."""
    line = f"{report['engine']}: {report['precision']}, {report['bytes']:,} bytes, "
    line += f"accuracy {report['avg']:.2f}% on {report['images']} {report['split']} images"
    if "delta" in report:
        d = report["delta"]
        line += f" ({d['avg']:+.2f} pt against PyTorch, worst task {d['worst_task']:+.2f})"
    latency = report.get("latency", {})
    times = [f"{v['median_ms']:.3f} ms @{k[6:]}" for k, v in latency.items() if k[:6] == "batch_"]
    if times:
        line += f"; {latency['backend']} " + ", ".join(times)
    return line

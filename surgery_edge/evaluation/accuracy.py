"""Accuracy of encoders and multi-task models on the suite's test split."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from surgery_edge.data.suite import Suite
from surgery_edge.data.transforms import to_model_input
from surgery_edge.evaluation.engine import TaskImages
from surgery_edge.surgery.model import MultiTaskModel


@torch.no_grad()
def routed_accuracy(
    model: MultiTaskModel,
    suite: Suite,
    device: torch.device,
    batch_size: int = 256,
    split: str = "test",
) -> dict[str, float]:
    """Per-task top-1 accuracy (percent), each image routed to its own task."""
    model.eval()
    out = {}
    for t, task in enumerate(model.tasks):
        data = suite.task(task)
        x_all, y_all = (
            (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
        )
        correct = 0
        for i in range(0, len(x_all), batch_size):
            x = to_model_input(x_all[i : i + batch_size], model.encoder.arch, device)
            ids = torch.full((len(x),), t, dtype=torch.long, device=device)
            pred = model(x, ids).argmax(-1).cpu().numpy()
            correct += int((pred == y_all[i : i + batch_size]).sum())
        out[task] = 100.0 * correct / len(x_all)
    return out


def average(per_task: dict[str, float]) -> float:
    return float(np.mean(list(per_task.values()))) if per_task else float("nan")


@torch.no_grad()
def accuracy_on(
    model: MultiTaskModel,
    data: Mapping[str, TaskImages],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """Per-task top-1 accuracy (percent) of ``model`` on given images, each routed to its task
    (the PyTorch row an engine evaluated on the same images is compared with)."""
    model.eval()
    out = {}
    for t, task in enumerate(model.tasks):
        images, labels = data[task].images, np.asarray(data[task].labels)
        correct = 0
        for i in range(0, len(images), batch_size):
            x = to_model_input(np.asarray(images[i : i + batch_size]), model.encoder.arch, device)
            ids = torch.full((len(x),), t, dtype=torch.long, device=device)
            pred = model(x, ids).argmax(-1).cpu().numpy()
            correct += int((pred == labels[i : i + batch_size]).sum())
        out[task] = 100.0 * correct / max(len(images), 1)
    return out

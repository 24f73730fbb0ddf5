"""The graphs every exporter traces: thin wrappers that fix the engine's inputs and outputs.

Both wrappers take float32 images and return float32 tensors whatever the precision: for fp16
the images are cast to half inside the graph, the backbone, adapters and heads run in half,
and the logits are cast back to float32 (so the softmax, and a caller, always see float32).
The wrapped model must be on its reference (pure PyTorch) path: exporters trace ops that ONNX,
TensorRT and Inductor all understand.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from surgery_edge.engine_format import EngineMode
from surgery_edge.surgery.model import MultiTaskModel


class RoutedEngine(nn.Module):
    """``images (B, 3, H, W) float32, task_ids (B,) int64 -> logits, probs (B, C_max) float32``.

    Logits beyond a task's class count are ``-inf`` (so their probabilities are 0). Routing is a
    gather of each row's adapters and head by its task id: no loop over tasks in the graph.
    """

    def __init__(self, model: MultiTaskModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(
        self,
        images: torch.Tensor,  # (B, 3, H, W) float32
        task_ids: torch.Tensor,  # (B,) int64
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (B, C_max), (B, C_max)
        logits = self.model(images.to(self.dtype), task_ids).float()
        return logits, torch.softmax(logits, dim=-1)


class AllTasksEngine(nn.Module):
    """``images (B, 3, H, W) float32 -> (logits_t (B, C_t) float32 for every task t)``."""

    def __init__(self, model: MultiTaskModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, x = self.model, images.to(self.dtype)
        if m.bank is None or m.bank.sites == ("final",):
            return tuple(t.float() for t in m.forward_all_tasks(x))
        # SurgeryV2: the batch is expanded to (T x B) task-major rows, as forward_all_tasks
        # does, but with the task ids built by expand + reshape: torch.onnx (onnxscript 0.7)
        # exports ``arange(T).repeat_interleave(B)`` with a dynamic B wrongly (right for B = 1
        # only), which no ONNX check catches.
        T, B = m.num_tasks, x.shape[0]
        task_ids = torch.arange(T, device=x.device).unsqueeze(1).expand(T, B).reshape(-1)
        logits = m(x.repeat(T, 1, 1, 1), task_ids).float().view(T, B, -1)
        return tuple(logits[t, :, : m.class_counts[t]] for t in range(T))


def engine_module(
    model: MultiTaskModel,
    mode: EngineMode | str,
    fp16: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A copy of ``model`` on ``device`` in the export precision, wrapped for ``mode``."""
    dtype = torch.float16 if fp16 else torch.float32
    copied = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    copied.fused = False  # exporters trace the reference path (plain ONNX-representable ops)
    wrapper = RoutedEngine if EngineMode.parse(mode) is EngineMode.ROUTED else AllTasksEngine
    return wrapper(copied, dtype).eval()


def example_inputs(
    model: MultiTaskModel,
    mode: EngineMode | str,
    batch: int = 2,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: ``batch`` random images (and task ids cycling through the tasks)."""
    s = model.encoder.arch.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, s, s, generator=gen).to(device)
    if EngineMode.parse(mode) is EngineMode.ALL_TASKS:
        return (images,)
    return images, (torch.arange(batch) % model.num_tasks).to(device)

"""The graphs every exporter traces: thin wrappers that fix the engine's inputs and outputs.

Both wrappers take float32 images and return float32 tensors whatever the precision: for fp16
the images are cast to half inside the graph, the backbone, adapters and heads run in half,
and the logits are cast back to float32 (so the softmax, and a caller, always see float32).
The wrapped model must be on its reference (pure PyTorch) path: exporters trace ops that ONNX,
TensorRT and Inductor all understand.

Before a graph is traced, :func:`check_magnitudes` refuses weights no training makes: NaN and
infinity are caught where files are read, but finite garbage (adapters scaled by 1e30, say)
would be exported and answer nonsense, or turn into infinity in an fp16 engine.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from surgery_edge.engine_format import EngineMode, Precision
from surgery_edge.errors import ExportError
from surgery_edge.surgery.model import MultiTaskModel

# Adapters and heads may hold values up to this many times the backbone's largest weight (its
# LayerNorm gains and embeddings: about 1 in every ViT here). Measured, as max |w| over the
# backbone's: trained adapters 0.21x (tiny run), 0.91x (V1) and 0.52x (V2) on the demo run;
# heads (class means scaled by the logit scale, 20) 8.9x and 5.1x. CLIP's zero-shot heads (unit
# rows times 100) stay within 100x. The factor leaves 10x above all of those and still refuses
# corrupted or hand-scaled files by many orders of magnitude.
MAGNITUDE_FACTOR = 1000.0
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504: beyond it an fp16 weight is infinite


@dataclass(frozen=True)
class WeightFiles:
    """The files a model's tensors were read from, for the messages of
    :func:`check_magnitudes` (``None``: named by their part of the model)."""

    backbone: str | None = None
    adapters: str | None = None
    heads: Sequence[str] | None = None  # one per task, in task order


def _tensors(
    model: MultiTaskModel, files: WeightFiles
) -> Iterator[tuple[str, str, str, torch.Tensor]]:
    """``(part, file, tensor name, values)`` of every weight: ``part`` is backbone, adapters
    or heads."""
    backbone = files.backbone or "the merged backbone"
    for name, value in model.encoder.named_parameters():
        yield "backbone", backbone, name, value
    if model.bank is not None:
        adapters = files.adapters or "the adapters"
        for site in model.bank.sites:
            for kind, stacked in zip(("down", "up"), model.bank.weights(site)):
                for t, task in enumerate(model.tasks):
                    yield "adapters", adapters, f"{task}/{site}/{kind}", stacked[t]
    for t, task in enumerate(model.tasks):
        head = files.heads[t] if files.heads else f"the head of task {task!r}"
        count = model.class_counts[t]  # the columns beyond are padding (bias -inf)
        yield "heads", head, "weight", model.head_weight[t, :count]
        yield "heads", head, "bias", model.head_bias[t, :count]


def check_magnitudes(
    model: MultiTaskModel, half: bool = False, files: WeightFiles | None = None
) -> None:
    """Refuse a model whose adapters or heads are far larger than training makes them, or
    whose weights an fp16 engine cannot hold.

    Args:
        model: the model about to be exported.
        half: the engine computes in fp16: every weight must fit its range (|w| <= 65504).
        files: where the tensors came from, to name them in the message.

    Raises:
        ExportError: naming the file and tensor: non-finite values; an adapter or head value
            beyond :data:`MAGNITUDE_FACTOR` times the backbone's largest weight; with ``half``,
            any weight beyond fp16's range.
    """
    tensors = list(_tensors(model, files or WeightFiles()))
    peaks = {}
    with torch.no_grad():
        for _, file, name, value in tensors:
            if value.numel() and not bool(torch.isfinite(value).all()):
                raise ExportError(
                    f"{file}: tensor {name} holds NaN or infinity; no engine was exported. "
                    "Re-create the file (re-train the adapters, or restore the checkpoint)."
                )
            peaks[file, name] = float(value.abs().max()) if value.numel() else 0.0
    scale = max((peaks[f, n] for part, f, n, _ in tensors if part == "backbone"), default=1.0)
    bound = MAGNITUDE_FACTOR * scale
    for part, file, name, _ in tensors:
        peak = peaks[file, name]
        if part != "backbone" and peak > bound:
            raise ExportError(
                f"{file}: tensor {name} holds values up to {peak:.3g}, {peak / scale:.3g} times "
                f"the backbone's largest weight ({scale:.3g}); trained {part} stay within "
                f"{MAGNITUDE_FACTOR:g} times it. The file is damaged or was not made by "
                "training, so no engine was exported: re-create it (re-train the adapters, or "
                "restore the checkpoint)."
            )
        if half and peak > FP16_MAX:
            raise ExportError(
                f"{file}: tensor {name} holds values up to {peak:.3g}, beyond what fp16 holds "
                f"(+-{FP16_MAX:g}): an fp16 engine would compute with infinity, so none was "
                "exported. Export at fp32 (--precision fp32), or re-create the file."
            )


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


def weight_dtype(precision: Precision) -> torch.dtype:
    """The dtype of an exported model's weights and compute: fp32 or fp16 (an int8 or fp8
    engine is quantised from the fp32 one)."""
    if precision.quantized:
        raise ExportError(
            f"{precision} engines are quantised from the fp32 engine: export in fp32 or fp16 "
            f"here, then quantise (`surgery-edge export --precision {precision}` does both)."
        )
    return torch.float16 if precision is Precision.FP16 else torch.float32


def engine_module(
    model: MultiTaskModel,
    mode: EngineMode,
    precision: Precision = Precision.FP32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A copy of ``model`` on ``device`` in the export ``precision``, wrapped for ``mode``;
    its weights checked first (:func:`check_magnitudes`)."""
    dtype = weight_dtype(precision)
    check_magnitudes(model, dtype == torch.float16)
    copied = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    copied.fused = False  # exporters trace the reference path (plain ONNX-representable ops)
    wrapper = RoutedEngine if mode is EngineMode.ROUTED else AllTasksEngine
    return wrapper(copied, dtype).eval()


def example_inputs(
    model: MultiTaskModel,
    mode: EngineMode,
    batch: int = 2,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: ``batch`` random images (and task ids cycling through the tasks)."""
    s = model.encoder.arch.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, s, s, generator=gen).to(device)
    if mode is EngineMode.ALL_TASKS:
        return (images,)
    return images, (torch.arange(batch) % model.num_tasks).to(device)

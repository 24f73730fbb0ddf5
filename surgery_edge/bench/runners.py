"""The paths a workload runs through: eager, fused (Triton), ``torch.compile``, CUDA graphs and
ONNX Runtime (through the runtime's :class:`~surgery_edge.runtime.backends.OnnxBackend`)."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from surgery_edge import kernels
from surgery_edge.bench.timing import cuda_graph
from surgery_edge.bench.workloads import Inputs, compiled_expert_runner, run_expert
from surgery_edge.export.onnx import export_onnx
from surgery_edge.models import ArchSpec
from surgery_edge.runtime.backends import OnnxBackend
from surgery_edge.surgery.fused import fuse_
from surgery_edge.surgery.model import MultiTaskModel


def unavailable_reason(path: str, device: torch.device) -> str | None:
    """Why ``path`` cannot run on ``device`` at all (None: it can)."""
    if path in ("fused", "fused+cuda-graph"):
        if device.type != "cuda":
            return "the Triton path is timed on CUDA only (the CPU interpreter is for tests)"
        if not kernels.can_launch(device):
            return "Triton is not installed"
        if kernels.triton_interpreter_enabled():
            return "TRITON_INTERPRET is set: unset it to time compiled kernels"
    if path in ("cuda-graph", "fused+cuda-graph") and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if path == "onnxruntime":
        for module in ("onnx", "onnxruntime"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        if device.type == "cuda":
            import onnxruntime as ort  # deferred: heavy, and only the ONNX path needs it

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


class OnnxRunner:
    """One (configuration, mode) exported by ``export_onnx`` and opened by ``OnnxBackend``.

    Only the logits are compared and, on the GPU, computed (a routed engine also outputs
    probabilities), as PyTorch computes them.
    """

    def __init__(self, model: MultiTaskModel, mode: str, path: Path, device: torch.device):
        half = next(model.parameters()).dtype == torch.float16
        export_onnx(model, path, mode, half, check=False)  # the benchmark checks the outputs
        self.device = device
        # as many threads as PyTorch, so CPU rows compare like for like with eager
        self.backend = OnnxBackend(path, device=str(device), threads=torch.get_num_threads())
        self.logits = [n for n in self.backend.meta.outputs if n.startswith("logits")]

    def prepare(self, images: torch.Tensor, task_ids: torch.Tensor) -> Callable[[], Any]:
        """A callable that runs the engine once on this batch (device-resident on CUDA)."""
        images_np = images.detach().float().cpu().numpy()
        ids_np = task_ids.detach().cpu().numpy()
        return self.backend.bind(images_np, ids_np, self.logits)


class Workload:
    """One (configuration, mode) of one built model: its eager call, and the compiled function
    and ONNX Runtime engine built on first use and shared by the batch sizes."""

    def __init__(
        self,
        arch: ArchSpec,
        model: nn.Module,
        config: str,
        mode: str,
        rank: int,
        device: torch.device,
        folder: Path,
    ):
        self.arch, self.model, self.config, self.mode, self.rank = arch, model, config, mode, rank
        self.device, self.folder = device, folder
        self._compiled: Callable[[Inputs], Any] | None = None
        self.onnx: OnnxRunner | None = None
        self.sticky_error: dict[str, str] = {}  # path -> why every further batch is skipped

    def call(self, run: Callable = run_expert) -> Callable[[Inputs], Any]:
        """The workload as a function of the inputs; ``run`` runs one of the experts."""
        model = self.model
        if self.config == "experts" and self.mode == "all-tasks":
            return lambda x: model.forward_all_tasks(x.images, run=run)
        if self.config == "experts":
            return lambda x: model.forward_routed(x.images, x.groups, run=run)
        if self.mode == "all-tasks":
            return lambda x: model.forward_all_tasks(x.images)
        return lambda x: model(x.images, x.task_ids)

    def compiled(self) -> Callable[[Inputs], Any]:
        """``torch.compile`` (mode default) of the whole call; for the experts, of one expert's
        encoder, which all eight share."""
        if self._compiled is None:
            if self.config == "experts":
                self._compiled = self.call(compiled_expert_runner())
            else:
                self._compiled = torch.compile(self.call())
        return self._compiled

    def onnx_runner(self) -> OnnxRunner:
        if self.onnx is None:
            path = self.folder / f"{self.config}-{self.mode}.onnx"
            self.onnx = OnnxRunner(self.model, self.mode, path, self.device)
        return self.onnx

    def prepare(self, path: str, x: Inputs) -> Callable[[], Any]:
        """A no-argument callable that runs ``path`` once on ``x`` (the fused paths switch the
        model's ``fused`` flag on; the caller switches it off again)."""
        if path in ("fused", "fused+cuda-graph"):
            fuse_(self.model)
        eager = self.call()
        if path in ("eager", "fused"):
            return lambda: eager(x)
        if path == "compile":
            compiled = self.compiled()
            return lambda: compiled(x)
        if path in ("cuda-graph", "fused+cuda-graph"):
            return cuda_graph(lambda images: eager(dataclasses.replace(x, images=images)), x.images)
        if path == "onnxruntime":
            return self.onnx_runner().prepare(x.images, x.task_ids)
        raise ValueError(f"unknown path {path!r}")


def _flatten(out: Any) -> torch.Tensor:
    if hasattr(out, "copy_outputs_to_cpu"):  # an ONNX Runtime I/O binding
        out = out.copy_outputs_to_cpu()
    if isinstance(out, (list, tuple)):
        return torch.cat([_flatten(o) for o in out])
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    return out.detach().float().flatten().cpu()


def max_abs_err(got: Any, want: Any) -> float | None:
    """Largest |got - want| over the finite reference entries; None if the layouts differ."""
    g, w = _flatten(got), _flatten(want)
    if g.shape != w.shape:
        return None
    finite = torch.isfinite(w)
    return float((g[finite] - w[finite]).abs().max()) if finite.any() else 0.0

"""The multi-task engine against eight separate experts: latency, throughput, memory, TFLOP/s.

Every configuration answers every task it is asked about, for every image:

* ``experts``: eight separate experts, each its own ImageEncoder + head in memory, run one after
  another on the batch (all-tasks), or each on the images routed to its task (routed);
* ``merged``: the merged backbone alone, no adapters (the lower bound; backbone once, eight heads);
* ``surgery``: the V1 engine (final-site adapters), all-tasks: backbone once, fan out at the
  final adapter and the heads;
* ``surgeryv2``: the V2 engine (every block + final), routed (each image one task) and all-tasks
  (the batch expanded to T x B rows through one weight set).

Each through the paths that apply on the device:

* ``eager``: the PyTorch reference path;
* ``fused``: the Triton path (``MultiTaskModel.fused``; engines only, CUDA only: never timed
  under the Triton CPU interpreter);
* ``compile``: ``torch.compile`` (mode default; one compiled function per workload, shared by
  the batch sizes, so PyTorch's automatic dynamic shapes apply; for the experts one compiled
  encoder forward that all eight share); a failure is recorded, not fatal;
* ``cuda-graph`` / ``fused+cuda-graph``: the eager / fused path captured once per batch size in a
  ``torch.cuda.CUDAGraph`` and replayed (CUDA only);
* ``onnxruntime``: ``surgery_edge.export.onnx.export_onnx(model, path, mode=...)`` then an
  ONNX Runtime session (engines and the merged model; marked unavailable when the exporter or a
  CUDA execution provider on a GPU is missing).

Figures per (config, mode, path, batch): median and p90 latency (CUDA events after warm-up on
the GPU, ``time.perf_counter`` on the CPU), throughput in task-answers per second (B x T per
call for all-tasks, B for routed), peak GPU memory (``torch.cuda.max_memory_allocated`` after a
reset; it includes the resident weights), the weight bytes the configuration holds (eight
experts = 8 x (encoder + head); engine = one encoder + adapters + stacked heads), achieved
TFLOP/s and its fraction of the device's dense peak (``--peak-tflops``; null on the CPU), and the
largest absolute difference from the eager output.

FLOPs are counted analytically (2 per multiply-add), per image, from the ArchSpec
(P = (S/p)^2 patches, N = P + 1 tokens, width d, MLP width m, L blocks, embed e, rank r):

    backbone = 2*P*(3*p^2)*d                            patch embedding
             + L * (2*N*(4*d^2 + 2*d*m)                 qkv + out projection, MLP
                    + 2*2*N^2*d)                        attention scores and weighted sum
             + 2*d*e                                    final projection
    adapter  = 2*2*r*d per token (W_down, W_up): N tokens at a block site, 1 row at ``final``
    head_t   = 2*e*C_t

LayerNorm, softmax, GELU, biases and the residual adds are not counted. This gives 8.83 GFLOP per
image for ViT-B/32 and 162.0 for ViT-L/14 (open_clip's profile: 8.82 and 162.03). A call costs:
experts all-tasks B * sum_t(backbone + head_t); merged all-tasks B * (backbone + sum_t head_t);
V1 all-tasks B * (backbone + sum_t(adapter_final + head_t)); V2 all-tasks
B * sum_t(backbone + adapters + head_t); routed: per image its own task's share.

The weights are random (timing only): ``ViT-B-32`` and ``ViT-L-14`` are built from open_clip's
configs at 224 px, ``tiny-vit-32`` is the built-in suite's model. fp16 on the GPU, fp32 on the CPU.

Usage::

    python benchmarks/bench_engine.py --device cpu --archs tiny-vit-32 --batches 1 8 32 \\
        --out benchmarks/results/cpu
    python benchmarks/bench_engine.py --archs ViT-B-32 --out benchmarks/results/h100   # CUDA

Outputs, per architecture, under ``--out``: ``engine-<arch>.json`` (device, versions, the exact
command, every result, derived ratios), ``engine-<arch>.md`` (the table, also printed),
``engine-<arch>-latency.png`` (latency vs batch per configuration) and
``engine-<arch>-weights.png`` (weight memory).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from surgery_edge.models import ArchSpec, ClassificationHead, ImageEncoder, build_encoder, get_arch
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.model import MultiTaskModel

H100_SXM_FP16_TFLOPS = 989.0  # dense fp16/bf16 tensor-core peak
RANDOM_WEIGHTS_NOTE = "random weights: timing only"
CONFIGS = ("experts", "merged", "surgery", "surgeryv2")
CONFIG_LABELS = {
    "experts": "8 separate experts",
    "merged": "merged backbone (no adapters)",
    "surgery": "V1 engine (Surgery, final site)",
    "surgeryv2": "V2 engine (SurgeryV2, every block)",
}
MODES = ("all-tasks", "routed")
# the modes each configuration is benchmarked in (V1 is an all-tasks engine in the issue)
CONFIG_MODES = {
    "experts": ("all-tasks", "routed"),
    "merged": ("all-tasks", "routed"),
    "surgery": ("all-tasks",),
    "surgeryv2": ("routed", "all-tasks"),
}
PATHS = ("eager", "fused", "compile", "cuda-graph", "onnxruntime")
# Class counts: the paper's eight tasks (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST,
# DTD) for the open_clip architectures, the built-in suite's for the tiny ones.
PAPER_CLASSES = (397, 196, 45, 10, 10, 43, 10, 47)
SUITE_CLASSES = (10, 10, 6, 6, 8, 4, 8, 8)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# --- configuration and results ---------------------------------------------------------------


@dataclass(frozen=True)
class EngineBenchConfig:
    """What to run and how to time it.

    ``rank_v2=None`` means the paper's choice: rank 4 for ViT-L, otherwise ``rank``.
    ``peak_tflops`` is ignored (null fractions) on the CPU.
    """

    archs: tuple[str, ...] = ("tiny-vit-32",)
    batches: tuple[int, ...] = (1, 8, 32)
    configs: tuple[str, ...] = CONFIGS
    modes: tuple[str, ...] = MODES  # each configuration runs those of CONFIG_MODES listed here
    paths: tuple[str, ...] = ("eager", "compile")
    device: str = "cpu"
    dtype: str | None = None  # None: fp16 on CUDA, fp32 on the CPU
    num_tasks: int = 8
    rank: int = 16
    rank_v2: int | None = None
    warmup: int = 3
    iters: int = 20
    min_iters: int = 3
    max_seconds: float = 2.0  # per measurement: fewer than ``iters`` calls when they are slow
    peak_tflops: float | None = H100_SXM_FP16_TFLOPS
    overhead_batch: int = 64  # the batch of the "V2 fused routed vs merged backbone" target
    seed: int = 0

    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "fp16" if torch.device(self.device).type == "cuda" else "fp32"

    def resolved_rank(self, arch: str, config: str) -> int:
        if config != "surgeryv2":
            return self.rank
        if self.rank_v2 is not None:
            return self.rank_v2
        return 4 if "ViT-L" in arch else self.rank


@dataclass(frozen=True)
class EngineResult:
    """One (architecture, configuration, mode, path, batch) measurement.

    ``status`` is ``ok`` (measured), ``failed`` (the path raised; ``reason`` says why) or
    ``unavailable`` (the path cannot run here). Latencies are per call of the whole batch.
    """

    arch: str
    config: str
    mode: str
    path: str
    batch: int
    status: str
    reason: str | None
    dtype: str
    rank: int | None
    timer: str | None  # "cuda-events" | "perf_counter"
    iters: int
    median_ms: float | None
    p90_ms: float | None
    answers_per_call: int  # B x T (all-tasks) or B (routed)
    answers_per_s: float | None
    flops_per_call: int
    tflops: float | None
    peak_fraction: float | None
    peak_mem_bytes: int | None  # CUDA only; includes the resident weights
    weight_bytes: int
    setup_s: float | None  # compile / capture / export time, first call included
    max_abs_err_vs_eager: float | None


# --- FLOPs -----------------------------------------------------------------------------------


def backbone_flops(arch: ArchSpec) -> int:
    """FLOPs of one image through the image tower (see the module docstring for the formula)."""
    patches = (arch.image_size // arch.patch_size) ** 2
    n, d, e = patches + 1, arch.width, arch.embed_dim
    m = int(d * arch.mlp_ratio)
    patch_embed = 2 * patches * (3 * arch.patch_size**2) * d
    block = 2 * n * (4 * d * d + 2 * d * m) + 2 * 2 * n * n * d
    return patch_embed + arch.layers * block + 2 * d * e


def adapter_flops(arch: ArchSpec, method: str, rank: int) -> int:
    """FLOPs of one image through one task's adapters: 2*2*r*d per corrected row."""
    if method == "surgery":
        return 4 * rank * arch.embed_dim
    return arch.layers * 4 * rank * arch.width * arch.num_tokens + 4 * rank * arch.embed_dim


def workload_flops(
    arch: ArchSpec,
    config: str,
    mode: str,
    task_ids: Sequence[int],  # one per image (routed); all-tasks uses only its length
    classes: Sequence[int],  # per task
    rank: int,
) -> int:
    """Analytical FLOPs of one call of ``config`` in ``mode`` on ``len(task_ids)`` images."""
    batch, e = len(task_ids), arch.embed_dim
    bb = backbone_flops(arch)
    heads = [2 * e * c for c in classes]
    adapters = 0 if config in ("experts", "merged") else adapter_flops(arch, config, rank)
    if mode == "routed":
        return sum(bb + adapters + heads[t] for t in task_ids)
    if config == "experts":
        return batch * sum(bb + h for h in heads)
    if config == "merged":
        return batch * (bb + sum(heads))
    if config == "surgery":
        return batch * (bb + sum(adapters + h for h in heads))
    return batch * sum(bb + adapters + h for h in heads)  # surgeryv2: T x B rows


# --- the configurations as modules -----------------------------------------------------------


def run_expert(
    encoder: ImageEncoder, head: ClassificationHead, images: torch.Tensor
) -> torch.Tensor:  # (B, 3, H, W) -> (B, C)
    """One expert on a batch."""
    return head(encoder(images))


def compiled_expert_runner() -> Callable:
    """``run_expert`` with the encoder under ``torch.compile``: one compiled graph serves all
    eight experts (their parameters are graph inputs); the heads, whose class counts differ,
    stay eager."""
    encode = torch.compile(lambda encoder, images: encoder(images))
    return lambda encoder, head, images: head(encode(encoder, images))


class SeparateExperts(nn.Module):
    """Eight experts side by side: ``T`` encoders and ``T`` heads, nothing shared."""

    def __init__(self, encoders: Sequence[ImageEncoder], heads: Sequence[ClassificationHead]):
        super().__init__()
        self.encoders, self.heads = nn.ModuleList(encoders), nn.ModuleList(heads)

    def forward_all_tasks(
        self, images: torch.Tensor, run: Callable = run_expert
    ) -> list[torch.Tensor]:
        """Every expert on the whole batch, one after another: T tensors (B, C_t)."""
        return [run(enc, head, images) for enc, head in zip(self.encoders, self.heads)]

    def forward_routed(
        self,
        images: torch.Tensor,  # (B, 3, H, W)
        groups: Sequence[tuple[int, torch.Tensor]],  # (task, indices of its images), non-empty
        run: Callable = run_expert,
    ) -> list[torch.Tensor]:
        """Each expert on the images of its own task (the grouping is done once, outside)."""
        return [
            run(self.encoders[t], self.heads[t], images.index_select(0, idx)) for t, idx in groups
        ]


def module_bytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer ``module`` holds."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def task_classes(arch: ArchSpec, num_tasks: int) -> list[int]:
    counts = SUITE_CLASSES if arch.name.startswith(("tiny-", "micro-")) else PAPER_CLASSES
    return [counts[t % len(counts)] for t in range(num_tasks)]


@dataclass
class _Parts:
    """Random weights shared by the configurations of one architecture (on the CPU, fp32)."""

    arch: ArchSpec
    encoder: ImageEncoder
    heads: list[ClassificationHead]
    tasks: list[str]


def _make_parts(arch: ArchSpec, num_tasks: int, seed: int) -> _Parts:
    torch.manual_seed(seed)
    encoder = build_encoder(arch).eval()
    heads = [
        ClassificationHead(torch.randn(c, arch.embed_dim) * arch.embed_dim**-0.5)
        for c in task_classes(arch, num_tasks)
    ]
    return _Parts(arch, encoder, heads, [f"task{t}" for t in range(num_tasks)])


def _build(parts: _Parts, config: str, rank: int, device: torch.device, dtype: torch.dtype):
    """The module a configuration holds, on ``device`` in ``dtype``."""
    if config == "experts":
        base = copy.deepcopy(parts.encoder).to(device=device, dtype=dtype)
        encoders = [base, *(copy.deepcopy(base) for _ in parts.tasks[1:])]
        heads = [copy.deepcopy(h) for h in parts.heads]
        return SeparateExperts(encoders, heads).to(device=device, dtype=dtype).eval()
    bank = None
    if config != "merged":
        torch.manual_seed(1)
        bank = AdapterBank(parts.tasks, parts.arch, config, rank)
        with torch.no_grad():  # trained adapters are not zero: give W_up values too
            for site in bank.sites:
                bank.weights(site)[1].normal_(0.0, 0.02)
    model = MultiTaskModel(copy.deepcopy(parts.encoder), parts.heads, parts.tasks, bank)
    return model.to(device=device, dtype=dtype).eval()


def one_expert_bytes(arch: ArchSpec, dtype: torch.dtype, num_classes: int) -> int:
    """Weight bytes of one expert (an encoder and a ``num_classes`` head) in ``dtype``."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        encoder = build_encoder(arch)
    numel = sum(t.numel() for t in [*encoder.parameters(), *encoder.buffers()])
    numel += num_classes * (arch.embed_dim + 1)  # weight and bias
    return numel * torch.empty((), dtype=dtype).element_size()


# --- timing ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(
    fn: Callable[[], object], device: torch.device, cfg: EngineBenchConfig, wall_clock: bool
) -> tuple[list[float], str]:
    """Per-call milliseconds of ``fn`` after warm-up: CUDA events on the GPU, perf_counter on the
    CPU. One timed call first estimates the cost, so that slow calls get fewer than
    ``cfg.warmup`` warm-up and ``cfg.iters`` timed calls (at least 1 and ``cfg.min_iters``):
    each phase stays within about ``cfg.max_seconds``. ``wall_clock`` times a call that
    returns only when its GPU work is done (ONNX Runtime's) with perf_counter on CUDA too."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    affordable = int(cfg.max_seconds / max(time.perf_counter() - start, 1e-9))
    for _ in range(max(1, min(cfg.warmup, affordable))):
        fn()
    _sync(device)
    n = max(min(cfg.min_iters, cfg.iters), min(cfg.iters, affordable))
    if device.type == "cuda" and not wall_clock:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(n)
        ]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [begin.elapsed_time(end) for begin, end in events], "cuda-events"
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples, "perf_counter"


def _flatten(out: Any) -> torch.Tensor:
    if hasattr(out, "copy_outputs_to_cpu"):  # an ONNX Runtime I/O binding
        out = out.copy_outputs_to_cpu()
    if isinstance(out, (list, tuple)):
        return torch.cat([_flatten(o) for o in out])
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    return out.detach().float().flatten().cpu()


def _max_err(got: Any, want: Any) -> float | None:
    """Largest |got - want| over the finite reference entries; None if the layouts differ."""
    g, w = _flatten(got), _flatten(want)
    if g.shape != w.shape:
        return None
    finite = torch.isfinite(w)
    return float((g[finite] - w[finite]).abs().max()) if finite.any() else 0.0


def _cuda_graph(fn: Callable[[torch.Tensor], Any], images: torch.Tensor) -> Callable[[], Any]:
    """Capture ``fn(static_images)`` once; the returned callable replays it."""
    static = images.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # allocator and cuBLAS warm-up outside the capture
            fn(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)

    def replay() -> Any:
        graph.replay()
        return out

    replay.graph = graph  # keep the graph (and its memory pool) alive with the callable
    return replay


# --- ONNX Runtime ----------------------------------------------------------------------------


def _onnx_exporter() -> tuple[Callable | None, str | None]:
    """``surgery_edge.export.onnx.export_onnx`` if it exists, else the reason it does not."""
    try:
        module = importlib.import_module("surgery_edge.export.onnx")
    except ImportError as e:
        return None, f"surgery_edge.export.onnx is not importable ({e})"
    fn = getattr(module, "export_onnx", None)
    if fn is None:
        return None, "surgery_edge.export.onnx has no export_onnx"
    if importlib.util.find_spec("onnxruntime") is None:
        return None, "onnxruntime is not installed"
    return fn, None


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class _OrtRunner:
    """An ONNX Runtime session over one exported (configuration, mode)."""

    def __init__(self, path: Path, device: torch.device):
        import onnxruntime as ort

        self.device = device
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install [gpu])")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = self.session.get_inputs()
        # the logits only (a routed engine also outputs probabilities), as PyTorch computes
        names = [o.name for o in self.session.get_outputs()]
        self.outputs = [n for n in names if n.startswith("logits")] or names

    def prepare(self, images: torch.Tensor, task_ids: torch.Tensor) -> Callable[[], Any]:
        """A callable that runs the session once on this batch. On CUDA the inputs are copied to
        the GPU once and bound there, with the outputs (I/O binding), so that a call times the
        engine and not host-device copies; it returns the binding."""
        import onnxruntime as ort

        feeds = {}
        for i, (spec, value) in enumerate(zip(self.inputs, (images, task_ids))):
            dim = spec.shape[0] if spec.shape else None
            if isinstance(dim, int) and dim != value.shape[0]:
                raise RuntimeError(f"the exported graph has a fixed batch of {dim}")
            dtype = _ORT_TYPES.get(spec.type, np.float32 if i == 0 else np.int64)
            feeds[spec.name] = value.detach().cpu().numpy().astype(dtype)
        if self.device.type != "cuda":
            return lambda: self.session.run(self.outputs, feeds)
        index = self.device.index or 0
        binding = self.session.io_binding()
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", index)
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, "cuda", index)

        def run() -> Any:
            self.session.run_with_iobinding(binding)
            return binding

        return run


# --- the benchmark ---------------------------------------------------------------------------


def _applicable(path: str, config: str) -> bool:
    if path in ("fused", "fused+cuda-graph"):
        return config in ("surgery", "surgeryv2")
    if path == "onnxruntime":
        return config != "experts"  # the exporter takes one MultiTaskModel
    return True


def _plan_paths(cfg: EngineBenchConfig) -> list[str]:
    """The requested paths in timing order; ``cuda-graph`` with ``fused`` adds its fused twin."""
    paths = [p for p in PATHS if p in cfg.paths]
    if "cuda-graph" in paths and "fused" in paths:
        paths.insert(paths.index("cuda-graph") + 1, "fused+cuda-graph")
    return paths


def _unavailable_reason(path: str, device: torch.device) -> str | None:
    """Why ``path`` cannot run on ``device`` at all (None: it can)."""
    from surgery_edge import kernels

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
        reason = _onnx_exporter()[1]
        if reason is None and device.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                reason = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        return reason
    return None


def _short(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def run_engine_bench(
    config: EngineBenchConfig,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> list[EngineResult]:
    """Run every (architecture, configuration, mode, path, batch) of ``config``.

    Args:
        config: what to run and how to time it.
        log: called with one line per measurement (and per failure).
        verbose: also log the traceback of a path that fails.

    Returns:
        One :class:`EngineResult` per planned combination, including the paths that were
        unavailable here or failed (with the reason), in a stable order.
    """
    log = log or (lambda msg: None)
    device = torch.device(config.device)
    dtype = DTYPES[config.resolved_dtype()]
    paths = _plan_paths(config)
    unavailable = {p: _unavailable_reason(p, device) for p in paths}
    results: list[EngineResult] = []
    # past its recompile limit dynamo would silently run eager code: make that a recorded failure
    dynamo = torch._dynamo.config
    strict = hasattr(dynamo, "fail_on_recompile_limit_hit")
    with dynamo.patch(fail_on_recompile_limit_hit=True) if strict else contextlib.nullcontext():
        for arch_name in config.archs:
            results += _bench_arch(
                config, arch_name, paths, unavailable, device, dtype, log, verbose
            )
    return results


def _bench_arch(
    config: EngineBenchConfig,
    arch_name: str,
    paths: list[str],
    unavailable: dict[str, str | None],
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None],
    verbose: bool,
) -> list[EngineResult]:
    """Every configuration of one architecture, each built, timed and freed in turn."""
    results: list[EngineResult] = []
    arch = get_arch(arch_name)
    parts = _make_parts(arch, config.num_tasks, config.seed)
    for name in config.configs:
        rank = config.resolved_rank(arch_name, name)
        model = _build(parts, name, rank, device, dtype)
        log(f"{arch_name} {name}: {module_bytes(model) / 2**20:.1f} MiB of weights")
        for mode in (m for m in CONFIG_MODES[name] if m in config.modes):
            with tempfile.TemporaryDirectory() as tmp:
                work = _Workload(arch, model, name, mode, rank, device, Path(tmp))
                for path in (p for p in paths if _applicable(p, name)):
                    for batch in config.batches:
                        results.append(
                            _bench_one(config, work, path, batch, unavailable[path], log, verbose)
                        )
        del model
        gc.collect()
        torch.compiler.reset()  # frees the compiled graphs that hold the model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


@dataclass(frozen=True)
class _Inputs:
    """One batch: images and, for routed mode, each image's task (cycling through the tasks)."""

    images: torch.Tensor  # (B, 3, S, S)
    task_ids: torch.Tensor  # (B,) int64
    groups: list[tuple[int, torch.Tensor]]  # the experts' routing: (task, its image indices)

    @classmethod
    def make(
        cls, arch: ArchSpec, batch: int, num_tasks: int, device: torch.device, dtype: torch.dtype
    ) -> _Inputs:
        gen = torch.Generator().manual_seed(batch)
        images = torch.randn(batch, 3, arch.image_size, arch.image_size, generator=gen)
        ids = torch.arange(batch) % num_tasks
        groups = [(t, (ids == t).nonzero().flatten().to(device)) for t in range(num_tasks)]
        return cls(
            images.to(device=device, dtype=dtype),
            ids.to(device),
            [(t, idx) for t, idx in groups if idx.numel()],
        )


class _Workload:
    """One (configuration, mode) of one built model: its eager call, and the compiled function
    and ONNX Runtime session built on first use and shared by the batch sizes."""

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
        self._compiled: Callable[[_Inputs], Any] | None = None
        self._ort: _OrtRunner | None = None
        self.sticky_error: dict[str, str] = {}  # path -> why every further batch is skipped

    def call(self, run: Callable = run_expert) -> Callable[[_Inputs], Any]:
        """The workload as a function of the inputs; ``run`` runs one of the experts."""
        model = self.model
        if self.config == "experts" and self.mode == "all-tasks":
            return lambda x: model.forward_all_tasks(x.images, run=run)
        if self.config == "experts":
            return lambda x: model.forward_routed(x.images, x.groups, run=run)
        if self.mode == "all-tasks":
            return lambda x: model.forward_all_tasks(x.images)
        return lambda x: model(x.images, x.task_ids)

    def compiled(self) -> Callable[[_Inputs], Any]:
        """``torch.compile`` (mode default) of the whole call; for the experts, of one expert's
        encoder, which all eight share."""
        if self._compiled is None:
            if self.config == "experts":
                self._compiled = self.call(compiled_expert_runner())
            else:
                self._compiled = torch.compile(self.call())
        return self._compiled

    def ort(self) -> _OrtRunner:
        if self._ort is None:
            export_onnx, _ = _onnx_exporter()
            path = self.folder / f"{self.config}-{self.mode}.onnx"
            half = next(self.model.parameters()).dtype == torch.float16
            options = {"fp16": half, "check": False}  # the benchmark checks the outputs itself
            accepted = inspect.signature(export_onnx).parameters
            export_onnx(
                self.model,
                path,
                mode=self.mode,
                **{k: v for k, v in options.items() if k in accepted},
            )
            self._ort = _OrtRunner(path, self.device)
        return self._ort

    def prepare(self, path: str, x: _Inputs) -> Callable[[], Any]:
        """A no-argument callable that runs ``path`` once on ``x`` (the fused paths switch the
        model's ``fused`` flag on; :func:`_bench_one` switches it off again)."""
        if path in ("fused", "fused+cuda-graph"):
            from surgery_edge.surgery.fused import fuse_

            fuse_(self.model)
        eager = self.call()
        if path in ("eager", "fused"):
            return lambda: eager(x)
        if path == "compile":
            compiled = self.compiled()
            return lambda: compiled(x)
        if path in ("cuda-graph", "fused+cuda-graph"):
            return _cuda_graph(
                lambda images: eager(dataclasses.replace(x, images=images)), x.images
            )
        if path == "onnxruntime":
            return self.ort().prepare(x.images, x.task_ids)
        raise ValueError(f"unknown path {path!r}")


def _bench_one(
    cfg: EngineBenchConfig,
    work: _Workload,
    path: str,
    batch: int,
    unavailable: str | None,
    log: Callable[[str], None],
    verbose: bool,
) -> EngineResult:
    """Time one path of one workload at one batch size (or record why it could not run)."""
    device, model, arch = work.device, work.model, work.arch
    x = _Inputs.make(arch, batch, cfg.num_tasks, device, DTYPES[cfg.resolved_dtype()])
    answers = batch * cfg.num_tasks if work.mode == "all-tasks" else batch
    flops = workload_flops(
        arch,
        work.config,
        work.mode,
        x.task_ids.tolist(),
        task_classes(arch, cfg.num_tasks),
        work.rank,
    )
    result = partial(
        EngineResult,
        arch=arch.name,
        config=work.config,
        mode=work.mode,
        path=path,
        batch=batch,
        dtype=cfg.resolved_dtype(),
        rank=None if work.config in ("experts", "merged") else work.rank,
        answers_per_call=answers,
        flops_per_call=flops,
        weight_bytes=module_bytes(model),
    )
    not_run = partial(
        result,
        timer=None,
        iters=0,
        median_ms=None,
        p90_ms=None,
        answers_per_s=None,
        tflops=None,
        peak_fraction=None,
        peak_mem_bytes=None,
        setup_s=None,
        max_abs_err_vs_eager=None,
    )
    if unavailable is not None:
        return not_run(status="unavailable", reason=unavailable)
    if path in work.sticky_error:
        return not_run(status="failed", reason=work.sticky_error[path])
    try:
        with torch.inference_mode():
            reference = work.call()(x)
            start = time.perf_counter()
            fn = work.prepare(path, x)
            output = fn()
            _sync(device)
            setup = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            samples, timer = _measure(fn, device, cfg, wall_clock=path == "onnxruntime")
            peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    except Exception as e:  # a path that fails is recorded; the others still run
        reason = _short(e)
        if path == "compile":
            reason = work.sticky_error[path] = f"torch.compile failed: {reason}"
        if path == "onnxruntime" and work._ort is None:
            reason = work.sticky_error[path] = f"ONNX export or session failed: {reason}"
        log(f"  {work.config} {work.mode} {path} B={batch}: failed: {reason}")
        if verbose:
            log(traceback.format_exc())
        return not_run(status="failed", reason=reason)
    finally:
        if getattr(model, "fused", False):
            model.fused = False  # back to the reference path
    median = float(np.median(samples))
    tflops = flops / (median * 1e-3) / 1e12
    peak = cfg.peak_tflops if device.type == "cuda" else None
    log(
        f"  {work.config:9s} {work.mode:9s} {path:16s} B={batch:<4d} {median:9.3f} ms "
        f"{answers / (median * 1e-3):12.1f} answers/s"
    )
    return result(
        status="ok",
        reason=None,
        timer=timer,
        iters=len(samples),
        median_ms=median,
        p90_ms=float(np.percentile(samples, 90)),
        answers_per_s=answers / (median * 1e-3),
        tflops=tflops,
        peak_fraction=None if peak is None else tflops / peak,
        peak_mem_bytes=peak_mem,
        setup_s=None if path == "eager" else setup,
        max_abs_err_vs_eager=None if path == "eager" else _max_err(output, reference),
    )


# --- derived ratios --------------------------------------------------------------------------


def _counterpart(path: str) -> str:
    """The path of a configuration without adapters that matches an engine path."""
    return {"fused": "eager", "fused+cuda-graph": "cuda-graph"}.get(path, path)


def _index(results: Sequence[EngineResult]) -> dict[tuple[str, str, str, int], EngineResult]:
    return {(r.config, r.mode, r.path, r.batch): r for r in results if r.status == "ok"}


def _best(results: Sequence[EngineResult], config: str, mode: str, batch: int):
    ok = [
        r
        for r in results
        if r.status == "ok" and (r.config, r.mode, r.batch) == (config, mode, batch)
    ]
    return min(ok, key=lambda r: r.median_ms) if ok else None


def _pairs(
    results: Sequence[EngineResult],
    engine: tuple[str, str],
    baseline: tuple[str, str],
    batches: Sequence[int],
    value: Callable[[EngineResult, EngineResult], float],
) -> list[dict[str, Any]]:
    """``value(engine, baseline)`` per batch for each engine path against the baseline's
    counterpart path, then for the fastest path of each side (``path: best``)."""
    index, rows = _index(results), []
    for batch in batches:
        for r in results:
            if r.status != "ok" or (r.config, r.mode, r.batch) != (*engine, batch):
                continue
            b = index.get((*baseline, _counterpart(r.path), batch))
            if b is not None:
                rows.append(dict(batch=batch, path=r.path, baseline_path=b.path, value=value(r, b)))
        e, b = _best(results, *engine, batch), _best(results, *baseline, batch)
        paired = any(
            x["batch"] == batch
            and x["path"] == getattr(e, "path", None)
            and x["baseline_path"] == getattr(b, "path", None)
            for x in rows
        )
        if e is not None and b is not None and not paired:
            rows.append(
                dict(batch=batch, path=f"best ({e.path})", baseline_path=b.path, value=value(e, b))
            )
    return rows


def derive_ratios(
    results: Sequence[EngineResult], one_expert: int, overhead_batch: int = 64
) -> dict[str, Any]:
    """The figures the issue's targets are phrased in, for one architecture's results."""
    batches = sorted({r.batch for r in results})
    weights = {"one_expert": one_expert}
    for r in results:
        weights.setdefault(r.config, r.weight_bytes)
    measured = sorted({r.batch for r in results if r.status == "ok"})
    if overhead_batch in measured:
        at, note = overhead_batch, None
    else:
        at = max((b for b in measured if b <= overhead_batch), default=None)
        note = f"batch {overhead_batch} not measured; using batch {at}"
    overhead = _pairs(
        results,
        ("surgeryv2", "routed"),
        ("merged", "routed"),
        [at] if at else [],
        lambda e, b: e.median_ms / b.median_ms - 1.0,
    )
    return {
        "weight_bytes": weights,
        "weight_ratio_vs_one_expert": {k: v / one_expert for k, v in weights.items()},
        "v1_all_tasks_throughput_over_experts": _pairs(
            results,
            ("surgery", "all-tasks"),
            ("experts", "all-tasks"),
            batches,
            lambda e, b: e.answers_per_s / b.answers_per_s,
        ),
        "v2_all_tasks_throughput_over_experts": _pairs(
            results,
            ("surgeryv2", "all-tasks"),
            ("experts", "all-tasks"),
            batches,
            lambda e, b: e.answers_per_s / b.answers_per_s,
        ),
        "v2_batch1_latency_over_experts": {
            mode: _pairs(
                results,
                ("surgeryv2", mode),
                ("experts", mode),
                [1],
                lambda e, b: e.median_ms / b.median_ms,
            )
            for mode in ("all-tasks", "routed")
        },
        "v2_routed_overhead_over_merged": {"batch": at, "note": note, "ratios": overhead},
    }


# --- reporting -------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Device name and library versions, stored with the results."""

    def version(module: str) -> str | None:
        if importlib.util.find_spec(module) is None:
            return None
        return getattr(importlib.import_module(module), "__version__", "unknown")

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        name = f"CPU ({cpu}, {torch.get_num_threads()} torch threads)"
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "triton": version("triton"),
        "onnxruntime": version("onnxruntime"),
        "open_clip": version("open_clip"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        # a shared CPU's timings depend on what else runs: the 1/5/15-minute load averages
        "cpu_load_avg": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_report(
    results: Sequence[EngineResult], derived: dict[str, Any], label: str, arch: str
) -> str:
    """The table of measured rows, the unmeasured paths with reasons, and the derived ratios."""
    ok = [r for r in results if r.status == "ok"]
    gpu = any(r.peak_mem_bytes is not None for r in ok)
    header = [
        "config",
        "mode",
        "path",
        "B",
        "median ms",
        "p90 ms",
        "task-answers/s",
        "GFLOP/call",
        "TFLOP/s",
    ]
    if gpu:
        header += ["% peak", "peak MiB"]
    header += ["weights MiB", "max err vs eager"]
    lines = [
        f"## {arch}: {label}",
        "",
        f"*{RANDOM_WEIGHTS_NOTE}.* Latency is per call of the whole batch; all-tasks answers "
        "every task for every image (B x T answers), routed answers one task per image.",
        "",
        "Configurations: " + "; ".join(f"`{k}` = {v}" for k, v in CONFIG_LABELS.items()) + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in ok:
        row = [
            r.config,
            r.mode,
            r.path,
            str(r.batch),
            _fmt(r.median_ms, ".3f"),
            _fmt(r.p90_ms, ".3f"),
            _fmt(r.answers_per_s, ",.0f"),
            _fmt(r.flops_per_call / 1e9, ".3f"),
            _fmt(r.tflops, ".3f"),
        ]
        if gpu:
            pct = None if r.peak_fraction is None else 100 * r.peak_fraction
            mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
            row += [_fmt(pct, ".1f"), _fmt(mem, ",.0f")]
        row += [_fmt(r.weight_bytes / 2**20, ".2f"), _fmt(r.max_abs_err_vs_eager, ".1e")]
        lines.append("| " + " | ".join(row) + " |")
    skipped = sorted(
        {(r.config, r.mode, r.path, r.status, r.reason) for r in results if r.status != "ok"}
    )
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {c} / {m} / {p}: {s}: {why}" for c, m, p, s, why in skipped]
    lines += ["", "Derived (ratios > 1 in throughput, < 1 in latency favour the engine):", ""]
    ratios = derived["weight_ratio_vs_one_expert"]
    lines.append(
        "- weight memory vs one expert: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items())
    )

    def show(title: str, rows: list[dict[str, Any]], spec: str = ".2f", suffix: str = "x") -> None:
        if rows:
            text = "; ".join(
                f"B={x['batch']} {x['path']} vs {x['baseline_path']}: "
                f"{format(x['value'], spec)}{suffix}"
                for x in rows
            )
            lines.append(f"- {title}: {text}")

    show("V1 all-tasks throughput / 8 experts", derived["v1_all_tasks_throughput_over_experts"])
    show("V2 all-tasks throughput / 8 experts", derived["v2_all_tasks_throughput_over_experts"])
    for mode, rows in derived["v2_batch1_latency_over_experts"].items():
        show(f"V2 {mode} batch-1 latency / 8 experts", rows)
    over = derived["v2_routed_overhead_over_merged"]
    rows = [{**x, "value": 100 * x["value"]} for x in over["ratios"]]
    title = "V2 routed latency overhead over the merged backbone"
    show(title + (f" ({over['note']})" if over["note"] else ""), rows, "+.1f", "%")
    return "\n".join(lines) + "\n"


def write_plots(
    results: Sequence[EngineResult], derived: dict[str, Any], out: Path, arch: str, label: str
) -> list[Path]:
    """``<out>/engine-<arch>-latency.png`` and ``-weights.png`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    colours = dict(zip(CONFIGS, ("tab:red", "tab:gray", "tab:blue", "tab:green")))
    # path -> (line style, marker)
    styles = {
        "eager": ("-", "o"),
        "fused": ("--", "s"),
        "compile": (":", "^"),
        "cuda-graph": ("-.", "D"),
        "fused+cuda-graph": ((0, (3, 1, 1, 1)), "P"),
        "onnxruntime": ((0, (5, 2)), "x"),
    }
    batches = sorted({r.batch for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, mode in zip(axes, MODES):
        for config in CONFIGS:
            for path, (linestyle, marker) in styles.items():
                rows = sorted(
                    (r for r in ok if (r.config, r.mode, r.path) == (config, mode, path)),
                    key=lambda r: r.batch,
                )
                if rows:
                    ax.plot(
                        [r.batch for r in rows],
                        [r.median_ms for r in rows],
                        marker=marker,
                        color=colours[config],
                        linestyle=linestyle,
                        label=f"{config} / {path}",
                    )
        ax.set(xscale="log", yscale="log", xlabel="batch (images)", title=mode)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("median latency per call (ms)")
    fig.suptitle(f"{arch}: {label} ({RANDOM_WEIGHTS_NOTE})", fontsize=9)
    fig.tight_layout()
    latency = out / f"engine-{arch}-latency.png"
    fig.savefig(latency, dpi=120)
    plt.close(fig)

    weights = derived["weight_bytes"]
    names = ["one_expert", *[c for c in CONFIGS if c in weights]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    values = [weights[n] / 2**20 for n in names]
    bars = ax.bar(names, values, color=["tab:orange", *[colours[n] for n in names[1:]]])
    for bar, n in zip(bars, names):
        ax.annotate(
            f"{weights[n] / weights['one_expert']:.2f}x",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(
        ylabel="weight memory (MiB)",
        title=f"{arch}: weights held in memory ({results[0].dtype}; ratio vs one expert)",
    )
    fig.tight_layout()
    weights_png = out / f"engine-{arch}-weights.png"
    fig.savefig(weights_png, dpi=120)
    plt.close(fig)
    return [latency, weights_png]


def write_outputs(
    config: EngineBenchConfig,
    results: Sequence[EngineResult],
    out: Path,
    command: str,
    plots: bool = True,
    merge: bool = False,
) -> list[Path]:
    """JSON, markdown and plots per architecture under ``out``; returns the files written.

    With ``merge``, an earlier ``engine-<arch>.json`` from the same device and dtype keeps the
    rows this run did not measure (so that a sweep can be split over several commands), and
    its commands are listed with this one.
    """
    device = torch.device(config.device)
    env = environment(device)
    dtype_name = config.resolved_dtype()
    if device.type == "cuda":
        label = f"{env['device_name']}, {dtype_name}, CUDA events"
    else:
        label = (
            f"CPU timings: {env['device_name']}, {dtype_name}, wall clock "
            "(not representative of a GPU)"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for arch_name in config.archs:
        arch = get_arch(arch_name)
        rows = [r for r in results if r.arch == arch.name]
        if not rows:
            continue
        stem = out / f"engine-{arch.name}"
        json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
        runs = [{"command": command, "config": asdict(config)}]
        if merge and json_path.exists():
            rows, earlier = _merge_previous(json_path, rows, env["device_name"], dtype_name)
            runs = earlier + runs
        one_expert = one_expert_bytes(
            arch, DTYPES[dtype_name], task_classes(arch, config.num_tasks)[0]
        )
        derived = derive_ratios(rows, one_expert, config.overhead_batch)
        record = {
            "benchmark": "engine",
            "note": RANDOM_WEIGHTS_NOTE,
            "label": label,
            **env,
            "command": command,
            "config": asdict(config),
            "runs": runs,
            "arch": arch.to_dict(),
            "task_classes": task_classes(arch, config.num_tasks),
            "flops_formula": FLOPS_FORMULA,
            "backbone_gflops_per_image": backbone_flops(arch) / 1e9,
            "results": [asdict(r) for r in rows],
            "derived": derived,
        }
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        md = markdown_report(rows, derived, label, arch.name)
        commands = "\n".join(f"    {run['command']}" for run in runs)
        md_path.write_text(f"Commands:\n\n{commands}\n\n{md}")
        print(md)
        written += [json_path, md_path]
        if plots:
            written += write_plots(rows, derived, out, arch.name, label)
    return written


def _merge_previous(
    path: Path, rows: list[EngineResult], device_name: str, dtype: str
) -> tuple[list[EngineResult], list[dict[str, Any]]]:
    """This run's rows plus the earlier file's rows for what it did not measure, in table
    order, and the earlier file's runs."""
    old = json.loads(path.read_text())
    old_dtype = old["results"][0]["dtype"] if old.get("results") else dtype
    if old.get("device_name") != device_name or old_dtype != dtype:
        raise SystemExit(
            f"{path} holds results from {old.get('device_name')!r} ({old_dtype}), not "
            f"{device_name!r} ({dtype}): use another --out, or run without --merge to replace it."
        )
    measured = {(r.config, r.mode, r.path, r.batch) for r in rows}
    kept = [
        EngineResult(**r)
        for r in old["results"]
        if (r["config"], r["mode"], r["path"], r["batch"]) not in measured
    ]
    paths = _plan_paths(EngineBenchConfig(paths=PATHS))
    order = {(c, m): i for i, (c, m) in enumerate((c, m) for c in CONFIGS for m in CONFIG_MODES[c])}
    merged = sorted(
        [*kept, *rows], key=lambda r: (order[r.config, r.mode], paths.index(r.path), r.batch)
    )
    runs = old.get("runs") or [{"command": old.get("command"), "config": old.get("config")}]
    return merged, runs


FLOPS_FORMULA = (
    "per image: backbone = 2*P*(3*p^2)*d + L*(2*N*(4*d^2 + 2*d*m) + 2*2*N^2*d) + 2*d*e; "
    "adapter = 2*2*r*d per corrected row (N rows per block site, 1 at final); head_t = 2*e*C_t; "
    "LayerNorm/softmax/GELU/bias/residual not counted"
)


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument(
        "--archs",
        nargs="+",
        default=None,
        help="default: tiny-vit-32 ViT-B-32 ViT-L-14 on CUDA, tiny-vit-32 on the CPU",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="default: 1 8 32 64 128 on CUDA, 1 8 32 on the CPU",
    )
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: fp16 on CUDA, fp32 on the CPU",
    )
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--rank-v2",
        type=int,
        default=None,
        help="SurgeryV2 rank (default: 4 for ViT-L as in the paper, else --rank)",
    )
    p.add_argument("--warmup", type=int, default=None, help="default: 10 on CUDA, 3 on the CPU")
    p.add_argument("--iters", type=int, default=None, help="default: 100 on CUDA, 20 on the CPU")
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument(
        "--max-seconds",
        type=float,
        default=2.0,
        help="time budget per measurement (fewer iterations for slow calls)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_SXM_FP16_TFLOPS,
        help="dense fp16 peak of the GPU (989 = H100 SXM)",
    )
    p.add_argument("--overhead-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of an earlier engine-<arch>.json in --out that this run does not "
        "measure (split a sweep over several commands)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed paths")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> EngineBenchConfig:
    cuda = torch.device(args.device).type == "cuda"
    return EngineBenchConfig(
        archs=tuple(
            args.archs or (["tiny-vit-32", "ViT-B-32", "ViT-L-14"] if cuda else ["tiny-vit-32"])
        ),
        batches=tuple(args.batches or ([1, 8, 32, 64, 128] if cuda else [1, 8, 32])),
        configs=tuple(args.configs),
        modes=tuple(args.modes),
        paths=tuple(args.paths),
        device=args.device,
        dtype=args.dtype or ("fp16" if cuda else "fp32"),
        num_tasks=args.tasks,
        rank=args.rank,
        rank_v2=args.rank_v2,
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 3),
        iters=args.iters if args.iters is not None else (100 if cuda else 20),
        min_iters=args.min_iters,
        max_seconds=args.max_seconds,
        peak_tflops=args.peak_tflops if cuda else None,
        overhead_batch=args.overhead_batch,
    )


def command_line(argv: list[str] | None) -> str:
    """The command as run: the script's or the CLI's command line, else the library call."""
    prog = Path(sys.argv[0]).name
    if argv is None and sys.argv[0].endswith(".py"):
        return shlex.join(["python", *sys.argv])
    if argv is None or prog == "surgery-edge":
        return shlex.join([prog, *sys.argv[1:]])
    return shlex.join(["bench_engine.main", *argv])


def main(argv: list[str] | None = None) -> list[EngineResult]:
    """Parse ``argv``, run the benchmark, write JSON/markdown/plots under ``--out``."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    if torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: pass --device cpu")
    results = run_engine_bench(
        config, log=lambda msg: print(msg, file=sys.stderr, flush=True), verbose=args.verbose
    )
    written = write_outputs(
        config, results, args.out, command_line(argv), not args.no_plots, args.merge
    )
    print("written: " + ", ".join(str(p) for p in written))
    return results


if __name__ == "__main__":
    main()

"""What the engine benchmark measures: its configurations, modes and paths, the config and
result records, and the models it builds with random weights.

* ``experts``: eight separate experts, each its own ImageEncoder + head in memory, run one after
  another on the batch (all-tasks), or each on the images routed to its task (routed);
* ``merged``: the merged backbone alone, no adapters (the lower bound; backbone once, eight heads);
* ``surgery``: the V1 engine (final-site adapters), all-tasks: backbone once, fan out at the
  final adapter and the heads;
* ``surgeryv2``: the V2 engine (every block + final), routed (each image one task) and all-tasks
  (the batch expanded to T x B rows through one weight set).

The weights are random (timing only): ``ViT-B-32`` and ``ViT-L-14`` are built from open_clip's
configs at 224 px, ``tiny-vit-32`` and ``micro-vit-16`` are the built-in suite's models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from surgery_edge.bench.flops import task_classes
from surgery_edge.models import ArchSpec, ClassificationHead, ImageEncoder, build_encoder
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
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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


def plan_paths(paths: Sequence[str]) -> list[str]:
    """The requested paths in timing order; ``cuda-graph`` with ``fused`` adds its fused twin."""
    planned = [p for p in PATHS if p in paths]
    if "cuda-graph" in planned and "fused" in planned:
        planned.insert(planned.index("cuda-graph") + 1, "fused+cuda-graph")
    return planned


def applicable(path: str, config: str) -> bool:
    """Whether ``path`` applies to ``config`` at all (wherever it runs)."""
    if path in ("fused", "fused+cuda-graph"):
        return config in ("surgery", "surgeryv2")
    if path == "onnxruntime":
        return config != "experts"  # the exporter takes one MultiTaskModel
    return True


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


@dataclass
class Parts:
    """Random weights shared by the configurations of one architecture (on the CPU, fp32)."""

    arch: ArchSpec
    encoder: ImageEncoder
    heads: list[ClassificationHead]
    tasks: list[str]

    @classmethod
    def random(cls, arch: ArchSpec, num_tasks: int, seed: int) -> Parts:
        torch.manual_seed(seed)
        encoder = build_encoder(arch).eval()
        heads = [
            ClassificationHead(torch.randn(c, arch.embed_dim) * arch.embed_dim**-0.5)
            for c in task_classes(arch, num_tasks)
        ]
        return cls(arch, encoder, heads, [f"task{t}" for t in range(num_tasks)])


def build(
    parts: Parts, config: str, rank: int, device: torch.device, dtype: torch.dtype
) -> SeparateExperts | MultiTaskModel:
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


@dataclass(frozen=True)
class Inputs:
    """One batch: images and, for routed mode, each image's task (cycling through the tasks)."""

    images: torch.Tensor  # (B, 3, S, S)
    task_ids: torch.Tensor  # (B,) int64
    groups: list[tuple[int, torch.Tensor]]  # the experts' routing: (task, its image indices)

    @classmethod
    def make(
        cls, arch: ArchSpec, batch: int, num_tasks: int, device: torch.device, dtype: torch.dtype
    ) -> Inputs:
        gen = torch.Generator().manual_seed(batch)
        images = torch.randn(batch, 3, arch.image_size, arch.image_size, generator=gen)
        ids = torch.arange(batch) % num_tasks
        groups = [(t, (ids == t).nonzero().flatten().to(device)) for t in range(num_tasks)]
        return cls(
            images.to(device=device, dtype=dtype),
            ids.to(device),
            [(t, idx) for t, idx in groups if idx.numel()],
        )

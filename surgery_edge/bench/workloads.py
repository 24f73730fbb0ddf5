"""What the engine benchmark measures: its configurations, modes and paths, the config and
result records, and the models it builds with random weights.

The engines and their reference:

* ``merged``: the merged backbone alone, no adapters (backbone once, eight heads);
* one engine per registered surgery method (:mod:`surgery_edge.surgery.methods`): ``surgery``
  (V1, final-site adapters; all-tasks: backbone once, fan out at the final adapter and the
  heads) and ``surgeryv2`` (V2, every block + final; routed, and all-tasks as T x B rows through
  one weight set).

The baselines a careful engineer would build instead, each holding eight experts' weights:

* ``experts``: eight separate experts (ImageEncoder + head each), one after another on the batch
  (all-tasks), or each on the images routed to its task (routed);
* ``experts-one-graph``: the eight experts' exported engines composed into one ONNX graph
  (:mod:`~surgery_edge.bench.one_graph`): one call answers every task, on the exported paths
  (ONNX Runtime, TensorRT) only, all-tasks only: the fairest baseline of the engines there;
* ``experts-concurrent``: the same eight modules run at once: on the CPU in a pool of as many
  threads as the engine has intra-op threads, each expert single-threaded (the same cores as
  the engine); on the GPU one CUDA stream per expert;
* ``experts-vmap``: the eight experts' parameters stacked (``torch.func.stack_module_state``)
  and one ``functional_call`` vmapped over them: eight backbones in one call of batched matmuls.

And ``one-expert``: a single expert alone on its own task, the reference that tells what
running eight sets of weights costs beyond eight times one (caches, launch queues).

The weights are random (timing only): ``ViT-B-32`` and ``ViT-L-14`` are built from open_clip's
configs at 224 px, ``tiny-vit-32`` and ``micro-vit-16`` are the built-in suite's models.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from surgery_edge.bench.choices import (  # the names, torch-free for the command line
    ALL_TASKS,
    CONFIGS,
    DTYPE_NAMES,
    ENGINES,
    MERGED,
    MODES,
    ONE_EXPERT,
    ONE_GRAPH,
    PATHS,
    ROUTED,
)
from surgery_edge.bench.flops import task_classes
from surgery_edge.models import ArchSpec, ClassificationHead, ImageEncoder, build_encoder
from surgery_edge.models.heads import normalize_per_task, uniform_normalize
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.methods import SURGERY_METHODS, get_surgery
from surgery_edge.surgery.model import MultiTaskModel

RANDOM_WEIGHTS_NOTE = "random weights: timing only"
CONFIG_LABELS = {
    "experts": "8 separate experts, one after another",
    "experts-concurrent": "8 separate experts at once (CPU: a thread each, on the engine's "
    "cores; GPU: a CUDA stream each)",
    ONE_GRAPH: "8 experts as one model (their engines in one ONNX graph, one call)",
    "experts-vmap": "8 experts stacked and vmapped into one call "
    "(torch.func.stack_module_state + functional_call)",
    ONE_EXPERT: "one expert alone, its own task only (the reference for the eight experts' "
    "cache cost)",
    MERGED: "merged backbone (no adapters)",
    **{
        name: f"{'V2' if m.every_block else 'V1'} engine ({m.label}, "
        f"{'every block' if m.every_block else 'final site'})"
        for name, m in SURGERY_METHODS.items()
    },
}


def config_modes(config: str) -> tuple[str, ...]:
    """The modes ``config`` is benchmarked in: V1 is an all-tasks engine, the stacked experts
    and one expert answer every image for all their tasks; the rest run both modes."""
    if config in ("experts-vmap", ONE_EXPERT, ONE_GRAPH):
        return (ALL_TASKS,)
    if config in ENGINES and not get_surgery(config).every_block:
        return (ALL_TASKS,)
    return (ALL_TASKS, ROUTED)


CONFIG_MODES = {c: config_modes(c) for c in CONFIGS}
DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class EngineBenchConfig:
    """What to run and how to time it.

    ``rank_v2=None`` means the paper's choice: rank 4 for ViT-L, otherwise ``rank``.
    ``peak_tflops`` is the dense fp16 peak the %-of-peak column divides by (None: no such
    column; ``engine_config.with_device_peaks`` fills it from the GPU's datasheet, with
    ``peak_source`` saying where it came from); it is ignored on the CPU. Each (mode, batch) is
    one group: its configurations and paths are timed in ``rounds`` interleaved rounds
    (ABCABC...), each round one block of calls of every contestant lasting about
    ``block_seconds``. With a ``budget_s``, the ``compile`` path runs after the others, and
    ``compile_share`` of the time is kept for it.
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
    rounds: int = 7
    block_seconds: float = 0.05
    peak_tflops: float | None = None
    peak_source: str | None = None  # datasheet, measured or given: where peak_tflops came from
    overhead_batch: int = 64  # the batch of the "V2 fused routed vs merged backbone" target
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    budget_s: float | None = None  # stop starting groups after this many seconds
    compile_share: float = 0.4  # of the budget, kept for the compile path (run last)
    memory_paths: tuple[str, ...] = ("eager", "onnxruntime")  # peak memory, one process each
    memory_configs: tuple[str, ...] | None = None  # None: every configuration
    memory_jobs: int = 1
    time_interpreter: bool = False  # time the fused path under TRITON_INTERPRET (checks only)
    compile_backend: str = "inductor"  # torch.compile's backend ("eager": dynamo only, checks)
    seed: int = 0

    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "fp16" if torch.device(self.device).type == "cuda" else "fp32"

    def resolved_rank(self, arch: str, config: str) -> int:
        if config not in ENGINES or not get_surgery(config).every_block:
            return self.rank
        if self.rank_v2 is not None:
            return self.rank_v2
        return 4 if "ViT-L" in arch else self.rank


@dataclass(frozen=True)
class EngineResult:
    """One (architecture, configuration, mode, path, batch) measurement.

    ``status`` is ``ok`` (measured), ``failed`` (the path raised; ``reason`` says why),
    ``unavailable`` (the path cannot run here) or ``skipped`` (the time budget ran out).
    Latencies are per call of the whole batch: the median and the quartiles over ``rounds``
    interleaved blocks of ``calls_per_block`` calls. ``peak_mem_bytes`` is measured in a
    process of its own (:mod:`surgery_edge.bench.memory`): the peak RSS on the CPU
    (``peak_mem_kind`` ``rss``), ``torch.cuda.max_memory_allocated`` on the GPU.
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
    timer: str | None  # "torch.utils.benchmark"
    rounds: int
    calls_per_block: int
    median_ms: float | None
    q1_ms: float | None
    q3_ms: float | None
    answers_per_call: int  # B x T (all-tasks), B (routed, or one expert)
    answers_per_s: float | None
    flops_per_call: int
    bytes_per_call: int  # the fewest bytes a call must move: weights it reads, input, logits
    tflops: float | None
    peak_fraction: float | None
    weight_bytes: int
    threads: int  # torch intra-op threads during the timing (1 per worker when concurrent)
    workers: int  # threads or CUDA streams running experts at once (1: one after another)
    load_avg_1m: float | None  # the machine's load when the group started
    setup_s: float | None  # compile / capture / export time, first call included
    max_abs_err_vs_eager: float | None
    peak_mem_bytes: int | None = None  # the peak while running this batch
    held_mem_bytes: int | None = None  # with the model built (or the sessions open), idle
    peak_mem_kind: str | None = None  # "rss" | "cuda-max-allocated"
    peak_mem_error: str | None = None  # why the memory process failed

    @property
    def spread(self) -> float | None:
        """The interquartile range over the median."""
        if self.median_ms is None or self.q1_ms is None or self.q3_ms is None:
            return None
        return (self.q3_ms - self.q1_ms) / self.median_ms


def plan_paths(paths: Sequence[str]) -> list[str]:
    """The requested paths in timing order; ``cuda-graph`` with ``fused`` adds its fused twin."""
    planned = [p for p in PATHS if p in paths]
    if "cuda-graph" in planned and "fused" in planned:
        planned.insert(planned.index("cuda-graph") + 1, "fused+cuda-graph")
    return planned


def applicable(path: str, config: str) -> bool:
    """Whether ``path`` applies to ``config`` at all (wherever it runs)."""
    if path in ("fused", "fused+cuda-graph"):
        return config in ENGINES
    if path in ("onnxruntime", "tensorrt"):
        return config != "experts-vmap"  # vmap is a PyTorch program, not an exported engine
    return config != ONE_GRAPH  # an exported graph; in PyTorch it is the experts' program


def answers_per_call(config: str, mode: str, batch: int, num_tasks: int) -> int:
    """Task-answers one call returns: B x T all-tasks, B routed or for one expert."""
    if config == ONE_EXPERT or mode == ROUTED:
        return batch
    return batch * num_tasks


def run_expert(
    encoder: ImageEncoder, head: ClassificationHead, images: torch.Tensor
) -> torch.Tensor:  # (B, 3, H, W) -> (B, C)
    """One expert on a batch."""
    return head(encoder(images))


def compiled_expert_runner(backend: str = "inductor") -> Callable:
    """``run_expert`` with the encoder under ``torch.compile``: one compiled graph serves all
    eight experts (their parameters are graph inputs); the heads, whose class counts differ,
    stay eager."""
    encode = torch.compile(lambda encoder, images: encoder(images), backend=backend)
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

    def calls_all_tasks(
        self, images: torch.Tensor, run: Callable = run_expert
    ) -> list[Callable[[], torch.Tensor]]:
        """The T independent calls of :meth:`forward_all_tasks`, for a concurrent runner."""
        return [
            lambda enc=enc, head=head: run(enc, head, images)
            for enc, head in zip(self.encoders, self.heads)
        ]

    def calls_routed(
        self,
        images: torch.Tensor,
        groups: Sequence[tuple[int, torch.Tensor]],
        run: Callable = run_expert,
    ) -> list[Callable[[], torch.Tensor]]:
        """The independent calls of :meth:`forward_routed`, one per non-empty task."""
        return [
            lambda t=t, idx=idx: run(self.encoders[t], self.heads[t], images.index_select(0, idx))
            for t, idx in groups
        ]


class OneExpert(nn.Module):
    """One expert alone (the first of the eight), answering its own task."""

    def __init__(self, experts: SeparateExperts):
        super().__init__()
        self.encoder, self.head = experts.encoders[0], experts.heads[0]
        self.experts = [experts]  # a list, not a submodule: holds one expert's weights only

    def forward_all_tasks(
        self, images: torch.Tensor, run: Callable = run_expert
    ) -> list[torch.Tensor]:
        return [run(self.encoder, self.head, images)]


@contextlib.contextmanager
def vmappable_attention() -> Iterator[None]:
    """Attention that vmap batches instead of looping over.

    ``nn.MultiheadAttention``'s inference fast path (``_native_multi_head_attention``) and the
    fused SDPA kernels have no vmap batching rule in PyTorch: vmap would fall back to one call
    per expert ("There is a performance drop because we have not yet implemented the batching
    rule"). With the fast path off and SDPA's math backend (matmul + softmax), every op of the
    eight stacked experts is one batched kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel  # deferred: torch >= 2.3 only

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class StackedExperts(nn.Module):
    """The eight experts as one vmapped program: every parameter stacked along a leading task
    dimension, one ``functional_call`` of a weightless copy of the encoder vmapped over it,
    and the heads as one padded batched matmul.

    Call it inside :func:`vmappable_attention`.
    """

    def __init__(self, encoders: Sequence[ImageEncoder], heads: Sequence[ClassificationHead]):
        super().__init__()
        params, buffers = torch.func.stack_module_state(list(encoders))
        self._names = {"params": list(params), "buffers": list(buffers)}
        for kind, tensors in (("params", params), ("buffers", buffers)):
            for name, t in tensors.items():  # (T, ...) each
                self.register_buffer(f"{kind}__{name.replace('.', '__')}", t.detach())
        self._base = [copy.deepcopy(encoders[0]).to("meta")]  # a list: not a submodule
        counts = [h.num_classes for h in heads]
        like = heads[0].weight
        weight = like.new_zeros(len(heads), max(counts), like.shape[1])
        bias = like.new_zeros(len(heads), max(counts))
        with torch.no_grad():
            for t, h in enumerate(heads):
                weight[t, : h.num_classes], bias[t, : h.num_classes] = h.weight, h.bias
        self.register_buffer("head_weight", weight)  # (T, C_max, e), zero-padded
        self.register_buffer("head_bias", bias)  # (T, C_max)
        self.class_counts, self.normalize = counts, uniform_normalize(heads)
        flags = torch.tensor([bool(h.normalize) for h in heads])
        self.register_buffer("head_normalize", flags, persistent=False)  # (T,)

    def _stacked(self, kind: str) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"{kind}__{n.replace('.', '__')}") for n in self._names[kind]}

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # (B, 3, H, W)
        """Every expert on the whole batch in one vmapped call: T tensors (B, C_t)."""
        base = self._base[0]

        def one(params, buffers, x):
            return torch.func.functional_call(base, (params, buffers), (x,))

        z = torch.func.vmap(one, in_dims=(0, 0, None))(
            self._stacked("params"), self._stacked("buffers"), images
        )  # (T, B, e)
        z = normalize_per_task(z, self.head_normalize[:, None], self.normalize)  # (T, B, e)
        logits = torch.einsum("tbe,tce->tbc", z, self.head_weight) + self.head_bias[:, None]
        return [logits[t, :, :c] for t, c in enumerate(self.class_counts)]


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


def _experts(parts: Parts, device: torch.device, dtype: torch.dtype) -> SeparateExperts:
    base = copy.deepcopy(parts.encoder).to(device=device, dtype=dtype)
    encoders = [base, *(copy.deepcopy(base) for _ in parts.tasks[1:])]
    heads = [copy.deepcopy(h) for h in parts.heads]
    return SeparateExperts(encoders, heads).to(device=device, dtype=dtype).eval()


def build_all(
    parts: Parts,
    configs: Sequence[str],
    ranks: dict[str, int],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, nn.Module]:
    """The module each configuration holds, on ``device`` in ``dtype``. ``experts``,
    ``experts-concurrent`` and ``one-expert`` share one set of eight experts (one expert's
    weights for ``one-expert``); ``experts-vmap`` holds its own stacked copy."""
    models: dict[str, nn.Module] = {}
    experts = None
    for config in configs:
        if config in ("experts", "experts-concurrent", ONE_EXPERT, "experts-vmap", ONE_GRAPH):
            experts = experts or _experts(parts, device, dtype)
        if config in ("experts", "experts-concurrent", ONE_GRAPH):
            models[config] = experts
        elif config == ONE_EXPERT:
            models[config] = OneExpert(experts).eval()
        elif config == "experts-vmap":
            models[config] = StackedExperts(experts.encoders, experts.heads).eval()
        else:
            models[config] = build_engine_model(parts, config, ranks.get(config, 16), device, dtype)
    return models


def build_engine_model(
    parts: Parts, config: str, rank: int, device: torch.device, dtype: torch.dtype
) -> MultiTaskModel:
    """The merged model (``merged``) or an engine (a surgery method's name) with random
    adapters."""
    bank = None
    if config != MERGED:
        torch.manual_seed(1)
        bank = AdapterBank(parts.tasks, parts.arch, config, rank)
        with torch.no_grad():  # trained adapters are not zero: give W_up values too
            for site in bank.sites:
                bank.weights(site)[1].normal_(0.0, 0.02)
    model = MultiTaskModel(copy.deepcopy(parts.encoder), parts.heads, parts.tasks, bank)
    return model.to(device=device, dtype=dtype).eval()


def expert_as_engine(
    task: str, experts: SeparateExperts, t: int, dtype: torch.dtype
) -> MultiTaskModel:
    """Expert ``t`` as a one-task, adapter-free MultiTaskModel (on the CPU), so that the ONNX
    exporter makes it an engine of its own."""
    encoder = copy.deepcopy(experts.encoders[t]).to("cpu", torch.float32)
    head = copy.deepcopy(experts.heads[t]).to("cpu", torch.float32)
    model = MultiTaskModel(encoder, [head], [task], None)
    return model.to(dtype=dtype).eval()


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

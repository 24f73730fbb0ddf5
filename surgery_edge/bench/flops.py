"""Analytical FLOP counts and weight bytes of the benchmarked workloads.

FLOPs are counted at 2 per multiply-add, per image, from the ArchSpec (P = (S/p)^2 patches,
N = P + 1 tokens, width d, MLP width m, L blocks, embed e, rank r)::

    backbone = 2*P*(3*p^2)*d                            patch embedding
             + L * (2*N*(4*d^2 + 2*d*m)                 qkv + out projection, MLP
                    + 2*2*N^2*d)                        attention scores and weighted sum
             + 2*d*e                                    final projection
    adapter  = 2*2*r*d per token (W_down, W_up): N tokens at a block site, 1 row at ``final``
    head_t   = 2*e*C_t

LayerNorm, softmax, GELU, biases and the residual adds are not counted. This gives 8.83 GFLOP per
image for ViT-B/32 and 162.0 for ViT-L/14 (open_clip's profile: 8.82 and 162.03). The count
equals ``torch.utils.flop_counter.FlopCounterMode``'s (matmuls, convolutions, SDPA) for every
configuration and mode, except that stacked heads (the engines, the vmapped experts) compute
every task's logits at the largest class count: those padded FLOPs are not counted here
(``tests/bench/test_bench.py``). A call costs:
experts all-tasks (each baseline: one after another, concurrent, vmapped) B * sum_t(backbone +
head_t); one expert B * (backbone + head_0); merged all-tasks B * (backbone + sum_t head_t);
V1 all-tasks B * (backbone + sum_t(adapter_final + head_t)); V2 all-tasks
B * sum_t(backbone + adapters + head_t); routed: per image its own task's share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from surgery_edge.models import ArchSpec, build_encoder
from surgery_edge.surgery.methods import get_surgery

FLOPS_FORMULA = (
    "per image: backbone = 2*P*(3*p^2)*d + L*(2*N*(4*d^2 + 2*d*m) + 2*2*N^2*d) + 2*d*e; "
    "adapter = 2*2*r*d per corrected row (N rows per block site, 1 at final); head_t = 2*e*C_t; "
    "LayerNorm/softmax/GELU/bias/residual not counted"
)
# Class counts: the paper's eight tasks (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST,
# DTD) for the open_clip architectures, the built-in suite's for the tiny ones.
PAPER_CLASSES = (397, 196, 45, 10, 10, 43, 10, 47)
SUITE_CLASSES = (10, 10, 6, 6, 8, 4, 8, 8)


def task_classes(arch: ArchSpec, num_tasks: int) -> list[int]:
    """The class count of each of ``num_tasks`` benchmarked tasks (cycling through eight)."""
    counts = SUITE_CLASSES if arch.name.startswith(("tiny-", "micro-")) else PAPER_CLASSES
    return [counts[t % len(counts)] for t in range(num_tasks)]


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
    if not get_surgery(method).every_block:
        return 4 * rank * arch.embed_dim
    return arch.layers * 4 * rank * arch.width * arch.num_tokens + 4 * rank * arch.embed_dim


def _is_experts(config: str) -> bool:
    return config.startswith("experts")  # experts, experts-concurrent, experts-vmap


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
    engine = not (_is_experts(config) or config in ("merged", "one-expert"))
    adapters = adapter_flops(arch, config, rank) if engine else 0
    if config == "one-expert":
        return batch * (bb + heads[0])
    if mode == "routed":
        return sum(bb + adapters + heads[t] for t in task_ids)
    if _is_experts(config):
        return batch * sum(bb + h for h in heads)
    if config == "merged":
        return batch * (bb + sum(heads))
    if not get_surgery(config).every_block:  # V1: backbone once, fan out at the final site
        return batch * (bb + sum(adapters + h for h in heads))
    return batch * sum(bb + adapters + h for h in heads)  # V2: T x B rows


def workload_bytes(
    arch: ArchSpec,
    config: str,
    mode: str,
    task_ids: Sequence[int],
    classes: Sequence[int],
    weight_bytes: int,
    element_size: int,
) -> int:
    """The fewest bytes one call must move through memory: the weights it reads once (routed
    experts: only those of the tasks in the batch), the images in, the logits out.

    Activations are not counted (a perfect kernel keeps them on chip), so this is a floor.
    """
    batch = len(task_ids)
    weights = weight_bytes
    if _is_experts(config) and mode == "routed":
        weights = weight_bytes * len(set(task_ids)) // len(classes)
    images = batch * 3 * arch.image_size**2 * element_size
    if config == "one-expert":
        logits = batch * classes[0]
    elif mode == "routed":
        logits = sum(classes[t] for t in task_ids)
    else:
        logits = batch * sum(classes)
    return weights + images + logits * element_size


def module_bytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer ``module`` holds."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def one_expert_bytes(arch: ArchSpec, dtype: torch.dtype, num_classes: int) -> int:
    """Weight bytes of one expert (an encoder and a ``num_classes`` head) in ``dtype``."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        encoder = build_encoder(arch)
    numel = sum(t.numel() for t in [*encoder.parameters(), *encoder.buffers()])
    numel += num_classes * (arch.embed_dim + 1)  # weight and bias
    return numel * torch.empty((), dtype=dtype).element_size()

"""What ``surgery-edge bench`` asks the engine benchmark for: the defaults of where it runs
(CUDA, the CPU, ``--quick``) filled in, the device's peak for the %-of-peak column, and the
order the groups and the compiles run in."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from surgery_edge.bench.choices import ALL_TASKS, DEFAULTS, ENGINES, MERGED, ROUTED
from surgery_edge.bench.roofline import device_peaks
from surgery_edge.bench.workloads import EngineBenchConfig
from surgery_edge.errors import ConfigError
from surgery_edge.models import get_arch


def with_device_peaks(config: EngineBenchConfig) -> EngineBenchConfig:
    """``config`` with the dense fp16 peak of its CUDA device (``--peak-tflops`` where given,
    else the datasheet's for the GPU's name, else measured) and where it came from; on the CPU
    unchanged, without a peak."""
    if torch.device(config.device).type != "cuda":
        return dataclasses.replace(config, peak_tflops=None, peak_source=None)
    peaks = device_peaks(config.device, tflops=config.peak_tflops)
    return dataclasses.replace(
        config, peak_tflops=peaks.dense_fp16_tflops, peak_source=peaks.source
    )


def resolve_config(quick: bool = False, **given: Any) -> EngineBenchConfig:
    """The benchmark configuration ``surgery-edge bench`` asks for.

    ``given`` holds :class:`EngineBenchConfig` fields; those missing or None take the defaults
    of :data:`~surgery_edge.bench.choices.DEFAULTS` for where the benchmark runs (CUDA, the
    CPU, or ``quick``), the rest the dataclass's. ``device`` None or ``auto``: CUDA when there
    is one. ``threads`` given sets torch's intra-op threads.

    Raises:
        ConfigError: CUDA asked for where there is none, or an unknown architecture.
    """
    given = {k: v for k, v in given.items() if v is not None}
    device = given.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: there is no CUDA device here; pass --device cpu.")
    column = 2 if quick else 0 if cuda else 1
    for name, values in DEFAULTS.items():
        given.setdefault(name, values[column])
    for arch in given["archs"]:
        get_arch(arch)  # an unknown name is refused before anything is measured
    if given.get("threads"):
        torch.set_num_threads(given["threads"])
    given |= {
        "device": device,
        "dtype": given.get("dtype") or ("fp16" if cuda else "fp32"),
        "peak_tflops": given.get("peak_tflops"),
        "threads": given.get("threads") or torch.get_num_threads(),
    }
    sequences = {f.name for f in dataclasses.fields(EngineBenchConfig) if "tuple" in str(f.type)}
    config = EngineBenchConfig(**{k: tuple(v) if k in sequences else v for k, v in given.items()})
    return with_device_peaks(config)


def group_order(
    batches: Sequence[int], modes: Sequence[str], overhead_batch: int
) -> list[tuple[int, str]]:
    """The groups, (batch, mode), in the order the targets need them: every all-tasks group in
    the order of ``batches`` (the engines against the eight experts), then the routed group at
    ``overhead_batch`` (the routed engine's overhead over the merged backbone), then the other
    routed groups."""
    order = [(b, ALL_TASKS) for b in batches if ALL_TASKS in modes]
    if ROUTED in modes:
        routed = sorted(batches, key=lambda b: b != overhead_batch)  # stable: the rest in order
        order += [(b, ROUTED) for b in routed]
    return order


# the compile phase's order: the experts' one compiled encoder first (it serves three
# baselines), then the engines the targets compare with them, then the rest
COMPILE_ORDER = ("experts", "experts-concurrent", "one-expert", *ENGINES, MERGED, "experts-vmap")

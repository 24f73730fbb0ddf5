"""Timing: interleaved rounds of ``torch.utils.benchmark`` blocks, CUDA graphs.

The engine benchmark times every contestant of a group (its configurations and paths at one
batch size) in interleaved rounds, ABCABC...: a drift in the machine's load then moves every
contestant alike instead of whichever happened to run last. Each round measures each contestant
once with ``torch.utils.benchmark.Timer.blocked_autorange``, which sets the contestant's torch
thread count, sizes its blocks with a first call (so that the timed calls find the contestant's
own weights hot, not evicted by the previous one) and synchronises CUDA around each block. A
round's sample is the median of its blocks' mean call times; a contestant's figure is the
median over rounds with the quartiles beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from surgery_edge.progress import silence_cuda_home_notice

TIMER = "torch.utils.benchmark"
SPREAD_WARNING = 0.10  # an interquartile range above 10% of the median is flagged


@dataclass(frozen=True)
class Samples:
    """Per-round mean call times (ms) of one contestant, and how they were taken."""

    ms: list[float]
    timer: str
    calls_per_block: int

    @property
    def median(self) -> float:
        return float(np.median(self.ms))

    @property
    def q1(self) -> float:
        return float(np.percentile(self.ms, 25))

    @property
    def q3(self) -> float:
        return float(np.percentile(self.ms, 75))

    @property
    def spread(self) -> float:
        """The interquartile range over the median."""
        return (self.q3 - self.q1) / self.median


@dataclass(frozen=True)
class Contestant:
    """One callable to time, with the torch intra-op threads it runs under."""

    key: Hashable
    fn: Callable[[], object]
    threads: int


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    contestants: Sequence[Contestant],
    device: torch.device,
    rounds: int,
    block_seconds: float,
) -> tuple[dict[Hashable, Samples], dict[Hashable, BaseException]]:
    """Time every contestant in ``rounds`` interleaved rounds (ABCABC...).

    Each round gives each contestant one ``Timer.blocked_autorange(min_run_time=block_seconds)``:
    it sizes a block of calls (its first, untimed-for-the-result call re-warms the contestant's
    weights after the previous contestant), then times blocks until ``block_seconds`` have
    passed; the round's sample is the median of its blocks. A call slower than
    ``block_seconds`` costs two calls per round.

    Args:
        contestants: what to time; each has already run once (compiled, captured, exported).
        device: where they run (``torch.utils.benchmark`` synchronises CUDA around blocks).
        rounds: rounds, each one measurement of every contestant in turn.
        block_seconds: the least time each contestant is timed for per round.

    Returns:
        Per contestant key, its per-round samples; and the contestants that raised (they drop
        out of the later rounds), with their error.
    """
    silence_cuda_home_notice()  # torch.utils.benchmark imports cpp_extension, which logs it
    from torch.utils.benchmark import Timer  # deferred: loads its helpers only when timing

    timers = {
        c.key: Timer("fn()", globals={"fn": c.fn}, num_threads=c.threads) for c in contestants
    }
    samples: dict[Hashable, list[float]] = {c.key: [] for c in contestants}
    calls: dict[Hashable, int] = {}
    failed: dict[Hashable, BaseException] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for c in contestants:
                if c.key in failed:
                    continue
                try:
                    m = timers[c.key].blocked_autorange(min_run_time=block_seconds)
                except Exception as e:  # recorded by the caller; the others still run
                    failed[c.key] = e
                    continue
                samples[c.key].append(m.median * 1e3)
                calls[c.key] = m.number_per_run
    done = {k: Samples(ms, TIMER, calls[k]) for k, ms in samples.items() if k not in failed}
    return done, failed


def cuda_graph(fn: Callable[[torch.Tensor], Any], images: torch.Tensor) -> Callable[[], Any]:
    """Capture ``fn(static_images)`` once in a ``torch.cuda.CUDAGraph``; the returned callable
    replays it and returns the captured output."""
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

"""Timing: warm-up, repeated calls, synchronisation, CUDA graphs.

One helper, :func:`measure`, times every benchmark: CUDA events on the GPU (optionally with the
L2 cache flushed before each call), ``time.perf_counter`` on the CPU or for calls that return
only when their GPU work is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any L2 cache (H100: 50 MB)


@dataclass(frozen=True)
class Samples:
    """Per-call milliseconds and the clock that took them (``cuda-events`` | ``perf_counter``)."""

    ms: list[float]
    timer: str

    @property
    def median(self) -> float:
        return float(np.median(self.ms))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.ms, 90))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    iters: int,
    *,
    min_iters: int | None = None,
    max_seconds: float | None = None,
    wall_clock: bool = False,
    flush_l2: bool = False,
) -> Samples:
    """Time ``fn`` after ``warmup`` calls.

    Args:
        fn: one call of the workload.
        device: where it runs; CUDA work is timed with CUDA events.
        warmup: untimed calls first.
        iters: timed calls.
        min_iters: with ``max_seconds``, the fewest timed calls.
        max_seconds: a time budget per phase: one timed call first estimates the cost, then slow
            calls get fewer warm-up (at least 1) and timed (at least ``min_iters``) calls, so that
            each phase stays within about ``max_seconds``. None: exactly ``warmup`` and ``iters``.
        wall_clock: time with perf_counter on CUDA too, for a call that returns only when its
            GPU work is done (ONNX Runtime's).
        flush_l2: zero a buffer larger than the L2 cache before each timed CUDA call, so that
            the inputs come from HBM.

    Returns:
        The per-call milliseconds and the clock used.
    """
    n_warmup, n = warmup, iters
    if max_seconds is not None:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        affordable = int(max_seconds / max(time.perf_counter() - start, 1e-9))
        n_warmup = max(1, min(warmup, affordable))
        n = max(min(min_iters or 1, iters), min(iters, affordable))
    cuda_events = device.type == "cuda" and not wall_clock
    flush = None
    if flush_l2 and cuda_events:
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    for _ in range(n_warmup):
        fn()
    sync(device)
    if cuda_events:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(n)
        ]
        for begin, end in events:
            if flush is not None:
                flush.zero_()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return Samples([begin.elapsed_time(end) for begin, end in events], "cuda-events")
    ms = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        sync(device)
        ms.append((time.perf_counter() - start) * 1e3)
    return Samples(ms, "perf_counter")


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

"""Device ceilings: the datasheet peaks of the GPU the results are for, the rates measured on
the machine at hand, and the roofline time of a workload.

A call that must do ``F`` FLOPs and move ``M`` bytes takes at least
``max(F / matmul rate, M / copy bandwidth)``. The rates are measured, not taken from a
datasheet (a large matmul in the benchmark's dtype; a large copy, bytes read plus written),
because a shared CPU or a GPU's clocks give less than the datasheet; the datasheet figures
below are for the fraction-of-peak columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# NVIDIA H200 SXM (the datasheet): the H100's arithmetic, with 141 GB of HBM3e at 4.8 TB/s.
H200_FP16_TFLOPS = 989.0  # dense fp16/bf16 tensor-core peak
H200_HBM_BYTES_PER_S = 4.8e12


@dataclass(frozen=True)
class DeviceRates:
    """What this device sustains: a large matmul and a large copy."""

    matmul_flops_per_s: float
    copy_bytes_per_s: float  # bytes read plus bytes written
    dtype: str
    how: str

    def roofline_s(self, flops: float, nbytes: float) -> float:
        """The least time a call of ``flops`` FLOPs that moves ``nbytes`` bytes can take."""
        return max(flops / self.matmul_flops_per_s, nbytes / self.copy_bytes_per_s)


def _median_seconds(fn, device: torch.device, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer  # deferred: only when rates are measured

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    fn()  # allocator, BLAS handles
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure_rates(device: torch.device | str, dtype: torch.dtype) -> DeviceRates:
    """Time a square matmul (4096 on the GPU, 1024 on the CPU) in ``dtype`` and a copy of
    1 GiB on the GPU (128 MiB on the CPU: several times any last-level cache)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    n = 4096 if gpu else 1024
    a = torch.randn(n, n, device=device).to(dtype)  # random, not zeros: zeros run faster
    b = torch.randn(n, n, device=device).to(dtype)
    matmul_s = _median_seconds(lambda: a @ b, device, 0.2)
    numel = (2**30 if gpu else 2**27) // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device, 0.2)
    name = str(dtype).removeprefix("torch.")
    return DeviceRates(
        matmul_flops_per_s=2 * n**3 / matmul_s,
        copy_bytes_per_s=2 * src.nbytes / copy_s,
        dtype=name,
        how=f"{n}x{n} {name} matmul; copy of {src.nbytes // 2**20} MiB "
        f"(torch.utils.benchmark, {torch.get_num_threads()} threads)",
    )

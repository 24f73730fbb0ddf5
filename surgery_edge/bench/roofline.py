"""Device ceilings: the datasheet peaks of the GPU the results are for, the rates measured on
the machine at hand, and the roofline time of a workload.

A call that must do ``F`` FLOPs and move ``M`` bytes takes at least
``max(F / matmul rate, M / copy bandwidth)``. The rates are measured, not taken from a
datasheet (a large matmul in the benchmark's dtype; a large copy, bytes read plus written),
because a shared CPU or a GPU's clocks give less than the datasheet; the datasheet figures
below are for the fraction-of-peak columns. Which datasheet is the GPU's own: ``device_peaks``
reads the device's name (PyTorch, nvidia-smi) and looks it up in ``DATASHEETS``; a GPU not in
the table gets its measured copy bandwidth and matmul rate instead, and says so.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the GPU run's report reads the table
    import torch


@dataclass(frozen=True)
class Datasheet:
    """One GPU model's datasheet peaks: HBM bandwidth and dense (no sparsity) fp16/bf16."""

    model: str
    pattern: str  # a regular expression on the device name, case-insensitive
    hbm_bytes_per_s: float
    dense_fp16_tflops: float


# NVIDIA's datasheets (the tensor-core figures there are with 2:4 sparsity: halved here). Each
# pattern matches the name PyTorch and nvidia-smi report ("NVIDIA H100 80GB HBM3" is the SXM
# part). The NVL parts (H100 NVL, H200 NVL) are left out: their per-GPU peaks were not sourced,
# so they are measured like any other GPU missing here.
DATASHEETS = (
    Datasheet("NVIDIA H100 SXM", r"\bH100\b(?!.*(PCIe|NVL)).*(HBM3|SXM)", 3.35e12, 989.0),
    Datasheet("NVIDIA H100 PCIe", r"\bH100\b.*PCIe", 2.0e12, 756.0),
    Datasheet("NVIDIA H200 SXM", r"\bH200\b(?!.*NVL)", 4.8e12, 989.0),
)


@dataclass(frozen=True)
class Peaks:
    """The peaks a fraction-of-peak figure divides by, and where they came from."""

    device_name: str
    hbm_bytes_per_s: float
    dense_fp16_tflops: float
    source: str  # "datasheet: ...", "measured: ..." or "given: ..."

    def describe(self, which: str) -> str:
        """``which`` ("bw" or "tflops") as a short phrase: value and source."""
        if which == "bw":
            return f"{self.hbm_bytes_per_s / 1e12:.2f} TB/s ({self.source})"
        return f"{self.dense_fp16_tflops:.0f} TFLOP/s ({self.source})"


def lookup_datasheet(*names: str | None) -> Datasheet | None:
    """The datasheet of the first of ``names`` that a pattern matches. A MIG slice (its name
    says "MIG") has a share of the GPU's peaks: it is left to be measured."""
    for name in names:
        if not name or "MIG" in name:
            continue
        for sheet in DATASHEETS:
            if re.search(sheet.pattern, name, re.IGNORECASE):
                return sheet
    return None


def smi_gpu_names() -> list[str]:
    """The GPU names nvidia-smi reports (none where it is missing or fails)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def peaks_for(
    name: str, rates: DeviceRates | None = None, other_names: Sequence[str] = ()
) -> Peaks | None:
    """The peaks of the GPU called ``name`` (PyTorch's name; ``other_names``: nvidia-smi's):
    its datasheet's, or, for a GPU not in ``DATASHEETS``, the measured ``rates`` (None
    without them)."""
    sheet = lookup_datasheet(name, *other_names)
    if sheet is not None:
        return Peaks(
            name,
            sheet.hbm_bytes_per_s,
            sheet.dense_fp16_tflops,
            f"datasheet: {sheet.model}, by the device name {name!r}",
        )
    if rates is None:
        return None
    return Peaks(
        name,
        rates.copy_bytes_per_s,
        rates.matmul_flops_per_s / 1e12,
        f"measured: {name!r} is not in the datasheet table, so the peaks are the rates measured "
        f"here ({rates.how}); a fraction of a measured rate reads higher than of a datasheet's",
    )


def device_peaks(
    device: torch.device | str, bw: float | None = None, tflops: float | None = None
) -> Peaks | None:
    """The peaks of a CUDA ``device`` (None on the CPU, which has no fraction-of-peak columns):
    ``bw`` and ``tflops`` where given (a command line's ``--peak-bw``, ``--peak-tflops``), the
    rest from the datasheet of the device's name (PyTorch's, else nvidia-smi's), else measured
    (a 1 GiB device-to-device copy and a 4096-square fp16 matmul: a few seconds)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    given = [f"{flag} {v:g}" for flag, v in (("--peak-bw", bw), ("--peak-tflops", tflops)) if v]
    if bw and tflops:
        return Peaks(name, bw, tflops, f"given: {', '.join(given)}")
    found = peaks_for(name, None, smi_gpu_names())
    found = found or peaks_for(name, measure_rates(device, torch.float16))
    if not given:
        return found
    return Peaks(
        name,
        bw or found.hbm_bytes_per_s,
        tflops or found.dense_fp16_tflops,
        f"given: {', '.join(given)} (otherwise {found.source})",
    )


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
    import torch
    from torch.utils.benchmark import Timer  # deferred: only when rates are measured

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    fn()  # allocator, BLAS handles
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure_rates(device: torch.device | str, dtype: torch.dtype) -> DeviceRates:
    """Time a square matmul (4096 on the GPU, 1024 on the CPU) in ``dtype`` and a copy of
    1 GiB on the GPU (128 MiB on the CPU: several times any last-level cache)."""
    import torch

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

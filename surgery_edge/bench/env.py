"""The environment a benchmark ran in: device, library versions, threads, load."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import torch

import surgery_edge

# distribution names per module: read from the installed metadata, so that recording Triton's
# version does not import Triton
DISTRIBUTIONS = {
    "triton": ("triton", "pytorch-triton", "pytorch-triton-rocm"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "open_clip": ("open_clip_torch",),
}


def _version(module: str) -> str | None:
    """The installed version of ``module``'s distribution, or None if it is not installed."""
    for dist in DISTRIBUTIONS[module]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_name() -> str:
    """The processor (or, where Python cannot tell, the machine architecture)."""
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device name and library versions, stored with every result."""
    device = torch.device(device)
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime"),
        "open_clip": _version("open_clip"),
        "surgery_edge": surgery_edge.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        # a shared CPU's timings depend on what else runs: the 1/5/15-minute load averages
        "cpu_load_avg": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
    }

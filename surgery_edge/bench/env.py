"""The environment a benchmark ran in: device, library versions, threads, load, caches, and
the provenance every record carries (commit, command, machine, load before and after, date)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import surgery_edge
from surgery_edge.bench.proc import load_average, package_version

# distribution names per module: read from the installed metadata, so that recording Triton's
# version does not import Triton
DISTRIBUTIONS = {
    "triton": ("triton", "pytorch-triton", "pytorch-triton-rocm"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "open_clip": ("open_clip_torch",),
}


def _version(module: str) -> str | None:
    """The installed version of ``module``'s distribution, or None if it is not installed."""
    return package_version(*DISTRIBUTIONS[module])


def cpu_name() -> str:
    """The processor (or, where Python cannot tell, the machine architecture)."""
    return platform.processor() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else :func:`cpu_name`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu_name()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}, {torch.get_num_threads()} torch threads)"


def other_load(own_threads: int) -> float | None:
    """The 1-minute load beyond the benchmark's own busy threads: what else runs here."""
    load = load_average()
    return None if load is None else max(0.0, load[0] - own_threads)


LOAD_WARNING = 0.25  # other work on more than a quarter of the cores: a loaded machine


def machine_is_loaded(own_threads: int) -> bool:
    """Whether other work holds more than a quarter of the cores (timings are then unreliable)."""
    others = other_load(own_threads)
    return others is not None and others > LOAD_WARNING * (os.cpu_count() or 1)


def cache_sizes(device: torch.device | str = "cpu") -> dict[str, int]:
    """The caches a workload's weights compete for, in bytes: the CPU's data and unified caches
    by level (``L1d``, ``L2``, ``L3``; per instance, from sysfs), or the GPU's ``L2``."""
    device = torch.device(device)
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
        return {"L2": int(size)} if size else {}
    sizes: dict[str, int] = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        sizes[f"L{level}{'d' if kind == 'Data' else ''}"] = value
    return sizes


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
        "cpu_load_avg": load_average(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "caches": cache_sizes(device),
        **(_gpu_details(device) if device.type == "cuda" else {}),
    }


def _gpu_details(device: torch.device) -> dict[str, Any]:
    """The driver (from nvidia-smi, when present) and the GPU's memory and multiprocessors."""
    props = torch.cuda.get_device_properties(device)
    driver = None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        driver = done.stdout.strip().splitlines()[0] if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return {
        "driver": driver,
        "gpu_memory_bytes": props.total_memory,
        "multiprocessors": props.multi_processor_count,
        "compute_capability": f"{props.major}.{props.minor}",
    }


# The load when the benchmark library was first imported: before any measurement of the process.
LOAD_AT_START = load_average()


def git_state(where: str | Path | None = None) -> dict[str, Any]:
    """The commit of the checkout holding ``where`` (default: this package's source) and whether
    its tracked files differ from it (``dirty``); ``commit`` None outside a git checkout (an
    installed wheel)."""
    folder = Path(where) if where is not None else Path(surgery_edge.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def provenance(command: str | None = None) -> dict[str, Any]:
    """What a results file records about how it was made: the commit (and whether the tree was
    dirty), the command, the machine (CPU model, cores), the load average when the benchmark
    started and now, and the date (UTC, ISO 8601)."""
    return {
        **git_state(),
        "command": command if command is not None else " ".join(["python", *sys.argv]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "system": f"{platform.system()} {platform.release()}",
        },
        "load_before": LOAD_AT_START,
        "load_after": load_average(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

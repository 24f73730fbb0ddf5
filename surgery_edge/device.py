"""Device selection, and torch's deterministic mode."""

from __future__ import annotations

import os

import torch

from surgery_edge.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = (
                "this torch is a CPU-only build: CUDA needs a CUDA build of torch (see "
                "pytorch.org for the command that fits your driver) on a machine with an NVIDIA GPU"
            )
        else:
            why = (
                f"torch (a CUDA {torch.version.cuda} build) finds no GPU here: CUDA needs an "
                "NVIDIA GPU and its driver (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
            )
        raise ConfigError(f"Device {name!r} was requested, but {why}; or use --device cpu.")
    return device


def make_deterministic() -> None:
    """Ask torch for deterministic kernels wherever it has them (every pipeline command does).

    Every random draw of the pipeline already comes from the run's seeds (the suite's
    ``suite.seed``; experts, merges and adapters from ``seed``, each through its own generator),
    so what is left is kernel choice: with this, a run repeated on the same machine type, torch
    build and thread count gives the same numbers. An operation without a deterministic kernel
    warns instead of failing (``warn_only``); cuBLAS needs its workspace setting before its first
    call, so it is set here unless the environment sets it.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False

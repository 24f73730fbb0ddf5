"""Switching a MultiTaskModel between its reference (PyTorch) and fused (Triton) paths.

``fuse_(model)`` turns the fused path on in place, ``fuse(model)`` returns a fused copy, and
``export_mode(model)`` turns it off for the duration of an export, because exporters trace the
reference path (plain ONNX-representable ops). The two paths read the same parameters, so a
state dict saved from one loads into the other.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from surgery_edge import kernels
from surgery_edge.errors import ConfigError
from surgery_edge.surgery.model import MultiTaskModel


def fuse_(model: MultiTaskModel) -> MultiTaskModel:
    """Use the Triton kernels for inference; raises when they cannot run on the model's device."""
    device = model.head_weight.device
    if not kernels.can_launch(device):
        raise ConfigError(
            f"The fused Triton path cannot run on {device}: it needs a CUDA GPU with Triton "
            "installed, or TRITON_INTERPRET=1 on the CPU (slow; for tests). Use the reference "
            "path (the default) instead."
        )
    model.fused = True
    return model.eval()


def fuse(model: MultiTaskModel) -> MultiTaskModel:
    """A fused copy of ``model``; the original is untouched."""
    return fuse_(copy.deepcopy(model))


@contextlib.contextmanager
def export_mode(model: MultiTaskModel) -> Iterator[MultiTaskModel]:
    """Temporarily run the reference path (what ONNX / torch.export should trace)."""
    saved = model.fused
    model.fused = False
    try:
        yield model
    finally:
        model.fused = saved

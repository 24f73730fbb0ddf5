"""Export: one multi-task engine (ONNX, TensorRT, AOTInductor) from a MultiTaskModel.

- :func:`export_onnx`: one ONNX graph, one set of backbone weights, every task's adapters and
  heads; ``routed`` (images + task ids) or ``all-tasks`` (every task for every image).
- :func:`build_engine`: a TensorRT engine from that ONNX (needs ``surgery-edge[trt]`` and a GPU).
- :func:`export_aoti`: an AOTInductor ``.pt2`` package.
- :func:`check_forward`: an engine's logits against PyTorch's.
- :func:`write_repository`: a Triton Inference Server model repository holding an engine (no
  torch needed); :func:`validate_repository` checks one against Triton's schema and the graph.

Exporting a run directory (picking its merge and adapters) is :mod:`surgery_edge.run.export`;
serve the results with :func:`surgery_edge.runtime.load`. Export depends on the runtime (every
exporter checks its output through it), never the reverse. Names resolve on first use, so
``import surgery_edge.export.tensorrt`` does not load the ONNX or AOTInductor exporters.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module (relative to this package) that defines it
_LAZY = {
    "export_aoti": "aoti",
    "engine_metadata": "metadata",
    "check_onnx": "onnx",
    "export_onnx": "onnx",
    "Parity": "parity",
    "check_forward": "parity",
    "build_engine": "tensorrt",
    "builder_input": "tensorrt",
    "profile_shapes": "tensorrt",
    "TritonOptions": "triton",
    "validate_repository": "triton",
    "write_repository": "triton",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

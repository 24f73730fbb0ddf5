"""Export: one multi-task engine (ONNX, TensorRT, AOTInductor) from a MultiTaskModel.

- :func:`export_onnx`: one ONNX graph, one set of backbone weights, every task's adapters and
  heads; ``routed`` (images + task ids) or ``all-tasks`` (every task for every image).
- :func:`build_engine`: a TensorRT engine from that ONNX (needs ``surgery-edge[trt]`` and a GPU).
- :func:`export_aoti`: an AOTInductor ``.pt2`` package.
- :func:`check_forward`: an engine's logits against PyTorch's.
- :func:`export_run`: all of it from a run directory (what ``surgery-edge export`` calls).

Serve the results with :func:`surgery_edge.runtime.load`.
"""

from surgery_edge.export.aoti import export_aoti
from surgery_edge.export.from_run import TrtOptions, export_run, load_run_model
from surgery_edge.export.metadata import META_KEY, engine_metadata
from surgery_edge.export.onnx import check_onnx, export_onnx, read_onnx_metadata
from surgery_edge.export.parity import Parity, check_forward
from surgery_edge.export.tensorrt import build_engine, builder_input, profile_shapes

__all__ = [
    "META_KEY",
    "Parity",
    "TrtOptions",
    "build_engine",
    "builder_input",
    "check_forward",
    "check_onnx",
    "engine_metadata",
    "export_aoti",
    "export_onnx",
    "export_run",
    "load_run_model",
    "profile_shapes",
    "read_onnx_metadata",
]

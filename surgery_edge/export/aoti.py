"""AOTInductor export: ``torch.export`` + ``aoti_compile_and_package`` into one ``.pt2``.

The package holds compiled code and weights; ``torch._inductor.aoti_load_package(path)`` loads it
without this project's model code. The engine metadata is stored inside the package
(``aot_inductor.metadata``, then rewritten with its integrity digest, which covers the whole
package: :func:`~surgery_edge.engine_format.seal_pt2`) and read back with
``AOTICompiledModel.get_metadata()``.
A package runs on the device kind it was compiled for (CPU here, CUDA on a GPU machine).
Compiling needs a C++ compiler and takes a while (about 30 s for the micro model on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from surgery_edge.engine_format import META_KEY, EngineMode, Precision, io_names, seal_pt2
from surgery_edge.errors import ExportError
from surgery_edge.export.metadata import engine_metadata
from surgery_edge.export.modules import engine_module, example_inputs
from surgery_edge.export.parity import smoke_check
from surgery_edge.progress import silence_cuda_home_notice
from surgery_edge.runtime import Predictor
from surgery_edge.runtime.backends import AotiBackend
from surgery_edge.surgery.model import MultiTaskModel


def export_aoti(
    model: MultiTaskModel,
    path: str | os.PathLike,
    mode: EngineMode | str = EngineMode.ROUTED,
    precision: Precision | str = Precision.FP32,
    metadata: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    check: bool = True,
) -> Path:
    """Compile ``model`` into an AOTInductor package (written atomically).

    Args:
        model: the multi-task model on its reference path.
        path: the ``.pt2`` file to write.
        mode: ``routed`` or ``all-tasks`` (the same inputs and outputs as the ONNX engine).
        precision: ``fp32``, or ``fp16``: half weights and compute; inputs and outputs stay
            float32.
        metadata: extra engine metadata merged into the generated one.
        device: compile for this device (default: the model's).
        check: load the package and compare it with PyTorch on a few random images.

    Returns:
        ``path``.
    """
    # parsed here, where a library user's strings come in; everything below takes them typed
    path, mode, precision = Path(path), EngineMode.parse(mode), Precision.parse(precision)
    if path.suffix != ".pt2":
        raise ExportError(f"An AOTInductor package must be a .pt2 file, got {path}.")
    device = torch.device(device) if device is not None else model.head_weight.device
    module = engine_module(model, mode, precision, device=device)
    args = example_inputs(model, mode, device=device)
    inputs, _ = io_names(mode, model.tasks)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(
            module, args, dynamic_shapes={name: {0: batch} for name in inputs}
        )
    except Exception as e:
        raise ExportError(
            f"torch.export could not trace the model ({type(e).__name__}: {e}). Make sure the "
            "model is on its reference (non-fused) path."
        ) from e
    meta = engine_metadata(
        model,
        mode,
        precision,
        {
            **(metadata or {}),
            "format": "pt2",
            "exporter": "torch._inductor.aoti_compile_and_package",
            "device": device.type,
            "torch_version": torch.__version__,
        },
    )
    configs = {"aot_inductor.metadata": {META_KEY: json.dumps(meta)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    # AOTInductor wants a name ending in .pt2: compile in a private folder, then move it in.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        silence_cuda_home_notice()  # the compiler imports cpp_extension, which logs it
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(tmp), inductor_configs=configs
            )
        except Exception as e:
            raise ExportError(
                f"AOTInductor could not compile {path.name} ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}). It needs a working "
                "C++ compiler (g++ or clang; and nvcc for CUDA); ONNX export does not."
            ) from e
        seal_pt2(tmp, meta)  # stores the metadata (with its digest) in the package
        if check:
            smoke_check(model, Predictor(AotiBackend(tmp, device=device.type)), precision)
        os.replace(tmp, path)
    return path

"""What a TensorRT build is planned from and the metadata sidecar it writes, checked without
TensorRT (not installed in CI) on small engines built in milliseconds
(``tests/engine_graphs.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from engine_graphs import build_engine

from surgery_edge.engine_format import Precision
from surgery_edge.errors import ConfigError
from surgery_edge.export import quantize as q
from surgery_edge.export import tensorrt


def test_the_sidecar_records_the_build_and_the_precision_it_computes_in(tmp_path):
    onnx_path = tmp_path / "routed.onnx"
    build_engine(onnx_path, "routed")  # fp32, 8 x 8 images
    half = tensorrt._plan(onnx_path, Precision.FP16, (1, 4, 16), 0.5, tmp_path / "cache")
    assert half.fp16 and not half.strongly_typed
    assert half.workspace == 1 << 29 and half.timing_cache == tmp_path / "cache"
    sidecar = tensorrt._sidecar(half, tmp_path / "routed.plan", "10.9")
    # an fp32 ONNX built with FP16 kernels allowed computes in fp16
    assert sidecar["precision"] == "fp16" and sidecar["format"] == "tensorrt"
    assert sidecar["onnx"] == "routed.onnx" and sidecar["tasks"] == ["digits", "shapes", "colours"]
    assert sidecar["tensorrt"] == {
        "version": "10.9",
        "fp16": True,
        "strongly_typed": False,
        "profile": {
            "images": [[1, 3, 8, 8], [4, 3, 8, 8], [16, 3, 8, 8]],
            "task_ids": [[1], [4], [16]],
        },
        "min_batch": 1,
        "opt_batch": 4,
        "max_batch": 16,
        "workspace_gb": 0.5,
    }
    full = tensorrt._plan(onnx_path, Precision.FP32, (1, 8, 32), 4.0, None)
    assert not full.fp16 and full.timing_cache is None
    assert tensorrt._sidecar(full, tmp_path / "full.plan", "10.9")["precision"] == "fp32"
    with pytest.raises(ConfigError, match="--workspace-gb must be a positive number"):
        tensorrt._plan(onnx_path, Precision.FP16, (1, 8, 32), float("nan"), None)


def test_a_quantised_onnx_is_built_strongly_typed_without_the_fp16_flag(tmp_path):
    source = tmp_path / "all-tasks.onnx"
    build_engine(source, "all-tasks")
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(3), 4)
    images, held_out = rng.normal(size=(2, 12, 3, 8, 8)).astype(np.float32)
    calibration = q.Calibration(images, ids, held_out, ids.copy(), {"split": "adapt"})
    recipe = q.default_recipe(Precision.INT8, "onnxruntime")
    int8 = q.quantize_engine(source, tmp_path / "int8.onnx", recipe, calibration, check=False)
    build = tensorrt._plan(int8, Precision.FP16, (1, 8, 32), 4.0, None)
    assert build.strongly_typed and not build.fp16
    sidecar = tensorrt._sidecar(build, tmp_path / "int8.plan", "10.9")
    assert sidecar["precision"] == "int8" and "task_ids" not in sidecar["tensorrt"]["profile"]
    assert sidecar["tensorrt"]["strongly_typed"] and not sidecar["tensorrt"]["fp16"]

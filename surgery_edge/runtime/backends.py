"""Engine backends: ONNX Runtime, TensorRT and AOTInductor packages behind one ``run`` call.

A backend loads one artefact, reads its metadata and runs a batch:
``run(images (B, 3, S, S) float32, task_ids (B,) int64 | None) -> [outputs in metadata order]``.
Routed engines take ``task_ids``; all-tasks engines ignore it. Every failure to open an artefact
raises ExportError naming the file.

Every backend verifies the engine against the digest its export recorded
(:func:`~surgery_edge.engine_format.verify_engine`) before it runs it, so whatever opens an engine
(``load``, ``predict``, ``eval-engine``, ``serve``, the benchmarks) refuses a changed or damaged
copy; a ``.pt2`` package is verified before its compiled code is loaded.

Each backend imports its engine library when it is opened (onnxruntime, tensorrt, torch for
``.pt2`` packages and TensorRT's device buffers): serving an ONNX engine needs numpy, pillow and
onnxruntime only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.engine_format import (
    EngineMetadata,
    EngineMode,
    check_device,
    check_graph_inputs,
    engine_kind,
    half_compute,
    metadata_from_props,
    read_metadata,
    require_file,
    verify_engine,
)
from surgery_edge.errors import ExportError
from surgery_edge.progress import silence_cuda_home_notice

DEFAULT_BATCH = 64
# ONNX Runtime's element type names -> numpy's (the names the engine format uses)
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class Backend:
    """One loaded engine. ``meta`` is its metadata; ``max_batch`` the most rows per ``run``."""

    kind = ""
    path: Path
    meta: EngineMetadata
    max_batch: int = DEFAULT_BATCH
    device: str = "cpu"

    def run(self, images: np.ndarray, task_ids: np.ndarray | None) -> list[np.ndarray]:
        raise NotImplementedError

    def feeds(self, images: np.ndarray, task_ids: np.ndarray | None) -> dict[str, np.ndarray]:
        feeds = {"images": np.ascontiguousarray(images, np.float32)}
        if self.meta.mode is EngineMode.ROUTED:
            feeds["task_ids"] = np.ascontiguousarray(task_ids, np.int64)
        return feeds


class OnnxBackend(Backend):
    """ONNX Runtime: CPUExecutionProvider, or CUDA (with IO binding) when available.

    Args:
        path: the ``.onnx`` file.
        device: ``auto`` (CUDA when onnxruntime has the CUDA provider), ``cpu``, ``cuda`` or
            ``cuda:N``.
        threads: ONNX Runtime's intra-op threads (default: its own choice, the physical cores).
    """

    kind = "onnx"

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None):
        import onnxruntime as ort  # deferred: the engine library of this backend only

        check_device(device)
        self.path = Path(path)
        require_file(self.path)
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if device.startswith("cuda") and not has_cuda:
            raise ExportError(
                "CUDA was requested but this onnxruntime has no CUDA provider: swap it for "
                "onnxruntime-gpu (`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`), "
                "or use --device cpu."
            )
        self.device_id = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
        providers: list = ["CPUExecutionProvider"]
        if has_cuda and device != "cpu":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device_id}))
        self._ort, self._providers, self._threads = ort, providers, threads
        try:
            # The metadata first, from an unoptimised CPU session: it decides how to optimise.
            probe = self._session(
                ["CPUExecutionProvider"], ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise ExportError(
                f"Engine {self.path} is not a readable ONNX model ({_first_line(e)}). It may be "
                "truncated or corrupt: re-export it with `surgery-edge export`."
            ) from None
        self.meta = metadata_from_props(probe.get_modelmeta().custom_metadata_map, self.path)
        verify_engine(self.path, self.meta, self.kind)
        graph_inputs = [
            (i.name, _ORT_TYPES.get(i.type, i.type), i.shape) for i in probe.get_inputs()
        ]
        check_graph_inputs(self.path, self.meta, graph_inputs)
        level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if half_compute(self.meta) and providers == ["CPUExecutionProvider"]:
            # onnxruntime's CPU fusions (e.g. Transpose+MatMul -> FusedMatMul) strand fp16 nodes
            # without a CPU kernel; 1.23 and 1.32 even crash (segfault) creating such a
            # session. Basic optimisations only: fp16 engines (and int8/fp8 ones quantised for
            # TensorRT, whose other layers are fp16) are meant for GPUs anyway.
            level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        del probe
        self.session = self._session(providers, level)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self._outputs = list(self.meta.outputs)  # the order the Predictor reads them in
        if {o.name for o in self.session.get_outputs()} != set(self._outputs):
            raise ExportError(f"Engine {self.path}: its outputs do not match its metadata.")

    def _session(self, providers: list, level):
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = level
        if self._threads is not None:
            options.intra_op_num_threads = int(self._threads)
        return self._ort.InferenceSession(str(self.path), options, providers=providers)

    def run(self, images: np.ndarray, task_ids: np.ndarray | None) -> list[np.ndarray]:
        feeds = self.feeds(images, task_ids)
        if self.device != "cuda":
            return self.session.run(self._outputs, feeds)
        binding = self.session.io_binding()  # outputs stay on the GPU until copied once
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def bind(
        self,
        images: np.ndarray,
        task_ids: np.ndarray | None,
        outputs: list[str] | None = None,
    ) -> Callable[[], Any]:
        """A callable that runs this batch again and again, for timing.

        On CUDA the inputs are copied to the GPU once and bound there with the outputs (I/O
        binding), so a call measures the engine, not host-device copies; it returns the
        binding. On the CPU a call returns the outputs. ``outputs``: these only (default all).
        """
        feeds, names = self.feeds(images, task_ids), outputs or self._outputs
        if self.device != "cuda":
            return lambda: self.session.run(names, feeds)
        ort, binding = self._ort, self.session.io_binding()
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", self.device_id)
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, "cuda", self.device_id)

        def run() -> Any:
            self.session.run_with_iobinding(binding)
            return binding

        return run


class AotiBackend(Backend):
    """An AOTInductor ``.pt2`` package, loaded with ``torch._inductor.aoti_load_package``."""

    kind = "pt2"

    def __init__(self, path: str | os.PathLike, device: str = "auto"):
        import torch  # deferred: a .pt2 package is run by torch

        self.path = Path(path)
        require_file(self.path)
        # read and verified from the archive first: loading a package runs its compiled code
        self.meta = read_metadata(self.path, self.kind)
        verify_engine(self.path, self.meta, self.kind)
        self.device = self.meta.get("device", "cpu")
        if device != "auto" and device.split(":")[0] != self.device.split(":")[0]:
            raise ExportError(
                f"Engine {self.path} was compiled for {self.device!r}; it cannot run on "
                f"{device!r}. Re-export it on that device."
            )
        silence_cuda_home_notice()  # loading a package imports cpp_extension, which logs it
        try:
            self.model = torch._inductor.aoti_load_package(str(self.path))
        except Exception as e:
            raise ExportError(
                f"Engine {self.path} is not a loadable AOTInductor package ({_first_line(e)}). "
                "It may be corrupt, compiled for another device, or made by another torch "
                "version: re-export it with `surgery-edge export --aoti`."
            ) from None
        self._torch = torch

    def run(self, images: np.ndarray, task_ids: np.ndarray | None) -> list[np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(v).to(self.device) for v in self.feeds(images, task_ids).values()]
        with torch.inference_mode():
            out = self.model(*args)
        return [o.float().cpu().numpy() for o in out]


class TensorRTBackend(Backend):
    """A serialized TensorRT engine plus its metadata sidecar ``<engine>.json``."""

    kind = "tensorrt"

    def __init__(self, path: str | os.PathLike, device: str = "auto"):
        self.path = Path(path)
        require_file(self.path)
        self.meta = read_metadata(self.path, self.kind)
        verify_engine(self.path, self.meta, self.kind)
        if device == "cpu":
            raise ExportError(f"TensorRT engine {self.path} runs on an NVIDIA GPU only, not cpu.")
        trt = import_tensorrt()
        import torch  # deferred: torch holds the engine's CUDA buffers and stream

        if not torch.cuda.is_available():
            raise ExportError(f"TensorRT engine {self.path} needs a CUDA GPU; none is available.")
        self._trt, self._torch, self.device = trt, torch, "cuda"
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        except Exception as e:
            raise ExportError(f"Engine {self.path} is not a TensorRT engine ({e}).") from None
        if self.engine is None:
            raise ExportError(
                f"TensorRT could not deserialize {self.path}: it is corrupt, or was built by "
                "another TensorRT version or for another GPU. Rebuild it with "
                "`surgery-edge export --trt` on this machine."
            )
        self.context = self.engine.create_execution_context()
        profile = self.meta.get("tensorrt", {})
        self.min_batch = int(profile.get("min_batch", 1))
        self.max_batch = int(profile.get("max_batch", DEFAULT_BATCH))
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._outputs = [
            n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        ]

    def _torch_dtype(self, name: str):
        trt, torch = self._trt, self._torch
        return {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.INT64: torch.int64,
            trt.DataType.INT32: torch.int32,
        }[self.engine.get_tensor_dtype(name)]

    def run(self, images: np.ndarray, task_ids: np.ndarray | None) -> list[np.ndarray]:
        torch = self._torch
        n = len(images)
        feeds = self.feeds(images, task_ids)
        if n < self.min_batch:  # below the profile's range: pad with copies of the last row
            feeds = {
                k: np.concatenate([v, np.repeat(v[-1:], self.min_batch - n, 0)])
                for k, v in feeds.items()
            }
        keep = []  # device buffers must outlive the launch
        for name, value in feeds.items():
            t = torch.from_numpy(value).to("cuda", self._torch_dtype(name)).contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outputs = []
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outputs.append(t)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError(f"TensorRT failed to run {self.path} on a batch of {n}.")
        stream.synchronize()
        by_name = dict(zip(self._outputs, outputs))
        return [by_name[name][:n].float().cpu().numpy() for name in self.meta.outputs]


TRT_INSTALL = (
    "Install it with `pip install 'surgery-edge[trt]'` (the `tensorrt` package, version 10 or "
    "newer) on a machine with an NVIDIA GPU and CUDA; or serve the ONNX engine with ONNX Runtime."
)


def import_tensorrt():
    """``import tensorrt`` (version 10+), or ExportError saying how to install it."""
    try:
        import tensorrt as trt  # deferred: optional, GPU machines only (`surgery-edge[trt]`)
    except (ImportError, OSError) as e:  # OSError: an install whose CUDA libraries are missing
        raise ExportError(f"TensorRT is not available ({e}). {TRT_INSTALL}") from None
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise ExportError(f"TensorRT {trt.__version__} is too old; {TRT_INSTALL}")
    return trt


def open_backend(path: str | os.PathLike, device: str = "auto") -> Backend:
    """Open the engine at ``path`` with the backend its kind needs."""
    check_device(device)
    kind = engine_kind(path)
    cls = {"onnx": OnnxBackend, "pt2": AotiBackend, "tensorrt": TensorRTBackend}[kind]
    return cls(path, device=device)

"""TensorRT: build a serialized engine from the exported ONNX (TensorRT 10 Python API).

The pure parts run anywhere and are tested without TensorRT: :func:`profile_shapes` turns the
batch flags into an optimization profile (with clear errors), and :func:`builder_input` checks
the ONNX handed to the builder (``onnx.checker`` full check, strict shape inference, engine
metadata, dynamic batch), and :func:`precision_support` says what a GPU cannot build.
:func:`build_engine` then needs ``tensorrt`` and an NVIDIA GPU: it parses the ONNX (explicit
batch: the only mode in TensorRT 10), sets the workspace pool, FP16, the profile and the timing
cache, builds, and writes the engine and its metadata sidecar ``<engine>.json`` atomically.
An int8 or fp8 ONNX (ModelOpt's QDQ graph, :mod:`surgery_edge.export.quantize`) is built as a
strongly typed network: the Q/DQ scales and the graph's own types decide each layer's
precision, and no precision flag is set. ``tensorrt`` is imported only there; nothing is ever
written when it is missing.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery_edge.engine_format import (
    EngineMetadata,
    EngineMode,
    Precision,
    effective_precision,
    metadata_from_props,
    sidecar_path,
    validate_metadata,
    verify_engine,
    write_sidecar,
)
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.export.onnx import check_onnx
from surgery_edge.io import atomic_path
from surgery_edge.runtime.backends import import_tensorrt

Shape = tuple[int, ...]
# The least CUDA compute capability with the tensor-core kernels of each precision: int8
# (Turing and newer; TensorRT 10 supports no older GPU) and fp8 (Ada and Hopper and newer).
MIN_CAPABILITY = {
    Precision.FP32: (7, 5),
    Precision.FP16: (7, 5),
    Precision.INT8: (7, 5),
    Precision.FP8: (8, 9),
}


def profile_shapes(
    image_size: int,
    mode: EngineMode,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The optimization profile: ``{input name: (min shape, opt shape, max shape)}``.

    Args:
        image_size: the engine's square input size.
        mode: ``routed`` (inputs ``images`` and ``task_ids``) or ``all-tasks`` (``images``).
        min_batch, opt_batch, max_batch: batch sizes, ``1 <= min <= opt <= max``; TensorRT
            tunes its kernels for ``opt``.
    """
    flags = (("--min-batch", min_batch), ("--opt-batch", opt_batch), ("--max-batch", max_batch))
    for name, value in flags:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}.")
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}.")
    if not min_batch <= opt_batch <= max_batch:
        raise ConfigError(
            f"Batch sizes must satisfy min <= opt <= max, got --min-batch {min_batch}, "
            f"--opt-batch {opt_batch}, --max-batch {max_batch}."
        )
    s = int(image_size)
    shapes = {"images": tuple((b, 3, s, s) for b in (min_batch, opt_batch, max_batch))}
    if mode is EngineMode.ROUTED:
        shapes["task_ids"] = tuple((b,) for b in (min_batch, opt_batch, max_batch))
    return shapes


def builder_input(onnx_path: str | os.PathLike) -> EngineMetadata:
    """Check the ONNX that the TensorRT builder will parse; return its engine metadata.

    It must pass ``onnx.checker`` (full check) and strict shape inference, carry surgery-edge
    metadata that its integrity digest still matches, and have a dynamic batch dimension on
    every input.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist; export it first.")
    proto = check_onnx(path)
    meta = metadata_from_props({p.key: p.value for p in proto.metadata_props}, path)
    verify_engine(path, meta, "onnx")  # a changed ONNX is not laundered into a new engine
    names = [i.name for i in proto.graph.input]
    if tuple(names) != meta.inputs:
        raise ExportError(f"{path} has inputs {names}, but its metadata says {list(meta.inputs)}.")
    for graph_input in proto.graph.input:
        batch = graph_input.type.tensor_type.shape.dim[0]
        if not batch.dim_param:
            raise ExportError(
                f"Input {graph_input.name!r} of {path} has a fixed batch size "
                f"({batch.dim_value}); re-export it (surgery-edge exports a dynamic batch)."
            )
    return meta


def precision_support(
    precision: Precision, capability: tuple[int, int] | None, gpu: str = "the GPU"
) -> str | None:
    """Why a GPU of compute ``capability`` cannot build a ``precision`` engine (None: it can).

    ``capability`` is None when there is no CUDA GPU.
    """
    if capability is None:
        return "TensorRT builds and runs engines on an NVIDIA GPU, and no CUDA GPU is available."
    need = MIN_CAPABILITY[precision]
    if tuple(capability) < need:
        have = ".".join(map(str, capability))
        return (
            f"{gpu} (compute capability {have}) cannot build {precision} engines: they need "
            f"compute capability {need[0]}.{need[1]} or newer"
            + (" (Ada, Hopper, Blackwell)" if precision is Precision.FP8 else "")
            + ". Use another precision (int8 or fp16), or build on such a GPU."
        )
    return None


def check_precision_support(trt, precision: Precision) -> None:
    """ExportError when this machine's GPU cannot build a ``precision`` engine with ``trt``."""
    import torch  # deferred: the GPU query (export already depends on torch)

    capability = gpu = None
    if torch.cuda.is_available():
        capability, gpu = torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    reason = precision_support(precision, capability, gpu or "the GPU")
    if reason is not None:
        raise ExportError(f"{reason} (TensorRT {trt.__version__}.)")


def check_workspace(workspace_gb: float) -> int:
    """``--workspace-gb`` -> bytes (must be a positive, finite number)."""
    if not (math.isfinite(workspace_gb) and workspace_gb > 0):
        raise ConfigError(f"--workspace-gb must be a positive number, got {workspace_gb}.")
    return int(workspace_gb * (1 << 30))


def network_flags(trt, precision: Precision) -> int:
    """``create_network`` flags: strongly typed for an int8 / fp8 (QDQ) graph, else none."""
    if precision.quantized:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    precision: Precision = Precision.FP16,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_gb: float = 4.0,
    timing_cache: str | os.PathLike | None = None,
) -> Path:
    """Build a TensorRT engine from a surgery-edge ONNX engine.

    Args:
        onnx_path: the ONNX file (from :func:`~surgery_edge.export.onnx.export_onnx`).
        engine_path: the serialized engine to write; its metadata goes to ``<engine>.json``.
        precision: ``fp16`` allows FP16 kernels (``BuilderFlag.FP16``; TensorRT keeps FP32 where
            it is faster or needed), ``fp32`` does not. An int8 / fp8 ONNX is built strongly
            typed whatever it is: its Q/DQ scales decide each layer's precision.
        min_batch, opt_batch, max_batch: the optimization profile's batch sizes.
        workspace_gb: the builder's workspace memory pool limit.
        timing_cache: a timing-cache file, read if it exists and written back after the build
            (reuses kernel timings across builds on the same GPU and TensorRT version).

    Returns:
        ``engine_path``.
    """
    engine_path = Path(engine_path)
    batches = (min_batch, opt_batch, max_batch)
    build = _plan(onnx_path, precision, batches, workspace_gb, timing_cache)
    trt = import_tensorrt()
    check_precision_support(trt, build.meta.precision)
    # the logger, builder and parser live until the build: the network points into them
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, parser = _parse(trt, builder, logger, build)
    config, cache = _builder_config(trt, builder, build)
    sidecar = _sidecar(build, engine_path, trt.__version__)  # before the build, not after
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT failed to build an engine from {onnx_path} (see its log above); try a "
            "larger --workspace-gb or a smaller --max-batch."
        )
    # The sidecar first: an engine file without its metadata is never published, and the
    # sidecar records the engine's hash, so it is never read with another (or a partial) one.
    blob = bytes(serialized)
    write_sidecar(engine_path, sidecar, hashlib.sha256(blob).hexdigest())
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(blob)
    if cache is not None:
        with atomic_path(build.timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


@dataclass(frozen=True)
class _Build:
    """One TensorRT build, checked before TensorRT is imported: the ONNX and its metadata,
    the optimization profile and the builder's settings."""

    onnx_path: Path
    meta: EngineMetadata  # the ONNX's, checked by builder_input
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # the profile (profile_shapes)
    batches: tuple[int, int, int]  # min, opt, max
    workspace_gb: float
    workspace: int  # the same in bytes
    fp16: bool  # FP16 kernels allowed (never for a strongly typed QDQ graph)
    timing_cache: Path | None  # read if it exists, written back after the build

    @property
    def strongly_typed(self) -> bool:
        """An int8 / fp8 (QDQ) graph: its Q/DQ scales decide each layer's precision."""
        return self.meta.precision.quantized


def _plan(
    onnx_path: str | os.PathLike,
    precision: Precision,
    batches: tuple[int, int, int],
    workspace_gb: float,
    timing_cache: str | os.PathLike | None,
) -> _Build:
    """Check the ONNX, the batch sizes and the workspace (every error before TensorRT is
    needed); ``precision`` fp16 allows FP16 kernels unless the graph is quantised."""
    meta = builder_input(onnx_path)
    shapes = profile_shapes(meta.preprocessing.image_size, meta.mode, *batches)
    workspace = check_workspace(workspace_gb)
    fp16 = precision is Precision.FP16 and not meta.precision.quantized
    cache = None if timing_cache is None else Path(timing_cache)
    return _Build(Path(onnx_path), meta, shapes, batches, workspace_gb, workspace, fp16, cache)


def _parse(trt, builder, logger, build: _Build) -> tuple[Any, Any]:
    """The network parsed from the ONNX, and its parser (which owns the weights the network
    points to)."""
    # explicit batch is the only mode in TensorRT 10; a QDQ graph is built strongly typed
    network = builder.create_network(network_flags(trt, build.meta.precision))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(build.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {build.onnx_path}: {errors}")
    return network, parser


def _builder_config(trt, builder, build: _Build) -> tuple[Any, Any]:
    """The builder config (workspace pool, FP16, the profile) and its timing cache, read from
    the build's timing-cache file if it exists (None: no timing cache)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, build.workspace)
    if build.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in build.shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = None
    if build.timing_cache is not None:
        blob = build.timing_cache.read_bytes() if build.timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config, cache


def _sidecar(build: _Build, engine_path: Path, version: str) -> dict[str, Any]:
    """The engine's metadata sidecar (less the engine's hash), validated: the ONNX's metadata,
    the build settings of TensorRT ``version``, and the precision the engine computes in."""
    min_batch, opt_batch, max_batch = build.batches
    sidecar = {
        **build.meta.to_dict(),
        "format": "tensorrt",
        "onnx": build.onnx_path.name,
        "tensorrt": {
            "version": version,
            "fp16": build.fp16,
            "strongly_typed": build.strongly_typed,
            "profile": {k: [list(s) for s in v] for k, v in build.shapes.items()},
            "min_batch": min_batch,
            "opt_batch": opt_batch,
            "max_batch": max_batch,
            "workspace_gb": build.workspace_gb,
        },
    }
    where = sidecar_path(engine_path)
    # the precision it computes in: an fp32 ONNX built with FP16 kernels makes an fp16 engine
    sidecar["precision"] = effective_precision(validate_metadata(sidecar, where)).value
    validate_metadata(sidecar, where)
    return sidecar

"""INT8 and FP8 engines: post-training quantisation of the fp32 ONNX engine.

Three quantisers, picked per target by measurement (``benchmarks/results/cpu/quantize-*.md``):

- ``modelopt``: NVIDIA ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``). It inserts
  QuantizeLinear/DequantizeLinear pairs around the layers TensorRT runs in int8 or fp8, with
  activation ranges calibrated on real images (entropy, the default) through ONNX
  Runtime's CPU provider. This is the TensorRT path: the strongly typed builder reads the
  scales from the graph. The layers it leaves alone run in ``high_precision`` (fp16 for
  TensorRT, fp32 for ONNX Runtime on the CPU).
- ``ort-dynamic``: ``onnxruntime.quantization.quantize_dynamic``: int8 weights, activations
  quantised per call (MatMulInteger / ConvInteger). No calibration is needed; ONNX Runtime's CPU
  provider runs it fastest, so it is the ``onnxruntime`` target's int8 path.
- ``ort-static``: ``onnxruntime.quantization.quantize_static`` (QDQ, calibrated). Measured for
  comparison (ONNX Runtime 1.32 refuses the routed graph: no quantisation parameters for its
  ``images`` input; the benchmark records the message).

Every recipe then stores the per-task tables (each task's adapters and head, gathered by task
id; their names are recorded at export under ``task_tables``) weight-only: int8 with one scale
per row, dequantised before the gather. A quantiser never sees them as layers, because their
products take the gathered tensor, not a constant, as the weight.

Calibration images are every task's unlabelled adaptation images, routed with their own task
ids, preprocessed by the runtime exactly as a request is. Other adaptation images, never
calibrated on, check the quantised engine against the fp32 engine before the file is published
(:func:`gate`); the check and the recipe (quantiser, version, which node groups stay in higher
precision) are recorded in the engine metadata under ``quantization``. The calibration data and
the check are :mod:`surgery_edge.export.gate`; the graph's node groups and per-task tables
:mod:`surgery_edge.export.quant_graph`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import onnx

from surgery_edge.engine_format import (
    META_KEY,
    Choice,
    EngineMetadata,
    EngineMode,
    Precision,
    read_onnx_metadata,
    validate_metadata,
    verify_engine,
)
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.export.gate import Calibration, GateError, agreement, check_engine
from surgery_edge.export.onnx import check_onnx, export_onnx, write_engine
from surgery_edge.export.quant_graph import GROUPS, TABLE_STORAGE, node_groups, store_tables
from surgery_edge.io import atomic_path
from surgery_edge.runtime.backends import OnnxBackend
from surgery_edge.runtime.predictor import Predictor
from surgery_edge.surgery.model import MultiTaskModel

QUANT_INSTALL = (
    "Install the quantisation extra: `pip install 'surgery-edge[quant]'` (nvidia-modelopt and "
    "the ONNX packages its quantiser needs, without a second onnxruntime)."
)


class Quantizer(Choice):
    """Which tool quantises the engine."""

    MODELOPT = "modelopt"
    ORT_DYNAMIC = "ort-dynamic"
    ORT_STATIC = "ort-static"


class Target(Choice):
    """What runs the quantised engine: it decides the quantiser and the high precision."""

    ONNXRUNTIME = "onnxruntime"  # ONNX Runtime, CPU provider (or CUDA)
    TENSORRT = "tensorrt"  # a TensorRT engine built from the QDQ ONNX


@dataclass(frozen=True)
class QuantRecipe:
    """How an engine is quantised; recorded in its metadata.

    Attributes:
        precision: ``int8`` or ``fp8``.
        quantizer: the tool.
        keep: node groups (:data:`GROUPS`) the quantiser must leave in higher precision.
        tables: storage of the per-task adapter and head tables: ``int8`` (weight-only, a scale
            per row), ``fp16`` or ``fp32``.
        high_precision: what the unquantised layers compute in (ModelOpt only): ``fp32`` for
            ONNX Runtime on the CPU, ``fp16`` for TensorRT.
        calibration_method: ``entropy`` or ``max`` (ModelOpt), ``minmax`` / ``entropy`` /
            ``percentile`` (ort-static); ``none`` for ort-dynamic.
        per_channel: one weight scale per output channel (ort-*; ModelOpt always is).
    """

    precision: Precision
    quantizer: Quantizer
    keep: tuple[str, ...] = ()
    tables: str = "int8"
    high_precision: str = "fp32"
    calibration_method: str = "entropy"
    per_channel: bool = False

    def __post_init__(self):
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        object.__setattr__(self, "quantizer", Quantizer.parse(self.quantizer))
        object.__setattr__(self, "keep", tuple(self.keep))
        if not self.precision.quantized:
            raise ConfigError(
                f"Precision {self.precision} is not quantised; a recipe is for int8 or fp8."
            )
        unknown = sorted(set(self.keep) - set(GROUPS))
        if unknown:
            raise ConfigError(f"Unknown node groups {unknown}; use some of: {', '.join(GROUPS)}.")
        if self.tables not in TABLE_STORAGE:
            raise ConfigError(f"tables must be one of {list(TABLE_STORAGE)}, got {self.tables!r}.")
        if self.high_precision not in ("fp32", "fp16"):
            raise ConfigError(f"high_precision must be fp32 or fp16, got {self.high_precision!r}.")
        if self.precision is Precision.FP8 and self.quantizer is not Quantizer.MODELOPT:
            raise ConfigError(
                f"FP8 engines are made by ModelOpt only; {self.quantizer} quantises to int8. Use "
                "--quantizer modelopt (or leave it on auto)."
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["precision"], d["quantizer"], d["keep"] = (
            str(self.precision),
            str(self.quantizer),
            list(self.keep),
        )
        return d


def default_recipe(precision: Precision, target: Target | str) -> QuantRecipe:
    """The measured choice for ``precision`` on ``target``.

    Measured on the demo's engines (``benchmarks/results/cpu/quantize-tiny-vit-32.md``):

    - ONNX Runtime int8: ``ort-dynamic`` with int8 tables. It is the fastest on the CPU
      provider at batch 1 and 8 and keeps the top-1 answers of the fp32 engine as well as
      ModelOpt's calibrated QDQ graph, which ONNX Runtime runs through its (slower) QDQ
      kernels. (Keeping the patch embedding in fp32 was faster still at batch 8 on the
      SurgeryV2 engine, head to head, at 0.29x instead of 0.28x the fp32 file: measured on one
      engine only, not yet the default.)
    - TensorRT int8 / fp8, and fp8 anywhere: ``modelopt``. fp8 keeps the attention products,
      the patch embedding and the adapters in higher precision (quantising them costs the
      most agreement with the fp32 engine) and calibrates with entropy, which kept the most
      agreement on the SurgeryV2 engine (99.6% against 98.4% with max).
    """
    target = Target.parse(target)
    if precision is Precision.INT8 and target is Target.ONNXRUNTIME:
        return QuantRecipe(precision, Quantizer.ORT_DYNAMIC, calibration_method="none")
    high = "fp16" if target is Target.TENSORRT else "fp32"
    if precision is Precision.INT8:
        return QuantRecipe(precision, Quantizer.MODELOPT, high_precision=high)
    return QuantRecipe(
        precision,
        Quantizer.MODELOPT,
        keep=("patch_embedding", "attention", "adapters"),
        high_precision=high,
    )


# --- the quantisers --------------------------------------------------------------------------


@contextlib.contextmanager
def _captured() -> Iterator[io.StringIO]:
    """Collect what a quantiser prints (progress bars, histograms) instead of showing it."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


def _tail(text: str, lines: int = 6) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-600:]


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _run_modelopt(src: Path, out: Path, recipe: QuantRecipe, exclude: list[str], calib, mode):
    try:
        from modelopt.onnx.quantization import quantize  # deferred: optional `quant` extra
    except ImportError as e:
        raise ExportError(f"NVIDIA ModelOpt is not available ({e}). {QUANT_INSTALL}") from None
    feeds = calib.feeds(mode)
    batch = min(16, len(calib.images))
    shapes = ",".join(
        f"{k}:{'x'.join(str(d) for d in (batch, *v.shape[1:]))}" for k, v in feeds.items()
    )
    quantize(
        str(src),
        quantize_mode=str(recipe.precision),
        calibration_data=feeds,
        calibration_method=recipe.calibration_method,
        calibration_shapes=shapes,
        calibration_eps=["cpu"],
        nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude],
        high_precision_dtype=recipe.high_precision,
        dq_only=True,  # weights stored in int8/fp8 beside their DequantizeLinear
        output_path=str(out),
        log_level="ERROR",
    )
    return "nvidia-modelopt", _version("nvidia-modelopt")


def _run_ort(src: Path, out: Path, recipe: QuantRecipe, exclude: list[str], calib, mode):
    from onnxruntime import quantization as q  # deferred: only quantisation needs it

    ops = ["MatMul", "Gemm", "Conv"]
    if recipe.quantizer is Quantizer.ORT_DYNAMIC:
        q.quantize_dynamic(
            str(src),
            str(out),
            op_types_to_quantize=ops,
            per_channel=recipe.per_channel,
            weight_type=q.QuantType.QInt8,
            nodes_to_exclude=exclude,
        )
        return "onnxruntime.quantization.quantize_dynamic", _version("onnxruntime")

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = calib.batches(mode, 16)

        def get_next(self):
            return next(self.batches, None)

    methods = {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }
    if recipe.calibration_method not in methods:
        raise ConfigError(
            f"ort-static calibrates with {sorted(methods)}, not {recipe.calibration_method!r}."
        )
    q.quantize_static(
        str(src),
        str(out),
        Reader(),
        quant_format=q.QuantFormat.QDQ,
        op_types_to_quantize=ops,
        per_channel=recipe.per_channel,
        activation_type=q.QuantType.QInt8,
        weight_type=q.QuantType.QInt8,
        nodes_to_exclude=exclude,
        calibrate_method=methods[recipe.calibration_method],
    )
    return "onnxruntime.quantization.quantize_static", _version("onnxruntime")


# --- the entry point -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One quantisation: the fp32 engine, how it is quantised, and the images it is
    calibrated on and checked with."""

    source: Path
    meta: EngineMetadata  # the source's, verified against its digest
    recipe: QuantRecipe
    calibration: Calibration
    target: Target
    groups: dict[str, list[str]]  # each of GROUPS -> the names of its nodes in the source
    keep: frozenset[str]  # the groups left in higher precision
    tables: tuple[str, ...]  # the per-task tables (adapters, then heads), stored per recipe


def quantize_engine(
    source: str | Path,
    out: str | Path,
    recipe: QuantRecipe,
    calibration: Calibration,
    target: Target | str = Target.ONNXRUNTIME,
    check: bool = True,
) -> Path:
    """Quantise the fp32 ONNX engine ``source`` into ``out`` (written atomically).

    Args:
        source: an fp32 engine from :func:`~surgery_edge.export.onnx.export_onnx`.
        out: the ``.onnx`` file to write.
        recipe: how (see :func:`default_recipe`).
        calibration: the adaptation images to calibrate on and the held-out ones to check with.
        target: recorded in the metadata (what the recipe was chosen for).
        check: refuse an engine that fails :func:`gate` (a benchmark that measures every
            recipe, or one on random weights whose answers are near ties, records the
            agreement without refusing: ``check=False``).

    Returns:
        ``out``. Its metadata's ``quantization`` holds the recipe, the quantiser and version,
        the node groups kept in higher precision with their node counts, the calibration data,
        the table storage and the agreement with the fp32 engine on the held-out images.

    Raises:
        ExportError: the source is not an fp32 engine, the quantiser is missing or fails, or
            the result fails :func:`gate` on the held-out images.
    """
    source, out, target = Path(source), Path(out), Target.parse(target)
    job = _job(source, recipe, calibration, target)
    t0 = time.perf_counter()
    result, tool = _quantize(job)
    stored, saved = store_tables(result, list(job.tables), recipe.tables)
    storage = {"storage": recipe.tables, "stored": stored, "bytes_saved": saved}
    record = _record(job, result, tool, storage, t0)
    _publish(job, result, record, out, check)
    return out


def _job(source: Path, recipe: QuantRecipe, calibration: Calibration, target: Target) -> _Job:
    """Read and verify the fp32 engine ``source``; find its node groups, which of them the
    quantiser must leave alone, and its per-task tables."""
    meta = read_onnx_metadata(source)
    verify_engine(source, meta, "onnx")
    if meta.precision is not Precision.FP32:
        raise ExportError(
            f"{source} is a {meta.precision} engine; quantise the fp32 engine (export it with "
            "--precision fp32)."
        )
    tables = meta.get("task_tables") or {}
    names = tuple(n for kind in ("adapters", "heads") for n in tables.get(kind, []))
    groups = node_groups(onnx.load(str(source)), tables)
    keep = set(recipe.keep)
    if recipe.quantizer is not Quantizer.MODELOPT:
        # ONNX Runtime's integer MatMul takes a 2-D constant weight: the products with the
        # per-task tables (V1's batched (T, d, r) final adapters) stay float; the tables
        # themselves are stored int8 below
        keep |= {"adapters", "heads"}
    return _Job(source, meta, recipe, calibration, target, groups, frozenset(keep), names)


def _quantize(job: _Job) -> tuple[onnx.ModelProto, tuple[str, str]]:
    """Run the recipe's quantiser on a copy of the source, its output captured; returns the
    quantised graph and the tool with its version."""
    recipe = job.recipe
    exclude = [n for g in GROUPS if g in job.keep for n in job.groups[g]]
    with tempfile.TemporaryDirectory(prefix="surgery-edge-quant-") as tmp:
        src, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "quantized.onnx"
        shutil.copyfile(job.source, src)
        run = _run_modelopt if recipe.quantizer is Quantizer.MODELOPT else _run_ort
        with _captured() as log:
            try:
                tool = run(src, quantized, recipe, exclude, job.calibration, job.meta.mode)
            except (ExportError, ConfigError):
                raise
            except Exception as e:  # the quantisers raise assertion, value and ORT errors
                raise ExportError(
                    f"{recipe.quantizer} could not quantise {job.source} to {recipe.precision} "
                    f"({type(e).__name__}: {str(e)[:300]}; log: {_tail(log.getvalue())})."
                ) from None
        return onnx.load(str(quantized)), tool


def _record(
    job: _Job,
    result: onnx.ModelProto,
    tool: tuple[str, str],
    tables: dict[str, Any],
    t0: float,
) -> dict[str, Any]:
    """The metadata's ``quantization`` record (the check is added once it has run)."""
    calibration = job.calibration
    return {
        "recipe": job.recipe.to_dict(),
        "target": str(job.target),
        "tool": tool[0],
        "tool_version": tool[1],
        "kept_in_higher_precision": {g: len(job.groups[g]) for g in GROUPS if g in job.keep},
        "node_groups": {g: len(v) for g, v in job.groups.items()},
        "quantized_nodes": _quantized_nodes(result),
        "tables": tables,
        "calibration": {
            **calibration.source,
            "images": int(len(calibration.images)),
            "check_images": int(len(calibration.check_images)),
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _publish(
    job: _Job, result: onnx.ModelProto, record: dict[str, Any], out: Path, check: bool
) -> None:
    """Write the quantised engine to ``out`` only once it runs and (``check``) passes
    :func:`gate` against the source; its metadata then records the check too."""
    recipe = job.recipe
    new_meta = {
        **job.meta.to_dict(),
        "precision": str(recipe.precision),
        "quantization": record,
        "opset": _opset(result),
    }
    _set_metadata(result, new_meta)
    with atomic_path(out) as tmp:
        write_engine(result, tmp)
        check_onnx(tmp)
        try:
            verdict = _verify(tmp, job.source, job.calibration, recipe.precision, check)
        except GateError as e:
            e.record = record
            raise
        except ExportError:
            raise
        except Exception as e:  # onnxruntime cannot run the quantised graph
            raise ExportError(
                f"ONNX Runtime cannot run the {recipe.precision} engine that {recipe.quantizer} "
                f"made from {job.source} ({str(e).splitlines()[0][:300]}); it was not written. "
                "Try another --quantizer, or keep more node groups in higher precision."
            ) from None
        record["check"] = verdict
        _set_metadata(result, {**new_meta, "quantization": record})
        write_engine(result, tmp)
        check_onnx(tmp)


def _verify(
    path: Path, source: Path, calibration: Calibration, precision: Precision, check: bool
) -> dict[str, Any]:
    if check:
        return check_engine(path, source, calibration)
    engine = Predictor(OnnxBackend(path, device="cpu"))
    reference = Predictor(OnnxBackend(source, device="cpu"))
    measured = agreement(engine, reference, calibration.check_images, calibration.check_task_ids)
    return {**measured, "gated": False}


def _quantized_nodes(proto: onnx.ModelProto) -> dict[str, int]:
    ops = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger")
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in ops + ("ConvInteger",):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _set_metadata(proto: onnx.ModelProto, meta: dict[str, Any]) -> EngineMetadata:
    checked = validate_metadata(json.loads(json.dumps(meta)), "the quantised engine")
    del proto.metadata_props[:]
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    proto.producer_name = "surgery-edge"
    proto.doc_string = (
        f"surgery-edge multi-task engine ({meta['mode']}, {meta['precision']}, method "
        f"{meta['method']}); tasks: {', '.join(meta['tasks'])}."
    )
    return checked


def quantize_model(
    model: MultiTaskModel,
    path: str | Path,
    mode: EngineMode | str,
    recipe: QuantRecipe,
    calibration: Calibration,
    metadata: dict[str, Any] | None = None,
    target: Target | str = Target.ONNXRUNTIME,
) -> Path:
    """Export ``model`` in fp32 (checked against PyTorch), then quantise it into ``path``; the
    fp32 file is not kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", mode, metadata=metadata)
        return quantize_engine(fp32, path, recipe, calibration, target)


def export_half(
    model: MultiTaskModel,
    path: str | Path,
    mode: EngineMode | str,
    calibration: Calibration,
    metadata: dict[str, Any] | None = None,
    fp32: str | Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Export ``model`` in fp16 into ``path`` only if it passes :func:`gate` against the fp32
    engine (``fp32``, or an fp32 export made here and not kept) on the held-out images of
    ``calibration``; returns the path and the check. A refused fp16 file is not written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        if fp32 is None:
            fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", mode, metadata=metadata)
        half = export_onnx(model, Path(tmp) / "fp16.onnx", mode, Precision.FP16, metadata=metadata)
        verdict = check_engine(half, fp32, calibration)
        with atomic_path(path) as out:
            shutil.copyfile(half, out)
    return path, verdict

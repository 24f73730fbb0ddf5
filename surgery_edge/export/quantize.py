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
precision) are recorded in the engine metadata under ``quantization``.

The publishing gate, derived from the accuracy targets (:data:`ACCURACY_TARGETS`: int8 and fp8
within 1 point of the fp32 engine's average accuracy and 2 points on any task; fp16 within 0.1
and 0.5). On any set of labelled images, the two engines score the same on every image where
their top-1 answers agree, so

    accuracy(engine) - accuracy(fp32) = (right only by the engine - right only by fp32) / n,

and both counts are disagreements: the accuracy changes by at most the disagreement rate, on
any labelling. An agreement of at least ``100 - target`` % therefore bounds the change by the
target: 99% for int8 and fp8, 99.9% for fp16, averaged over the tasks (the average accuracy is
the tasks' mean), and 98% / 99.5% on each task. The gate measures the agreement without labels
on held-out adaptation images, drawn from the same distribution as the test images; on ``n``
held-out images it is an estimate, so the check also records the one-sided 95% upper
confidence bound of each task's disagreement (Clopper-Pearson). That bound is reported, not
gated: with no disagreement at all it is ``1 - 0.05 ** (1 / n)``, about ``3 / n``, so gating
on it would refuse every int8 engine checked on fewer than 299 images per task (2,995 for fp16).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from surgery_edge.engine_format import (
    META_KEY,
    Choice,
    EngineMetadata,
    EngineMode,
    Precision,
    parse_metadata,
    read_onnx_metadata,
    verify_engine,
)
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.export.onnx import check_onnx, export_onnx, write_engine
from surgery_edge.io import atomic_path
from surgery_edge.runtime.backends import OnnxBackend
from surgery_edge.runtime.predictor import Predictor
from surgery_edge.surgery.model import MultiTaskModel

# The accuracy targets against the fp32 engine, in points: (average over the tasks, any one task).
ACCURACY_TARGETS: dict[Precision, tuple[float, float]] = {
    Precision.FP16: (0.1, 0.5),
    Precision.INT8: (1.0, 2.0),
    Precision.FP8: (1.0, 2.0),
}
QUANT_INSTALL = (
    "Install the quantisation extra: `pip install 'surgery-edge[quant]'` (nvidia-modelopt and "
    "the ONNX packages its quantiser needs, without a second onnxruntime)."
)


class GateError(ExportError):
    """An engine refused by :func:`gate`: ``check`` holds the agreement it measured and
    ``record`` (set by :func:`quantize_engine`) the engine's quantisation record."""

    def __init__(self, message: str, check: dict[str, Any]):
        super().__init__(message)
        self.check = check
        self.record: dict[str, Any] | None = None


class Quantizer(Choice):
    """Which tool quantises the engine."""

    MODELOPT = "modelopt"
    ORT_DYNAMIC = "ort-dynamic"
    ORT_STATIC = "ort-static"


class Target(Choice):
    """What runs the quantised engine: it decides the quantiser and the high precision."""

    ONNXRUNTIME = "onnxruntime"  # ONNX Runtime, CPU provider (or CUDA)
    TENSORRT = "tensorrt"  # a TensorRT engine built from the QDQ ONNX


# Node groups a recipe may keep in higher precision (see :func:`node_groups`).
GROUPS = (
    "patch_embedding",  # the Conv that embeds patches
    "linear",  # constant-weight MatMul / Gemm of the backbone (attention in/out, MLP, proj)
    "attention",  # activation x activation MatMuls (Q.K^T, attention.V)
    "adapters",  # the products with the gathered adapter tables
    "heads",  # the product with the gathered head table
    "layernorm",
    "softmax",
)
TABLE_STORAGE = ("int8", "fp16", "fp32")


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


def default_recipe(precision: Precision | str, target: Target | str) -> QuantRecipe:
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
    precision, target = Precision.parse(precision), Target.parse(target)
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


# --- calibration data ------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Preprocessed engine inputs to calibrate on and, held out, to check the result with.

    Attributes:
        images: (N, 3, S, S) float32, preprocessed by the runtime.
        task_ids: (N,) int64, each image's own task.
        check_images, check_task_ids: held-out images (not calibrated on) for the agreement
            check against the fp32 engine.
        source: what the images are, for the metadata (split, images per task, ...).
    """

    images: np.ndarray
    task_ids: np.ndarray
    check_images: np.ndarray
    check_task_ids: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.images) == 0:
            raise ConfigError(
                "No calibration images: quantisation needs at least one adaptation image per "
                "task (--calibration-images N, N >= 1)."
            )
        if len(self.images) != len(self.task_ids) or len(self.check_images) != len(
            self.check_task_ids
        ):
            raise ValueError("calibration images and task ids differ in length")
        if image_digests(self.images) & image_digests(self.check_images):
            raise ValueError("a held-out check image is also a calibration image")

    def feeds(self, mode: EngineMode) -> dict[str, np.ndarray]:
        feeds = {"images": np.ascontiguousarray(self.images, np.float32)}
        if mode is EngineMode.ROUTED:
            feeds["task_ids"] = np.ascontiguousarray(self.task_ids, np.int64)
        return feeds

    def batches(self, mode: EngineMode, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        feeds = self.feeds(mode)
        for i in range(0, len(self.images), batch_size):
            yield {k: v[i : i + batch_size] for k, v in feeds.items()}


def image_digests(images: np.ndarray) -> set[bytes]:
    """One digest per image of ``images`` (N, ...): equal images, equal digests."""
    return {
        hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest() for x in images
    }


# --- the graph: node groups and per-task tables ----------------------------------------------

# Ops that move or reshape a tensor without computing on it: a weight seen through them is
# still that weight.
_PASS_THROUGH = {
    "Transpose",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "Identity",
    "Expand",
    "Slice",
    "Gather",
    "GatherND",
    "Flatten",
}


def _roots(name: str, producers: dict, initializers: set[str], depth: int = 0) -> set[str]:
    """The initializers that tensor ``name`` is only a reshaped or gathered view of."""
    if name in initializers:
        return {name}
    node = producers.get(name)
    if node is None or node.op_type not in _PASS_THROUGH or depth > 12:
        return set()
    data = (
        node.input[:1]
        if node.op_type in ("Gather", "GatherND", "Slice", "Expand")
        else [node.input[0]]
    )
    out: set[str] = set()
    for i in data:
        out |= _roots(i, producers, initializers, depth + 1)
    return out


def node_groups(proto: onnx.ModelProto, tables: dict[str, list[str]]) -> dict[str, list[str]]:
    """The names of the nodes in each of :data:`GROUPS`.

    Args:
        proto: the fp32 engine.
        tables: the engine metadata's ``task_tables`` (``{"heads": [...], "adapters": [...]}``).
    """
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    heads, adapters = set(tables.get("heads", [])), set(tables.get("adapters", []))
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for node in graph.node:
        op = node.op_type
        if op == "Conv":
            groups["patch_embedding"].append(node.name)
        elif op == "LayerNormalization":
            groups["layernorm"].append(node.name)
        elif op == "Softmax":
            groups["softmax"].append(node.name)
        elif op in ("MatMul", "Gemm", "Einsum"):
            roots = [_roots(i, producers, initializers) for i in node.input[:2]]
            every = set().union(*roots)
            if every & heads:
                groups["heads"].append(node.name)
            elif every & adapters:
                groups["adapters"].append(node.name)
            elif any(roots):
                groups["linear"].append(node.name)
            else:
                groups["attention"].append(node.name)
    return groups


def store_tables(proto: onnx.ModelProto, names: list[str], storage: str) -> tuple[list[str], int]:
    """Store the per-task tables ``names`` as ``storage``, in place.

    Returns the tables stored so (those a quantiser has not already taken as a layer's
    constant weight, as V1's all-tasks graph offers its final adapters) and the bytes saved.

    ``int8``: symmetric, one scale per row of the flattened ``(T * R, K)`` table (per task and
    output channel), ``DequantizeLinear`` then ``Reshape`` back to ``(T, R, K)``; the gathers
    that read the table are unchanged. ``fp16``: the table stored in half, cast back on load.
    """
    if storage == "fp32" or not names:
        return [], 0
    graph = proto.graph
    by_name = {t.name: t for t in graph.initializer}
    saved, new_nodes, stored_names = 0, [], []
    for name in names:
        init = by_name.get(name)
        if init is None or init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        stored_names.append(name)
        w = numpy_helper.to_array(init)
        dtype = w.dtype
        graph.initializer.remove(init)
        if storage == "fp16":
            stored = numpy_helper.from_array(w.astype(np.float16), f"{name}.fp16")
            graph.initializer.append(stored)
            new_nodes.append(
                helper.make_node(
                    "Cast", [stored.name], [name], name=f"{name}.load", to=init.data_type
                )
            )
            saved += w.nbytes - w.size * 2
            continue
        rows = w.reshape(-1, w.shape[-1]).astype(np.float32)
        scale = np.abs(rows).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}.int8"),
                numpy_helper.from_array(scale.astype(dtype), f"{name}.scale"),
                numpy_helper.from_array(np.array(w.shape, np.int64), f"{name}.shape"),
            ]
        )
        new_nodes += [
            helper.make_node(
                "DequantizeLinear",
                [f"{name}.int8", f"{name}.scale"],
                [f"{name}.rows"],
                name=f"{name}.dequantize",
                axis=0,
            ),
            helper.make_node(
                "Reshape", [f"{name}.rows", f"{name}.shape"], [name], name=f"{name}.reshape"
            ),
        ]
        saved += w.nbytes - q.nbytes - scale.size * dtype.itemsize
    for node in reversed(new_nodes):  # inputs are initializers: any position is topological
        graph.node.insert(0, node)
    return stored_names, saved


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


def agreement(
    engine: Predictor, reference: Predictor, images: np.ndarray, task_ids: np.ndarray
) -> dict[str, Any]:
    """Top-1 agreement (%) of ``engine`` with ``reference``, over all images and per task, and
    their largest logit gap, over each image's own task's classes (an fp16 graph may pad with
    -65504 instead of -inf).

    Returns:
        ``images``, ``argmax_agreement`` (over all images), ``max_abs_logit_diff`` and
        ``per_task``: ``{task: {"images", "agree"}}`` for every task with images.
    """
    agree, gap, batch = 0, 0.0, 64
    counts = np.asarray(reference.class_counts)
    per_task = {t: [0, 0] for t in range(len(reference.tasks))}
    for i in range(0, len(images), batch):
        x, ids = images[i : i + batch], task_ids[i : i + batch]
        got, ref = engine.routed_logits(x, ids), reference.routed_logits(x, ids)
        valid = np.arange(ref.shape[1])[None, :] < counts[ids][:, None]
        if not np.isfinite(got[valid]).all():
            raise ExportError(
                f"The quantised engine {engine.path.name} returns non-finite logits for real "
                "classes: the quantisation is broken. Please report this with the model's "
                "architecture."
            )
        masked = np.where(valid, got, -np.inf)
        same = masked.argmax(-1) == ref.argmax(-1)
        agree += int(same.sum())
        for t in np.unique(ids):
            per_task[int(t)][0] += int((ids == t).sum())
            per_task[int(t)][1] += int(same[ids == t].sum())
        gap = max(gap, float(np.abs(got[valid] - ref[valid]).max(initial=0.0)))
    return {
        "images": int(len(images)),
        "argmax_agreement": round(100.0 * agree / max(len(images), 1), 3),
        "max_abs_logit_diff": round(gap, 5),
        "per_task": {
            reference.tasks[t]: {"images": n, "agree": k} for t, (n, k) in per_task.items() if n
        },
    }


def agreement_floor(precision: Precision | str) -> tuple[float, float]:
    """The least top-1 agreement (%) with the fp32 engine, (averaged over the tasks, on each
    task), that bounds the accuracy change by :data:`ACCURACY_TARGETS` (module docstring)."""
    average, task = ACCURACY_TARGETS[Precision.parse(precision)]
    return 100.0 - average, 100.0 - task


def disagreement_upper_bound(images: int, disagree: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound (%) of a disagreement rate seen as ``disagree`` of
    ``images`` (Clopper-Pearson: exact for a binomial sample)."""
    from scipy.stats import beta  # deferred: scikit-learn's dependency, only the gate needs it

    if disagree >= images:
        return 100.0
    return 100.0 * float(beta.ppf(confidence, disagree + 1, images - disagree))


def gate(
    engine: Predictor, reference: Predictor, calibration: Calibration, precision: Precision | str
) -> dict[str, Any]:
    """Check ``engine`` against the fp32 ``reference`` on the held-out images of
    ``calibration`` (never the calibration images) before it is published.

    Returns:
        :func:`agreement`'s record plus ``agreement_avg`` (the tasks' mean, %), each task's
        ``agreement`` and ``disagreement_upper_95`` (%), ``worst_task`` and the ``floor``.

    Raises:
        ExportError: a task has no held-out image, or the agreement is below
            :func:`agreement_floor` on average or on any task: the message names the worst
            task and its agreement.
    """
    precision = Precision.parse(precision)
    floor_avg, floor_task = agreement_floor(precision)
    images, ids = calibration.check_images, calibration.check_task_ids
    check = agreement(engine, reference, images, ids)
    missing = [t for t in reference.tasks if t not in check["per_task"]]
    if missing:
        raise ExportError(
            f"No held-out adaptation image of task(s) {', '.join(missing)} to check the "
            f"{precision} engine against fp32 with (every image was used to calibrate); it was "
            "not written. Give those tasks more adaptation images, or fewer "
            "--calibration-images."
        )
    for entry in check["per_task"].values():
        n, k = entry["images"], entry["agree"]
        entry["agreement"] = round(100.0 * k / n, 3)
        entry["disagreement_upper_95"] = round(disagreement_upper_bound(n, n - k), 3)
    tasks = check["per_task"]
    worst = min(tasks, key=lambda t: (tasks[t]["agreement"], t))
    check["agreement_avg"] = round(float(np.mean([e["agreement"] for e in tasks.values()])), 3)
    check["worst_task"] = worst
    check["floor"] = {"average": floor_avg, "per_task": floor_task}
    low_avg, low_task = check["agreement_avg"] < floor_avg, tasks[worst]["agreement"] < floor_task
    if low_avg or low_task:
        target_avg, target_task = ACCURACY_TARGETS[precision]
        low = tasks[worst]["agreement"]
        raise GateError(
            f"The {precision} engine agrees with the fp32 engine on {low:.2f}% "
            f"of task {worst!r}'s {tasks[worst]['images']} held-out adaptation images (its worst "
            f"task; at least {floor_task:g}% on each is required) and on "
            f"{check['agreement_avg']:.2f}% of {check['images']} on average over the tasks (at "
            f"least {floor_avg:g}%): its accuracy could move by more than the target "
            f"({target_avg:g} point on average, {target_task:g} on a task). It was not "
            "written. Keep more node groups in higher precision, or use more calibration "
            "images.",
            check,
        )
    return check


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
    meta = read_onnx_metadata(source)
    verify_engine(source, meta, "onnx")
    if meta.precision is not Precision.FP32:
        raise ExportError(
            f"{source} is a {meta.precision} engine; quantise the fp32 engine (export it with "
            "--precision fp32)."
        )
    tables = meta.get("task_tables") or {}
    table_names = [n for kind in ("adapters", "heads") for n in tables.get(kind, [])]
    proto = onnx.load(str(source))
    groups = node_groups(proto, tables)
    keep = set(recipe.keep)
    if recipe.quantizer is not Quantizer.MODELOPT:
        # ONNX Runtime's integer MatMul takes a 2-D constant weight: the products with the
        # per-task tables (V1's batched (T, d, r) final adapters) stay float; the tables
        # themselves are stored int8 below
        keep |= {"adapters", "heads"}
    exclude = [n for g in GROUPS if g in keep for n in groups[g]]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="surgery-edge-quant-") as tmp:
        src, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "quantized.onnx"
        shutil.copyfile(source, src)
        run = _run_modelopt if recipe.quantizer is Quantizer.MODELOPT else _run_ort
        with _captured() as log:
            try:
                tool, version = run(src, quantized, recipe, exclude, calibration, meta.mode)
            except (ExportError, ConfigError):
                raise
            except Exception as e:  # the quantisers raise assertion, value and ORT errors
                raise ExportError(
                    f"{recipe.quantizer} could not quantise {source} to {recipe.precision} "
                    f"({type(e).__name__}: {str(e)[:300]}; log: {_tail(log.getvalue())})."
                ) from None
        result = onnx.load(str(quantized))
    stored, saved = store_tables(result, table_names, recipe.tables)
    record = {
        "recipe": recipe.to_dict(),
        "target": str(target),
        "tool": tool,
        "tool_version": version,
        "kept_in_higher_precision": {g: len(groups[g]) for g in GROUPS if g in keep},
        "node_groups": {g: len(v) for g, v in groups.items()},
        "quantized_nodes": _quantized_nodes(result),
        "tables": {"storage": recipe.tables, "stored": stored, "bytes_saved": saved},
        "calibration": {
            **calibration.source,
            "images": int(len(calibration.images)),
            "check_images": int(len(calibration.check_images)),
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    new_meta = {
        **meta.to_dict(),
        "precision": str(recipe.precision),
        "quantization": record,
        "opset": _opset(result),
    }
    _set_metadata(result, new_meta)
    with atomic_path(out) as tmp:
        write_engine(result, tmp)
        check_onnx(tmp)
        try:
            verdict = _verify(tmp, source, calibration, recipe.precision, check)
        except GateError as e:
            e.record = record
            raise
        except ExportError:
            raise
        except Exception as e:  # onnxruntime cannot run the quantised graph
            raise ExportError(
                f"ONNX Runtime cannot run the {recipe.precision} engine that {recipe.quantizer} "
                f"made from {source} ({str(e).splitlines()[0][:300]}); it was not written. Try "
                "another --quantizer, or keep more node groups in higher precision."
            ) from None
        record["check"] = verdict
        _set_metadata(result, {**new_meta, "quantization": record})
        write_engine(result, tmp)
        check_onnx(tmp)
    return out


def check_engine(path: str | Path, fp32: str | Path, calibration: Calibration) -> dict[str, Any]:
    """:func:`gate` for the engine file ``path`` against the fp32 engine file ``fp32``, at the
    floor of ``path``'s precision (fp16, int8 or fp8)."""
    engine = Predictor(OnnxBackend(path, device="cpu"))
    reference = Predictor(OnnxBackend(fp32, device="cpu"))
    return gate(engine, reference, calibration, engine.meta.precision)


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
    checked = parse_metadata(json.dumps(meta), "the quantised engine")
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
        half = export_onnx(model, Path(tmp) / "fp16.onnx", mode, True, metadata=metadata)
        verdict = check_engine(half, fp32, calibration)
        with atomic_path(path) as out:
            shutil.copyfile(half, out)
    return path, verdict

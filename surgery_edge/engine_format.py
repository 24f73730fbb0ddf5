"""The engine format: what an exported artefact carries so that it can be served on its own.

This module is the contract between the exporters (which write it) and the runtime (which reads
it), so it depends on nothing but the standard library: no torch, no numpy, no onnx at import.

Every exported artefact (ONNX, TensorRT, AOTInductor ``.pt2``) carries one JSON object under the
key ``surgery_edge``: the task names and class names per task, the preprocessing, the method
(none | surgery | surgeryv2), the adapter rank, the architecture, the merge recipe, the package
version, the mode (routed | all-tasks), the precision (fp32 | fp16 | int8 | fp8; a quantised
engine adds a ``quantization`` record) and the engine's input and output names.
Where it lives:

- ONNX: ``ModelProto.metadata_props["surgery_edge"]`` (ONNX Runtime exposes it as the session's
  ``custom_metadata_map``);
- ``.pt2``: the AOTInductor package metadata (``aot_inductor.metadata``);
- TensorRT: a sidecar ``<engine>.json`` (a serialized engine has no place for user data).

Integrity (engine format 3): the metadata's ``integrity`` record holds the SHA-256 of the
artefact itself, so a changed or damaged copy is refused (:func:`verify_engine`); how it is
computed and sealed is :mod:`surgery_edge.engine_digest`.

This module owns every fact about an engine, so that nothing else parses them: the modes and
precisions (:class:`EngineMode`, :class:`Precision`, :func:`effective_precision`), the device
names an engine runs on (:func:`check_device`), the file kinds and the reader of each
(:func:`engine_kind`, :func:`read_metadata`), and the inputs and outputs the metadata implies
(:func:`io_specs`).
"""

from __future__ import annotations

import enum
import json
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery_edge.engine_digest import (
    DIGEST_PLACEHOLDER,
    HEX64,
    INTEGRITY_KEY,
    MAX_METADATA_BYTES,
    file_sha256,
    pt2_digest,
    remembered,
    safe_files,
    seal_package,
    sealed_file_digest,
    write_sealed,
)
from surgery_edge.engine_preprocessing import Preprocessing
from surgery_edge.errors import ExportError
from surgery_edge.io import atomic_path

META_KEY = "surgery_edge"
# 2: preprocessing is open_clip's eval transform (resize the shorter side, centre crop), named by
# ``resize`` / ``interpolation`` / ``crop``. Version 1 stretched images with a bilinear resize.
# 3: the ``integrity`` record (the artefact's SHA-256); engines without it are not served.
FORMAT_VERSION = 3

REQUIRED_KEYS = (
    "tasks",
    "class_names",
    "preprocessing",
    "method",
    "mode",
    "precision",
    "inputs",
    "outputs",
)


class Choice(str, enum.Enum):
    """A string enum parsed once, with an error that lists the choices (modes, precisions, and
    the exporters' own choices such as the quantiser)."""

    @classmethod
    def parse(cls, value: Any, what: str | None = None):
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            what = what or re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()
            choices = ", ".join(m.value for m in cls)
            raise ExportError(f"Unknown {what} {value!r}; use one of: {choices}.") from None

    def __str__(self) -> str:
        return self.value


class EngineMode(Choice):
    """How an engine is asked."""

    ROUTED = "routed"  # images + one task id per image -> that task's logits
    ALL_TASKS = "all-tasks"  # images -> every task's logits


class Precision(Choice):
    """An engine's weights and compute; its inputs and outputs stay float32.

    ``int8`` and ``fp8`` engines are post-training quantised from the fp32 engine; their metadata
    carries a ``quantization`` record (the quantiser, the recipe, which node groups stay in
    higher precision, the calibration data and the check against the fp32 engine).
    """

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    FP8 = "fp8"

    @property
    def quantized(self) -> bool:
        """Whether this precision is reached by quantising an fp32 engine (int8, fp8)."""
        return self in (Precision.INT8, Precision.FP8)


def effective_precision(meta: EngineMetadata) -> Precision:
    """The precision an engine computes in: the one its metadata records, except that a
    TensorRT engine built with FP16 kernels allowed (``tensorrt.fp16``) is fp16 whatever the
    precision of the ONNX it was built from."""
    built = meta.get("tensorrt")
    if isinstance(built, dict) and built.get("fp16"):
        return Precision.FP16
    return meta.precision


def half_compute(meta: EngineMetadata) -> bool:
    """Whether the engine computes in fp16: an fp16 engine, or a quantised one whose
    unquantised layers are fp16 (quantised for TensorRT)."""
    recipe = (meta.get("quantization") or {}).get("recipe", {})
    return effective_precision(meta) is Precision.FP16 or recipe.get("high_precision") == "fp16"


# Where an engine runs: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]{1,3})?"
_DEVICE = re.compile(DEVICE_PATTERN)


def is_device_name(device: Any) -> bool:
    """Whether ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N below 1000)."""
    return isinstance(device, str) and _DEVICE.fullmatch(device) is not None


def check_device(device: Any) -> str:
    """``device`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ExportError otherwise
    (a misspelt device never silently falls back to the CPU)."""
    if not is_device_name(device):
        raise ExportError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.")
    return device


def io_names(mode: EngineMode, tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """The engine's input and output names for ``mode``."""
    if mode is EngineMode.ROUTED:
        return ["images", "task_ids"], ["logits", "probs"]
    return ["images"], [f"logits_{t}" for t in tasks]


# --- the metadata object ---------------------------------------------------------------------


@dataclass(frozen=True)
class EngineMetadata:
    """The validated metadata of an engine; ``raw`` keeps every field as stored (recipe, ...)."""

    tasks: tuple[str, ...]
    class_names: tuple[tuple[str, ...], ...]
    preprocessing: Preprocessing
    method: str
    mode: EngineMode
    precision: Precision
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    raw: dict[str, Any]

    @property
    def class_counts(self) -> list[int]:
        return [len(c) for c in self.class_names]

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, element type (numpy's name: ``float32``) and shape, the
    batch dimension first (``"batch"``, or a name or None where a graph leaves it dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def __str__(self) -> str:
        return f"{self.name} {self.dtype} [{', '.join(map(str, self.shape))}]"


def io_specs(meta: EngineMetadata) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs every surgery-edge engine of ``meta`` declares: ``images``
    float32 (B, 3, S, S), routed ``task_ids`` int64 (B,); float32 logits (B, C), C the widest
    task's classes for a routed engine's ``logits`` and ``probs``, each task's own for
    ``logits_<task>``."""
    size = meta.preprocessing.image_size
    inputs = [TensorSpec("images", "float32", ("batch", 3, size, size))]
    if meta.mode is EngineMode.ROUTED:
        inputs.append(TensorSpec("task_ids", "int64", ("batch",)))
        widths = [max(meta.class_counts)] * len(meta.outputs)
    else:
        widths = meta.class_counts
    return inputs, [TensorSpec(n, "float32", ("batch", w)) for n, w in zip(meta.outputs, widths)]


def check_graph_inputs(
    source: str | os.PathLike,
    meta: EngineMetadata,
    inputs: Sequence[tuple[str, str, Sequence[int | str | None]]],
) -> None:
    """Check a graph's declared inputs against its metadata.

    Args:
        inputs: ``(name, element type, shape)`` per graph input, the element type a numpy name
            (``float32``), a shape entry an int, or a name / None where it is dynamic.

    Raises:
        ExportError: the names, element types, ranks or sizes (a fixed dimension that is not
            the one the metadata's ``image_size`` implies) disagree.
    """
    size = meta.preprocessing.image_size
    expected = {
        s.name: (s.dtype, [None if d == "batch" else d for d in s.shape]) for s in io_specs(meta)[0]
    }
    names = [name for name, _, _ in inputs]
    if tuple(names) != meta.inputs:
        raise ExportError(
            f"Engine {source}: its graph has inputs {names}, but its metadata names "
            f"{list(meta.inputs)}. The metadata does not belong to this graph: re-export it."
        )
    for name, dtype, shape in inputs:
        want_type, want_shape = expected[name]
        fixed = [
            (have, want)
            for have, want in zip(shape, want_shape)
            if isinstance(have, int) and want is not None
        ]
        if dtype != want_type or len(shape) != len(want_shape) or any(h != w for h, w in fixed):
            have = ", ".join("?" if d is None else str(d) for d in shape)
            want = ", ".join("batch" if d is None else str(d) for d in want_shape)
            raise ExportError(
                f"Engine {source}: its graph's input {name!r} is {dtype} [{have}], but its "
                f"metadata (image_size {size}) makes it {want_type} [{want}]. The metadata does "
                "not belong to this graph: re-export the engine."
            )


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def validate_metadata(meta: Any, source: str | os.PathLike) -> EngineMetadata:
    """Check that ``meta`` describes a surgery-edge engine, field by field.

    Raises:
        ExportError: naming ``source`` and the field that is missing or malformed.
    """
    if not isinstance(meta, dict) or meta.get("kind") != "engine":
        raise ExportError(
            f"{source} carries no surgery-edge engine metadata: it was not exported by "
            "surgery-edge, or it is truncated or corrupt. Re-export it with `surgery-edge export`."
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ExportError(f"Engine metadata of {source} lacks {missing}; re-export the engine.")
    where = f"Engine metadata of {source}"
    tasks, names = meta["tasks"], meta["class_names"]
    if not _string_list(tasks) or not tasks:
        raise ExportError(f"{where}: tasks must be a non-empty list of names, got {tasks!r}.")
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise ExportError(
            f"{where} names task {twice[0]!r} more than once ({tasks}): a request names its task, "
            "so task names must be unique. Re-export the engine."
        )
    if not isinstance(names, list) or not all(_string_list(c) and c for c in names):
        raise ExportError(f"{where}: class_names must be one non-empty list of names per task.")
    if len(tasks) != len(names):
        raise ExportError(
            f"{where} has {len(tasks)} tasks but {len(names)} class-name lists; re-export it."
        )
    if not isinstance(meta["method"], str):
        raise ExportError(f"{where}: method must be a name, got {meta['method']!r}.")
    preprocessing = Preprocessing.from_dict(meta["preprocessing"], source)
    try:
        mode, precision = EngineMode.parse(meta["mode"]), Precision.parse(meta["precision"])
    except ExportError as e:
        raise ExportError(f"{where}: {e} Re-export the engine.") from None
    if precision.quantized and not isinstance(meta.get("quantization"), dict):
        raise ExportError(
            f"{where}: a {precision} engine must record its quantization (an object under "
            "'quantization'); re-export it with `surgery-edge export --precision "
            f"{precision}`."
        )
    inputs, outputs = io_names(mode, tasks)
    if meta["inputs"] != inputs or meta["outputs"] != outputs:
        raise ExportError(
            f"{where} names inputs {meta['inputs']!r} and outputs {meta['outputs']!r}; a {mode} "
            f"engine has {inputs} and {outputs}. Re-export the engine."
        )
    return EngineMetadata(
        tasks=tuple(tasks),
        class_names=tuple(tuple(c) for c in names),
        preprocessing=preprocessing,
        method=meta["method"],
        mode=mode,
        precision=precision,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        raw=meta,
    )


def parse_metadata(text: str | None, source: str | os.PathLike) -> EngineMetadata:
    """Parse and validate the JSON stored in an artefact (``None`` when it has none)."""
    if text is None:
        return validate_metadata(None, source)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"Engine metadata of {source} is not valid JSON ({e}).") from None
    return validate_metadata(meta, source)


def metadata_from_props(props: Mapping[str, str], source: str | os.PathLike) -> EngineMetadata:
    """The metadata among an ONNX model's metadata properties (``metadata_props``, or ONNX
    Runtime's ``custom_metadata_map``)."""
    return parse_metadata(props.get(META_KEY), source)


def read_onnx_metadata(path: str | os.PathLike) -> EngineMetadata:
    """The engine metadata stored in an ONNX file (its weights are not read)."""
    import onnx  # deferred: only export and inspection need onnx; serving reads it from ORT

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, OSError, ...
        raise ExportError(
            f"{path} is not a readable ONNX file ({type(e).__name__}: {e})."
        ) from None
    return metadata_from_props({p.key: p.value for p in proto.metadata_props}, path)


def read_pt2_metadata(path: str | os.PathLike) -> EngineMetadata:
    """The metadata compiled into a ``.pt2`` package (AOTInductor's ``*_metadata.json``), read
    from the zip archive: nothing is loaded or run."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [i for i in z.infolist() if i.filename.endswith("wrapper_metadata.json")]
            if names and names[0].file_size > MAX_METADATA_BYTES:
                raise ValueError(f"{names[0].filename} is {names[0].file_size:,} bytes")
            stored = json.loads(z.read(names[0])) if names else {}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ExportError(
            f"{path} is not a readable AOTInductor package ({e}); re-export it with "
            "`surgery-edge export --aoti`."
        ) from None
    return parse_metadata(stored.get(META_KEY) if isinstance(stored, dict) else None, path)


# --- file kinds --------------------------------------------------------------------------------

ONNX_SUFFIXES = (".onnx",)
AOTI_SUFFIXES = (".pt2",)
TRT_SUFFIXES = (".engine", ".plan", ".trt")


def require_file(path: Path) -> None:
    """ExportError unless the engine file ``path`` exists."""
    if not path.is_file():
        raise ExportError(f"Engine file {path} does not exist. Check the path.")


def engine_kind(path: str | os.PathLike) -> str:
    """``onnx``, ``pt2`` or ``tensorrt`` from the suffix (or, failing that, the file's bytes)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in AOTI_SUFFIXES:
        return "pt2"
    if suffix in TRT_SUFFIXES:
        return "tensorrt"
    require_file(p)
    with p.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "pt2"
    if sidecar_path(p).is_file():
        return "tensorrt"
    return "onnx"


def read_metadata(path: str | os.PathLike, kind: str | None = None) -> EngineMetadata:
    """The metadata of the engine at ``path``, read as its kind (default: :func:`engine_kind`)
    stores it: an ONNX file's properties (needs the onnx package), a ``.pt2`` package's
    AOTInductor metadata, a TensorRT engine's sidecar. Nothing is run or loaded."""
    kind = kind or engine_kind(path)
    readers = {"onnx": read_onnx_metadata, "pt2": read_pt2_metadata, "tensorrt": read_sidecar}
    return readers[kind](path)


# --- sidecars (TensorRT) ---------------------------------------------------------------------


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def write_sidecar(
    engine_path: str | os.PathLike, meta: dict[str, Any], engine_sha256: str | None = None
) -> Path:
    """Write ``meta`` (validated first) beside the engine, atomically and sealed (its
    ``integrity`` digest covers the sidecar's text).

    Args:
        engine_sha256: the SHA-256 of the engine's bytes, recorded so that the sidecar is read
            only with the engine it was written for (not another engine's, nor a partial one).
            An engine is served only with it (:func:`verify_engine`).
    """
    meta = {**meta, INTEGRITY_KEY: {"sha256": DIGEST_PLACEHOLDER}}
    if engine_sha256 is not None:
        meta["engine_sha256"] = engine_sha256
    path = sidecar_path(engine_path)
    validate_metadata(meta, path)
    with atomic_path(path) as tmp:
        write_sealed(tmp, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return path


def read_sidecar(engine_path: str | os.PathLike) -> EngineMetadata:
    """The metadata beside a TensorRT engine; refused when it records another engine's hash."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ExportError(
            f"Engine {engine_path} has no metadata file {path}; it is written next to the engine "
            "by `surgery-edge export`. Keep the two files together."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"Engine metadata file {path} is unreadable ({e}).") from None
    meta = parse_metadata(text, path)
    recorded = meta.get("engine_sha256")
    if recorded is not None and Path(engine_path).is_file():
        if recorded != file_sha256(engine_path):
            raise ExportError(
                f"Metadata file {path} was written for another engine than {engine_path} (the "
                "engine's checksum differs: a swapped, rebuilt or partly written file). Keep each "
                "engine with its own .json, or re-export it with `surgery-edge export --trt`."
            )
    return meta


# --- integrity -------------------------------------------------------------------------------

_DIFFER = "the SHA-256 digest its export recorded"


def seal_pt2(path: str | os.PathLike, meta: dict[str, Any]) -> str:
    """Store ``meta`` in a compiled ``.pt2`` package and seal it; returns the digest.

    The package's metadata members (AOTInductor's ``*_metadata.json``) get ``meta`` under
    :data:`META_KEY`, with the digest of the package in its ``integrity`` record. Written here,
    not trusted from the compiler: Inductor's compile cache can hand back a package compiled
    earlier with the same graph and another export's metadata.
    """
    text = json.dumps({**meta, INTEGRITY_KEY: {"sha256": DIGEST_PLACEHOLDER}})
    return seal_package(path, META_KEY, text)


def _changed(path: str | os.PathLike, detail: str) -> ExportError:
    return ExportError(
        f"Engine {path} was changed or corrupted after export: {detail}. A copy cut short, "
        "damaged on disk or edited by hand (its tasks, class names or preprocessing) would "
        "answer wrongly without an error, so it is not used. Re-export it with `surgery-edge "
        "export`, or copy it again, whole, from where it was exported."
    )


def verify_engine(path: str | os.PathLike, meta: EngineMetadata, kind: str) -> None:
    """Check that the engine at ``path`` is byte for byte what its export wrote.

    Args:
        path: the engine file (``.onnx``, ``.pt2``, or a TensorRT engine beside its sidecar).
        meta: its metadata as read from it (or from the sidecar).
        kind: ``onnx``, ``pt2`` or ``tensorrt``.

    Raises:
        ExportError: the engine records no digest (exported before engine format 3), or its
            bytes, an external-data file, or a TensorRT engine and its sidecar no longer match
            what the export recorded.
    """
    path = Path(path)
    record = meta.get(INTEGRITY_KEY)
    digest = record.get("sha256") if isinstance(record, dict) else None
    version = meta.get("format_version")
    if not isinstance(digest, str) or not HEX64.fullmatch(digest):
        if isinstance(version, int) and version >= 3:
            raise _changed(path, "its metadata's integrity record is missing or malformed")
        raise ExportError(
            f"Engine {path} carries no integrity digest: it was exported by surgery-edge "
            f"{meta.get('package_version', '?')} in engine format "
            f"{version if version is not None else '?'}, and this version serves format "
            f"{FORMAT_VERSION} engines only (their metadata is bound to their weights, so a "
            "changed or damaged copy is refused). Re-export it with `surgery-edge export`; the "
            "run's checkpoints are all it needs."
        )
    if kind == "pt2":
        found = remembered(path, digest, lambda: pt2_digest(path, digest))
        if found != digest:
            raise _changed(
                path, f"the package's contents (code, weights, metadata) differ from {_DIFFER}"
            )
        return
    source = sidecar_path(path) if kind == "tensorrt" else path
    found = remembered(source, digest, lambda: sealed_file_digest(source, digest))
    if found != digest:
        what = (
            f"its metadata file {source.name} differs"
            if kind == "tensorrt"
            else "its bytes (graph, weights and metadata) differ"
        )
        raise _changed(path, f"{what} from {_DIFFER}")
    if kind == "tensorrt":
        recorded = meta.get("engine_sha256")
        if not isinstance(recorded, str) or recorded != file_sha256(path):
            raise _changed(path, "the engine's bytes differ from the SHA-256 its metadata records")
        return
    files = record.get("files", {})
    if not safe_files(files):
        raise _changed(path, "its metadata's integrity record is malformed")
    for name, sha in files.items():
        data = path.parent / name
        if not data.is_file():
            raise ExportError(
                f"Engine {path} keeps its weights in {name}, which is not beside it; copy the "
                ".onnx file together with its weight file."
            )
        if file_sha256(data) != sha:
            raise _changed(path, f"its weight file {name} differs from {_DIFFER}")

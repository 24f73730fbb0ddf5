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
artefact itself, so the metadata is bound to the graph and weights it describes and a changed
or damaged copy is refused (:func:`verify_engine`) instead of answering wrongly. The export
writes the record with a placeholder of the digest's length, hashes the artefact as written,
then puts the digest in the placeholder's place (same length: no protobuf length prefix or zip
offset moves); a reader puts the placeholder back and hashes again. What is hashed:

- ONNX: the ``.onnx`` file's bytes; each external-data file's SHA-256 is recorded under
  ``integrity.files`` (so it is covered too);
- ``.pt2``: every member of the zip archive (name, size and contents, in archive order);
- TensorRT: the sidecar's text, which records the engine's own SHA-256 (``engine_sha256``).

It is a checksum, not a signature: it detects edits and damage (a partial copy, flipped bits,
metadata edited by hand), not someone who re-computes it. Each file is hashed once per process
(remembered by path, size, mtime and inode).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import mmap
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery_edge.errors import ExportError
from surgery_edge.io import atomic_path

META_KEY = "surgery_edge"
# 2: preprocessing is open_clip's eval transform (resize the shorter side, centre crop), named by
# ``resize`` / ``interpolation`` / ``crop``. Version 1 stretched images with a bilinear resize.
# 3: the ``integrity`` record (the artefact's SHA-256); engines without it are not served.
FORMAT_VERSION = 3
LEGACY_RESIZE = "bilinear-antialias"  # what format version 1 recorded
INTEGRITY_KEY = "integrity"
# Written where the digest goes, then replaced by it: 64 characters like a SHA-256 hex digest,
# none of them a hex digit, so the one can never be taken for the other.
DIGEST_PLACEHOLDER = "#" * 64

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


def io_names(mode: EngineMode | str, tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """The engine's input and output names for ``mode``."""
    if EngineMode.parse(mode) is EngineMode.ROUTED:
        return ["images", "task_ids"], ["logits", "probs"]
    return ["images"], [f"logits_{t}" for t in tasks]


# --- preprocessing ---------------------------------------------------------------------------

RESIZE_MODES = ("shortest", "squash")  # open_clip's resize_mode values the runtime reproduces
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """open_clip's eval transform, as the metadata records it.

    ``shortest``: resize the shorter side to ``image_size`` (the longer one keeps the aspect
    ratio), then centre-crop ``image_size`` square; ``squash``: resize to the square directly.
    Then RGB, scale to [0, 1], normalise with ``mean`` / ``std``, channels first.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest"
    interpolation: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "crop": "center" if self.resize == "shortest" else "none",
            "channels": "RGB",
            "scale": "1/255",
            "layout": "NCHW",
        }

    @classmethod
    def from_dict(cls, d: Any, source: str | os.PathLike) -> Preprocessing:
        where = f"Engine metadata of {source}: preprocessing"
        if not isinstance(d, dict):
            raise ExportError(f"{where} is a {type(d).__name__}, not an object; re-export it.")
        if d.get("resize") == LEGACY_RESIZE:
            raise ExportError(
                f"Engine {source} was exported by surgery-edge 0.1 with a stretching bilinear "
                "resize, which is not the preprocessing its accuracy was measured with. Re-export "
                "it with `surgery-edge export` (the new engine resizes exactly as open_clip's "
                "eval transform, like the evaluation does)."
            )
        size = d.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ExportError(f"{where}.image_size must be a positive integer, got {size!r}.")
        stats = {}
        for key in ("mean", "std"):
            v = d.get(key)
            ok = isinstance(v, list) and len(v) == 3
            ok = ok and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in v
            )
            if not ok or (key == "std" and min(v) <= 0):
                raise ExportError(
                    f"{where}.{key} must be three finite numbers{' > 0' if key == 'std' else ''}"
                    f", got {v!r}; re-export the engine."
                )
            stats[key] = tuple(float(x) for x in v)
        resize, interp = d.get("resize", "shortest"), d.get("interpolation", "bicubic")
        if resize not in RESIZE_MODES:
            raise ExportError(f"{where}.resize {resize!r} is not one of {list(RESIZE_MODES)}.")
        if interp not in INTERPOLATIONS:
            raise ExportError(
                f"{where}.interpolation {interp!r} is not one of {list(INTERPOLATIONS)}."
            )
        return cls(size, stats["mean"], stats["std"], resize, interp)


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
    expected = {"images": ("float32", [None, 3, size, size]), "task_ids": ("int64", [None])}
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


def read_onnx_metadata(path: str | os.PathLike) -> EngineMetadata:
    """The engine metadata stored in an ONNX file (its weights are not read)."""
    import onnx  # deferred: only export and inspection need onnx; serving reads it from ORT

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, OSError, ...
        raise ExportError(
            f"{path} is not a readable ONNX file ({type(e).__name__}: {e})."
        ) from None
    props = {p.key: p.value for p in proto.metadata_props}
    return parse_metadata(props.get(META_KEY), path)


def read_pt2_metadata(path: str | os.PathLike) -> EngineMetadata:
    """The metadata compiled into a ``.pt2`` package (AOTInductor's ``*_metadata.json``), read
    from the zip archive: nothing is loaded or run."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [i for i in z.infolist() if i.filename.endswith("wrapper_metadata.json")]
            if names and names[0].file_size > _MAX_METADATA_BYTES:
                raise ValueError(f"{names[0].filename} is {names[0].file_size:,} bytes")
            stored = json.loads(z.read(names[0])) if names else {}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ExportError(
            f"{path} is not a readable AOTInductor package ({e}); re-export it with "
            "`surgery-edge export --aoti`."
        ) from None
    return parse_metadata(stored.get(META_KEY) if isinstance(stored, dict) else None, path)


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

_BLOCK = 1 << 22
_MAX_METADATA_BYTES = 1 << 24  # a package's metadata JSON is kilobytes; not read whole beyond
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIFFER = "the SHA-256 digest its export recorded"
# SHA-256s computed in this process: (path, size, mtime, inode, device, token) -> digest. A
# server that loads an engine again (or info after load) does not hash it twice; a file
# changed on disk changes its key (a change that keeps size and mtime goes unseen only until
# the process ends).
_DIGESTS: dict[tuple, str | None] = {}


def _remembered(path: Path, token: str, compute) -> str | None:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, token)
    if key not in _DIGESTS:
        _DIGESTS[key] = compute()
    return _DIGESTS[key]


def _hash_range(f, h, start: int, end: int) -> None:
    f.seek(start)
    left = end - start
    while left > 0 and (block := f.read(min(_BLOCK, left))):
        h.update(block)
        left -= len(block)


def _sealed_file_digest(path: Path, token: str) -> str | None:
    """SHA-256 of the file with ``token`` (which must occur exactly once) read as the
    placeholder; None when it does not occur exactly once."""
    needle = token.encode("ascii")
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            at = m.find(needle)
            if at < 0 or m.find(needle, at + 1) >= 0:
                return None
        h = hashlib.sha256()
        _hash_range(f, h, 0, at)
        h.update(DIGEST_PLACEHOLDER.encode("ascii"))
        _hash_range(f, h, at + len(needle), size)
    return h.hexdigest()


def _is_metadata_member(info: zipfile.ZipInfo) -> bool:
    """A package member that may hold the engine metadata: a small JSON file (read whole)."""
    return info.filename.endswith(".json") and info.file_size <= _MAX_METADATA_BYTES


def _members_digest(z: zipfile.ZipFile, metadata: Callable[[bytes], bytes]) -> str:
    """SHA-256 of an archive's members (name, size, contents, in archive order), each metadata
    member's contents as ``metadata`` turns them (read whole), the others streamed."""
    h = hashlib.sha256()
    for info in z.infolist():
        h.update(info.filename.encode("utf-8") + b"\0")
        if _is_metadata_member(info):
            data = metadata(z.read(info))
            h.update(len(data).to_bytes(8, "little") + data)
            continue
        h.update(info.file_size.to_bytes(8, "little"))
        with z.open(info) as member:
            while block := member.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


def _pt2_digest(path: Path, token: str) -> str | None:
    """The digest of a ``.pt2`` package with ``token`` read as the placeholder in its metadata
    members; None when no member holds ``token`` or the archive is damaged (a member fails its
    CRC check)."""
    needle, placeholder = token.encode("ascii"), DIGEST_PLACEHOLDER.encode("ascii")
    found = 0

    def metadata(data: bytes) -> bytes:
        nonlocal found
        found += data.count(needle)
        return data.replace(needle, placeholder)

    try:
        with zipfile.ZipFile(path) as z:
            digest = _members_digest(z, metadata)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None
    return digest if found else None


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a whole file (remembered for this process, see :data:`_DIGESTS`)."""
    path = Path(path)

    def compute() -> str:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
        return h.hexdigest()

    return _remembered(path, "", compute)


def write_sealed(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` with its one :data:`DIGEST_PLACEHOLDER` replaced by the
    SHA-256 of ``data`` (placeholder included); returns the digest.

    The caller makes it atomic (``path`` is a temporary file).
    """
    placeholder = DIGEST_PLACEHOLDER.encode("ascii")
    at = data.find(placeholder)
    if at < 0 or data.find(placeholder, at + 1) >= 0:
        raise ExportError(
            f"Cannot seal {path}: its metadata's digest placeholder occurs "
            f"{data.count(placeholder)} times in the serialised engine, not once."
        )
    digest = hashlib.sha256(data).hexdigest()
    with open(path, "wb") as f:
        f.write(data)
        f.seek(at)
        f.write(digest.encode("ascii"))
    return digest


def seal_pt2(path: str | os.PathLike, meta: dict[str, Any]) -> str:
    """Store ``meta`` in a compiled ``.pt2`` package and seal it; returns the digest.

    The package's metadata members (AOTInductor's ``*_metadata.json``) get ``meta`` under
    :data:`META_KEY`, with the digest of the package in its ``integrity`` record. Written here,
    not trusted from the compiler: Inductor's compile cache can hand back a package compiled
    earlier with the same graph and another export's metadata.
    """
    path = Path(path)
    text = json.dumps({**meta, INTEGRITY_KEY: {"sha256": DIGEST_PLACEHOLDER}})
    placeholder, stored = DIGEST_PLACEHOLDER.encode("ascii"), 0

    def with_meta(data: bytes) -> bytes:
        nonlocal stored
        try:
            obj = json.loads(data)
        except ValueError:
            return data
        # AOTInductor's metadata members: the keys it writes itself (AOTI_DEVICE_KEY, ...)
        if not isinstance(obj, dict) or not any(k.startswith("AOTI_") for k in obj):
            return data
        stored += 1
        return json.dumps({**obj, META_KEY: text}).encode("utf-8")

    with zipfile.ZipFile(path) as z:
        digest = _members_digest(z, with_meta)
    if not stored:
        raise ExportError(
            f"Cannot seal {path}: no member of the package holds AOTInductor's metadata (this "
            "torch version stores it elsewhere); the package was not written."
        )
    with atomic_path(path) as tmp:
        # a new archive: a member's CRC-32 covers its contents, so it cannot be patched in place
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as out:
            for info in src.infolist():
                copy = zipfile.ZipInfo(info.filename, info.date_time)
                copy.compress_type, copy.external_attr = info.compress_type, info.external_attr
                if _is_metadata_member(info):
                    data = with_meta(src.read(info)).replace(placeholder, digest.encode("ascii"))
                    out.writestr(copy, data)
                    continue
                copy.file_size = info.file_size
                with src.open(info) as r, out.open(copy, "w", force_zip64=True) as w:
                    while block := r.read(_BLOCK):
                        w.write(block)
    return digest


def _files_record(record: dict, source: str | os.PathLike) -> dict[str, str]:
    files = record.get("files", {})
    ok = isinstance(files, dict) and all(
        isinstance(name, str)
        and isinstance(sha, str)
        and _HEX64.fullmatch(sha)
        and not Path(name).is_absolute()
        and ".." not in Path(name).parts
        and "\\" not in name
        for name, sha in files.items()
    )
    if not ok:
        raise _changed(source, "its metadata's integrity record is malformed")
    return files


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
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
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
        found = _remembered(path, digest, lambda: _pt2_digest(path, digest))
        if found != digest:
            raise _changed(
                path, f"the package's contents (code, weights, metadata) differ from {_DIFFER}"
            )
        return
    source = sidecar_path(path) if kind == "tensorrt" else path
    found = _remembered(source, digest, lambda: _sealed_file_digest(source, digest))
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
    for name, sha in _files_record(record, path).items():
        data = path.parent / name
        if not data.is_file():
            raise ExportError(
                f"Engine {path} keeps its weights in {name}, which is not beside it; copy the "
                ".onnx file together with its weight file."
            )
        if file_sha256(data) != sha:
            raise _changed(path, f"its weight file {name} differs from {_DIFFER}")

"""A Triton Inference Server model repository for an engine, as the official container loads it.

::

    REPO/MODEL/config.pbtxt         platform, batching, inputs, outputs, instances, metadata
    REPO/MODEL/1/model.onnx         the engine (onnxruntime_onnx), or 1/model.plan (tensorrt_plan)
    REPO/MODEL/labels_<task>.txt    each task's class names, one per line, in class order
    REPO/MODEL/surgery-edge-model.json  the marker: what wrote the folder, from which engine,
                                    and every file it holds

``docker run --gpus all -v $PWD/REPO:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3
tritonserver --model-repository=/models`` serves it unchanged. The configuration:

- ``max_batch_size`` and ``dynamic_batching`` (preferred batch sizes, queue delay): requests for
  different tasks of a routed engine share one engine call;
- inputs ``images`` ([3, H, W], the graph's dtype) and, for routed engines, ``task_ids``
  (INT64, [1] per request, reshaped to the graph's scalar-per-row);
- outputs ``logits`` / ``probs`` (routed, [C_max]) or ``logits_<task>`` (all-tasks, [C_task],
  with ``label_filename``, so Triton's classification extension returns class names);
- ``instance_group`` (KIND_GPU or KIND_CPU, count) and, for ONNX on a GPU, ONNX Runtime's
  TensorRT execution accelerator (FP16 when asked);
- the engine metadata (JSON) as the model parameter ``surgery_edge``, and the label file of
  each task as ``task_labels``.

Everything is checked against the engine before the model folder is published (atomically):
the inputs and outputs against the ONNX graph (or, for a TensorRT plan, its metadata), and the
text against Triton's own schema (``tritonclient.grpc.model_config_pb2``) where tritonclient is
installed. :func:`validate_repository` runs both checks on any repository. Neither torch nor
the ONNX exporter is imported here.

The writer never replaces what it did not write: an existing ``REPO/MODEL`` is written into
only when it holds the marker and nothing but the files the marker lists; anything else there
(a user's folder, a run's ``engines`` or ``checkpoints``, a file) is refused before anything is
written (:func:`check_model_folder`). Into its own folder it writes the engine as the next
version (``REPO/MODEL/2/model.onnx``, ...: Triton serves the newest; the marker records each
version's engine, digest and tasks, :mod:`surgery_edge.runtime.versions`), or, when asked
(``overwrite``), replaces the folder with the engine as version 1 alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery_edge import __version__
from surgery_edge.engine_format import (
    EngineMetadata,
    EngineMode,
    Precision,
    TensorSpec,
    effective_precision,
    engine_kind,
    io_specs,
    read_metadata,
    validate_metadata,
    verify_engine,
)
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.io import check_writable, sha256_file, staged_dir, write_text_atomic
from surgery_edge.runtime.triton_config import (
    META_PARAMETER,
    TRITON_TYPES,
    Batching,
    Enum,
    check_integer,
    check_model_name,
    model_config_pb2,
    parameters,
    string_map,
    tensor_config,
    to_pbtxt,
)
from surgery_edge.runtime.versions import MARKER, WRITER, read_marker, version_numbers

PLATFORMS = {
    "onnx": ("onnxruntime_onnx", "model.onnx"),
    "tensorrt": ("tensorrt_plan", "model.plan"),
}
KINDS = ("gpu", "cpu")
# ONNX TensorProto element types -> numpy's names (the engine format's)
ONNX_TYPES = {1: "float32", 2: "uint8", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
              11: "float64", 16: "bfloat16"}  # fmt: skip
_FILE_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class TritonOptions:
    """How Triton serves the engine.

    Args:
        name: the model's name (default: the engine file's name without its suffix).
        max_batch: ``max_batch_size``: the most rows Triton puts in one engine call (for a
            TensorRT plan, at most its profile's largest batch).
        preferred_batches: batch sizes the dynamic batcher aims for (default: none, i.e. as
            large as the queue allows).
        max_queue_delay_us: how long a request may wait for others to join its batch (0:
            Triton's default).
        instances: engine instances per device (``instance_group.count``).
        kind: ``gpu`` (KIND_GPU: ``instances`` on every GPU) or ``cpu``.
        accelerator: ONNX on a GPU: let ONNX Runtime run the graph through TensorRT.
        accelerator_fp16: that TensorRT accelerator in FP16.
        accelerator_workspace_gb: its workspace limit.
    """

    name: str | None = None
    max_batch: int = 32
    preferred_batches: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    instances: int = 1
    kind: str = "gpu"
    accelerator: bool = True
    accelerator_fp16: bool = False
    accelerator_workspace_gb: float = 1.0

    @property
    def batching(self) -> Batching:
        """The batching settings, as the serving repository has them too."""
        return Batching(self.max_batch, self.preferred_batches, self.max_queue_delay_us)

    def check(self) -> TritonOptions:
        """``self`` if every value is usable; an error naming the first that is not."""
        self.batching.check()
        check_integer("--instances", self.instances, 1)
        if self.kind not in KINDS:
            raise ConfigError(
                f"Unknown instance kind {self.kind!r}; use one of: {', '.join(KINDS)}."
            )
        if not self.accelerator_workspace_gb > 0:
            raise ConfigError(
                f"The accelerator workspace must be positive, got {self.accelerator_workspace_gb}."
            )
        return self


def write_repository(
    engine: str | os.PathLike,
    repo: str | os.PathLike,
    options: TritonOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``engine`` as one model of the Triton model repository ``repo``.

    Other models already in ``repo`` are kept. An existing ``repo/<name>`` that this writer
    made (:func:`check_model_folder`) gets the engine as its next version (nothing is written
    when its newest version is this engine with this config), or with ``overwrite`` is
    replaced (atomically: a failure leaves it as it was) by the engine as version 1; anything
    else there is refused with ExportError.

    Args:
        engine: an ONNX engine (``.onnx``) or a TensorRT plan (``.plan`` / ``.engine`` with its
            ``.json`` metadata sidecar) made by ``surgery-edge export``.
        repo: the repository folder (created if needed).
        options: batching, instances and accelerator settings.
        overwrite: replace a model folder of the same name that this writer made (all its
            versions) instead of adding a version to it.

    Returns:
        The model's folder, ``repo/<name>``.
    """
    engine, opts = Path(engine), (options or TritonOptions()).check()
    kind = _engine_kind(engine)
    meta = read_metadata(engine, kind)
    verify_engine(engine, meta, kind)  # a changed copy is not published to a server
    name = check_model_name(opts.name or engine.stem, "Model name (--name)")
    repo = Path(repo)
    marker = check_model_folder(repo, name)
    if kind == "tensorrt":
        profile_max = int(meta.get("tensorrt", {}).get("max_batch", 0))
        if profile_max and opts.max_batch > profile_max:
            raise ConfigError(
                f"--max-batch {opts.max_batch} exceeds the largest batch of TensorRT engine "
                f"{engine}'s optimisation profile ({profile_max}); lower it, or rebuild the "
                "engine with a larger --max-batch."
            )
    graph = engine_io(engine, kind, meta)
    labels = _label_files(meta, engine)
    config = model_config(name, kind, meta, graph, labels, opts)
    _check_io(config["input"], config["output"], graph, engine)
    if marker is not None and not overwrite:
        return _add_version(repo, name, marker, (engine, kind, meta), labels, config)
    with staged_dir(repo / name) as tmp:
        _stage_version(tmp, 1, (engine, kind, meta), labels, config)
        _write_marker(tmp, name, engine, [_version_entry(1, engine, meta)])
        check_model_folder(repo, name)  # nothing else appeared there meanwhile
    return repo / name


def _stage_version(
    folder: Path,
    version: int,
    source: tuple[Path, str, EngineMetadata],
    labels: dict[str, str],
    config: dict[str, Any],
) -> None:
    """The engine as ``folder/<version>``, its label files and config beside it, checked."""
    engine, kind, meta = source
    (folder / str(version)).mkdir()
    _copy_engine(engine, kind, folder / str(version))
    for task, file in labels.items():
        names = meta.class_names[meta.tasks.index(task)]
        (folder / file).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    (folder / "config.pbtxt").write_text(to_pbtxt(config), encoding="utf-8")
    if model_config_pb2() is not None:
        _validate_model(folder, config["name"])


def _add_version(
    repo: Path,
    name: str,
    marker: dict[str, Any],
    source: tuple[Path, str, EngineMetadata],
    labels: dict[str, str],
    config: dict[str, Any],
) -> Path:
    """The engine as the next version of this writer's model folder ``repo/name``.

    The version is staged beside the folder and checked; then the marker is rewritten to list
    its files, and the version folder moves in with one rename (a reader takes a version as
    published when both hold: :func:`surgery_edge.runtime.versions.published`), then the
    label files and the config (each replaced atomically)."""
    folder, (engine, _, meta) = repo / name, source
    entries = [e for e in marker.get("versions", []) if isinstance(e, dict)]
    newest = entries[-1] if entries else {}
    config_file = folder / "config.pbtxt"
    same_config = config_file.is_file() and config_file.read_text("utf-8") == to_pbtxt(config)
    if same_config and newest.get("sha256") == sha256_file(engine):
        return folder  # already the newest version
    recorded = [e["version"] for e in entries if isinstance(e.get("version"), int)]
    version = max([0, *version_numbers(folder), *recorded]) + 1
    # named as io.staged_dir names its folders: a killed writer's stage is removed by the next
    with tempfile.TemporaryDirectory(prefix=f".{name}.staged-{os.getpid()}.", dir=repo) as tmp:
        tmp = Path(tmp)
        _stage_version(tmp, version, source, labels, config)
        staged = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        check_model_folder(repo, name)  # nothing else appeared there meanwhile
        entries.append(_version_entry(version, engine, meta))
        files = sorted({*marker["files"], *staged})
        record = {**marker, "version": __version__, "engine": str(engine.resolve()),
                  "files": files, "versions": entries}  # fmt: skip
        write_text_atomic(folder / MARKER, json.dumps(record, indent=2) + "\n")
        os.replace(tmp / str(version), folder / str(version))
        for file in [*labels.values(), "config.pbtxt"]:
            os.replace(tmp / file, folder / file)
    return folder


def _version_entry(version: int, engine: Path, meta: EngineMetadata) -> dict[str, Any]:
    """What the marker records of one version: its engine, digest and task set."""
    return {
        "version": version,
        "engine": str(engine.resolve()),
        "sha256": sha256_file(engine),
        "tasks": list(meta.tasks),
        "mode": str(meta.mode),
        "precision": str(meta.precision),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def check_model_folder(repo: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """Refuse (ExportError) a model folder ``repo/name`` that the writer may not write into.

    Refused: ``repo`` or ``repo/name`` is a file or a link; ``repo/name`` is a folder without
    this writer's marker (a user's folder, a run's ``engines``), or one that holds files the
    marker does not list (added since: they would be lost). Nothing is written here;
    :func:`write_repository` calls it first, so ``export --triton-repo`` can call it before
    any export work.

    Returns:
        The folder's marker (the writer adds a version to it), or None when there is no
        folder yet.
    """
    repo = Path(repo)
    check_model_name(name, "Model name (--name)")
    check_writable(repo, "model repository")
    folder = repo / name
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ExportError(
            f"The model folder {folder} exists and is not a folder (a file or a link), so it "
            "was not replaced. Choose another --name or --out, or move it away."
        )
    if not folder.exists():
        return None
    marker = read_marker(folder)
    if marker is None:
        raise ExportError(
            f"{folder} exists and was not written by `{WRITER}` (it holds no valid {MARKER}), "
            "so nothing in it was replaced. Choose another --name or --out, or move the folder "
            "away."
        )
    unlisted = _unlisted(folder, marker["files"])
    if unlisted:
        shown = ", ".join(unlisted[:3]) + (
            f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
        )
        raise ExportError(
            f"The model folder {folder} was written by `{WRITER}` but now also holds {shown}, "
            "which it did not write, so nothing was written there. Move those away, or choose "
            "another --name or --out."
        )
    return marker


def _write_marker(folder: Path, name: str, engine: Path, versions: list[dict[str, Any]]) -> None:
    """The marker: who wrote the folder, from what, every file in it (relative paths) and
    what each version holds."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    marker = {"written_by": WRITER, "version": __version__, "model": name,
              "engine": str(engine.resolve()), "files": files, "versions": versions}  # fmt: skip
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _unlisted(folder: Path, listed: list[str]) -> list[str]:
    """What ``folder`` holds beside ``listed`` files, the marker and their folders; links
    are never followed and always count."""
    keep = {MARKER, *listed}
    parents = {p.as_posix() for f in listed for p in Path(f).parents if p != Path(".")}
    out = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        for entry in sorted(dirs + files):
            rel = (base / entry).as_posix()
            is_dir = entry in dirs and not (Path(root) / entry).is_symlink()
            if rel not in (parents if is_dir else keep):
                out.append(rel + "/" if is_dir else rel)
        dirs[:] = [d for d in dirs if (base / d).as_posix() in parents]
    return out


def model_config(
    name: str,
    kind: str,
    meta: EngineMetadata,
    graph: tuple[list[TensorSpec], list[TensorSpec]],
    labels: dict[str, str],
    opts: TritonOptions,
) -> dict[str, Any]:
    """The ``inference.ModelConfig`` of the engine, as a dict for :func:`to_pbtxt`."""
    inputs, outputs = graph
    config: dict[str, Any] = {
        "name": name,
        "platform": PLATFORMS[kind][0],
        **opts.batching.config(),
        "input": [tensor_config(t) for t in inputs],
        "output": [
            {**tensor_config(t), "label_filename": labels.get(t.name.removeprefix("logits_"))}
            if meta.mode is EngineMode.ALL_TASKS
            else tensor_config(t)
            for t in outputs
        ],
        "instance_group": [{"count": opts.instances, "kind": Enum(f"KIND_{opts.kind.upper()}")}],
    }
    if kind == "onnx" and opts.kind == "gpu" and opts.accelerator:
        half = opts.accelerator_fp16 or effective_precision(meta) is Precision.FP16
        precision = "FP16" if half else "FP32"
        workspace = int(opts.accelerator_workspace_gb * 2**30)
        config["optimization"] = {
            "execution_accelerators": {
                "gpu_execution_accelerator": [
                    {
                        "name": "tensorrt",
                        "parameters": string_map(
                            {"precision_mode": precision, "max_workspace_size_bytes": workspace}
                        ),
                    }
                ]
            }
        }
    config["parameters"] = parameters(
        {META_PARAMETER: json.dumps(meta.to_dict()), "task_labels": labels}
    )
    return config


# --- what the engine takes and gives -------------------------------------------------------


def _engine_kind(engine: Path) -> str:
    if not engine.is_file():
        raise ExportError(f"Engine file {engine} does not exist. Check the path.")
    kind = engine_kind(engine)
    if kind not in PLATFORMS:
        raise ExportError(
            f"{engine} is an AOTInductor package; Triton's official backends serve ONNX and "
            "TensorRT engines. Give the .onnx (or .plan) export, or serve the .pt2 with "
            "`surgery-edge serve`."
        )
    return kind


def engine_io(
    engine: Path, kind: str, meta: EngineMetadata
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The engine's inputs and outputs (the batch dimension first), in metadata order: read
    from the ONNX graph, or (a TensorRT plan cannot be read without TensorRT) its metadata."""
    if kind == "onnx":
        return _onnx_io(engine, meta)
    return io_specs(meta)


def _onnx_io(engine: Path, meta: EngineMetadata) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx  # deferred: only ONNX engines are read here, without their weights

    graph = onnx.load(str(engine), load_external_data=False).graph
    initialisers = {t.name for t in graph.initializer}

    def specs(values, names: tuple[str, ...]) -> list[TensorSpec]:
        by_name = {v.name: v for v in values if v.name not in initialisers}
        if set(by_name) != set(names):
            raise ExportError(
                f"Engine {engine}: its graph has {sorted(by_name)} where its metadata names "
                f"{list(names)}; re-export it."
            )
        out = []
        for n in names:
            t = by_name[n].type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            if not dims or dims[0] != -1:
                raise ExportError(
                    f"Engine {engine}: {n!r} has no dynamic batch dimension ({dims}); Triton "
                    "batches along the first dimension. Re-export it with `surgery-edge export`."
                )
            if t.elem_type not in ONNX_TYPES:
                raise ExportError(f"Engine {engine}: {n!r} has an unsupported element type.")
            out.append(TensorSpec(n, ONNX_TYPES[t.elem_type], ("batch", *dims[1:])))
        return out

    return specs(graph.input, meta.inputs), specs(graph.output, meta.outputs)


def _label_files(meta: EngineMetadata, engine: Path) -> dict[str, str]:
    """``{task: label file name}``: ``labels_<task>.txt``, the task's name with anything but
    letters, digits, ``_ . -`` as ``_``. Two tasks whose files would be one (also on a file
    system that ignores case) are refused rather than written into one file."""
    files: dict[str, str] = {}
    taken: dict[str, str] = {}
    for task in meta.tasks:
        file = f"labels_{_FILE_UNSAFE.sub('_', task)[:100]}.txt"
        other = taken.setdefault(file.lower(), task)
        if other != task:
            raise ExportError(
                f"Tasks {other!r} and {task!r} of {engine} would share the label file {file} "
                "(names are kept to letters, digits, '_', '.', '-' in file names). Rename one "
                "of them and re-export the engine."
            )
        files[task] = file
    return files


def _copy_engine(engine: Path, kind: str, version: Path) -> None:
    """The engine as ``1/model.onnx`` (with any external weight files under the names the
    graph records) or ``1/model.plan``."""
    shutil.copyfile(engine, version / PLATFORMS[kind][1])
    if kind != "onnx":
        return
    import onnx  # deferred: see _onnx_io

    graph = onnx.load(str(engine), load_external_data=False).graph
    locations = {
        entry.value
        for t in graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    for location in sorted(locations):
        source = engine.parent / location
        if not source.is_file() or Path(location).is_absolute() or ".." in Path(location).parts:
            raise ExportError(
                f"Engine {engine} keeps weights in {location!r}, which is not a file beside "
                "it; keep the .onnx and its .data file together."
            )
        shutil.copyfile(source, version / location)


# --- checking a repository -----------------------------------------------------------------


def validate_repository(repo: str | os.PathLike) -> dict[str, Any]:
    """Check every model of a Triton model repository written by :func:`write_repository`.

    Each ``config.pbtxt`` is parsed with Triton's schema (``tritonclient.grpc.model_config_pb2``,
    protobuf text format) and compared with its engine: the inputs and outputs (names, dtypes,
    shapes) against the ONNX graph or the plan's metadata, the metadata parameter, the label
    files.

    Returns:
        ``{model name: inference.ModelConfig}``.
    """
    repo = Path(repo)
    models = sorted(p.parent for p in repo.glob("*/config.pbtxt"))
    if not models:
        raise ExportError(f"{repo} holds no model (no <model>/config.pbtxt).")
    return {m.name: _validate_model(m, m.name) for m in models}


def _validate_model(folder: Path, name: str):
    from google.protobuf import text_format  # deferred: with tritonclient's schema below

    pb2 = model_config_pb2()
    if pb2 is None:
        raise ExportError(
            "Checking a Triton model repository needs tritonclient: "
            "`pip install 'surgery-edge[serve]'`."
        )
    config_path = folder / "config.pbtxt"
    try:
        config = text_format.Parse(config_path.read_text(encoding="utf-8"), pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ExportError(f"{config_path} is not a valid Triton model config: {e}") from None
    if config.name != name:
        raise ExportError(f"{config_path} names the model {config.name!r}, not {name!r}.")
    kinds = {platform: kind for kind, (platform, _) in PLATFORMS.items()}
    if config.platform not in kinds:
        raise ExportError(f"{config_path}: platform {config.platform!r} is not written here.")
    kind = kinds[config.platform]
    engine = folder / str(max(version_numbers(folder), default=1)) / PLATFORMS[kind][1]
    if not engine.is_file():
        raise ExportError(f"{config_path}: the model file {engine} is missing.")
    if META_PARAMETER not in config.parameters:
        raise ExportError(f"{config_path} lacks the {META_PARAMETER!r} parameter.")
    meta = validate_metadata(
        json.loads(config.parameters[META_PARAMETER].string_value), config_path
    )
    if kind == "onnx" and read_metadata(engine, kind).to_dict() != meta.to_dict():
        raise ExportError(f"{config_path}: its metadata parameter is not {engine}'s metadata.")
    labels = json.loads(config.parameters["task_labels"].string_value)
    for task, names in zip(meta.tasks, meta.class_names):
        file = folder / labels[task]
        if not file.is_file() or file.read_text(encoding="utf-8").splitlines() != list(names):
            raise ExportError(f"{config_path}: label file {file} does not hold {task}'s classes.")

    def entries(items) -> list[dict[str, Any]]:
        out = []
        for item in items:
            entry = {
                "name": item.name,
                "data_type": pb2.DataType.Name(item.data_type),
                "dims": list(item.dims),
            }
            if item.HasField("reshape"):
                entry["reshape"] = {"shape": list(item.reshape.shape)}
            out.append(entry)
        return out

    graph = engine_io(engine, kind, meta)
    _check_io(entries(config.input), entries(config.output), graph, config_path)
    if config.max_batch_size < 1 or not config.HasField("dynamic_batching"):
        raise ExportError(f"{config_path}: expected batching (max_batch_size >= 1, dynamic).")
    return config


def _check_io(
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    graph: tuple[list[TensorSpec], list[TensorSpec]],
    where: Any,
) -> None:
    """The config's inputs and outputs must be the engine's: same names, dtypes and shapes
    (a config shape is its ``reshape`` where it has one)."""
    for section, entries, specs in (("input", inputs, graph[0]), ("output", outputs, graph[1])):
        got = {
            e["name"]: (
                str(e["data_type"]),
                tuple(e["reshape"]["shape"] if "reshape" in e else e["dims"]),
            )
            for e in entries
        }
        want = {t.name: (TRITON_TYPES[t.dtype], tuple(t.shape[1:])) for t in specs}
        if got != want:
            raise ExportError(
                f"{where}: the config's {section}s {got} do not match the engine's {want}."
            )

"""Triton model repositories for the official container: parsed with Triton's own schema
(``tritonclient.grpc.model_config_pb2``) and checked against the ONNX graph; the writer never
replaces a folder it did not write."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import onnx
import pytest
from cli_checks import user_error
from google.protobuf import text_format
from image_files import png_bytes
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.engine_format import (
    INTEGRITY_KEY,
    file_sha256,
    read_onnx_metadata,
    write_sidecar,
)
from surgery_edge.errors import ExportError, SurgeryEdgeError
from surgery_edge.export.triton import (
    MARKER,
    TritonOptions,
    validate_repository,
    write_repository,
)

pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse(model_dir) -> pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb2.ModelConfig())


def graph_io(path) -> dict[str, tuple[str, list[int]]]:
    """The ONNX graph's inputs and outputs: Triton dtype name and shape without the batch."""
    graph = onnx.load(str(path), load_external_data=False).graph
    names = {1: "TYPE_FP32", 7: "TYPE_INT64"}
    out = {}
    for v in [*graph.input, *graph.output]:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        assert dims[0] == -1  # the batch
        out[v.name] = (names[t.elem_type], dims[1:])
    return out


def config_io(config) -> dict[str, tuple[str, list[int]]]:
    def shape(t):
        return list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)

    return {
        t.name: (pb2.DataType.Name(t.data_type), shape(t)) for t in [*config.input, *config.output]
    }


def stand_in_plan(folder, meta: dict) -> Path:
    """No TensorRT here: a stand-in plan file with a real sidecar holding ``meta``, sealed for
    the plan's bytes as the TensorRT builder seals it (so the writer's verification passes)."""
    plan = folder / "engine.plan"
    plan.write_bytes(b"stand-in for a serialized TensorRT engine")
    meta = {k: v for k, v in meta.items() if k not in (INTEGRITY_KEY, "engine_sha256")}
    write_sidecar(plan, meta, file_sha256(plan))
    return plan


def test_a_routed_engine_repository(engines, tmp_path):
    engine = engines["dir"] / "surgeryv2-routed.onnx"
    options = TritonOptions(name="v2", max_batch=16, preferred_batches=(4, 16),
                            max_queue_delay_us=500, instances=2, accelerator_fp16=True)  # fmt: skip
    model = write_repository(engine, tmp_path / "repo", options)
    config = parse(model)
    assert config.name == "v2" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config_io(config) == graph_io(engine)
    task_ids = next(t for t in config.input if t.name == "task_ids")
    assert list(task_ids.dims) == [1] and list(task_ids.reshape.shape) == []  # [1] per request
    (group,) = config.instance_group
    assert group.kind == pb2.ModelInstanceGroup.KIND_GPU and group.count == 2
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    meta = read_onnx_metadata(engine)
    assert json.loads(config.parameters["surgery_edge"].string_value) == meta.to_dict()
    labels = json.loads(config.parameters["task_labels"].string_value)
    for task, names in zip(meta.tasks, meta.class_names):
        assert (model / labels[task]).read_text().splitlines() == list(names)
    assert (model / "1" / "model.onnx").read_bytes() == engine.read_bytes()
    assert set(validate_repository(tmp_path / "repo")) == {"v2"}


def test_an_all_tasks_engine_on_cpus_names_its_classes(engines, tmp_path):
    engine = engines["dir"] / "surgery-all-tasks.onnx"
    model = write_repository(engine, tmp_path, TritonOptions(kind="cpu"))
    config = parse(model)
    assert config.name == "surgery-all-tasks"  # the file's name
    assert config_io(config) == graph_io(engine)
    assert not config.HasField("optimization")  # the TensorRT accelerator is for GPUs
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
    meta = read_onnx_metadata(engine)
    for output, names in zip(config.output, meta.class_names):  # Triton's classification
        assert (model / output.label_filename).read_text().splitlines() == list(names)


def test_models_share_a_repository_and_its_own_get_versions(engines, tmp_path):
    """Writing into its own model folder adds a version (the marker records each one's engine,
    digest and tasks); the same engine and config again write nothing; --overwrite starts
    over at version 1; a folder holding a file it did not write is refused."""
    from surgery_edge.runtime.versions import published

    routed = engines["dir"] / "surgeryv2-routed.onnx"
    write_repository(routed, tmp_path, TritonOptions(name="a"))
    write_repository(engines["dir"] / "surgery-all-tasks.onnx", tmp_path, TritonOptions(name="b"))
    again = (
        engines["dir"] / "surgery-all-tasks.onnx",
        tmp_path,
        TritonOptions(name="a", max_batch=8),
    )
    write_repository(*again)
    configs = validate_repository(tmp_path)  # checks the newest version against its config
    assert set(configs) == {"a", "b"} and configs["a"].max_batch_size == 8
    assert [o.name for o in configs["a"].output][0].startswith("logits_")
    assert [(v.version, v.engine.name) for v in published(tmp_path / "a")] == [
        (1, "model.onnx"),
        (2, "model.onnx"),
    ]
    assert (tmp_path / "a" / "1" / "model.onnx").read_bytes() == routed.read_bytes()  # kept
    marker = json.loads((tmp_path / "a" / MARKER).read_text())
    assert marker["engine"].endswith("surgery-all-tasks.onnx") and "2/model.onnx" in marker["files"]
    assert [v["version"] for v in marker["versions"]] == [1, 2]
    assert marker["versions"][1]["tasks"] == list(read_onnx_metadata(again[0]).tasks)
    assert marker["versions"][0]["mode"] == "routed" and len(marker["versions"][1]["sha256"]) == 64
    write_repository(*again)  # the newest version already: nothing written
    assert len(published(tmp_path / "a")) == 2
    assert not list(tmp_path.glob(".a.staged-*"))
    write_repository(*again[:2], TritonOptions(name="a", max_batch=4))  # another config
    assert len(published(tmp_path / "a")) == 3
    assert validate_repository(tmp_path)["a"].max_batch_size == 4
    write_repository(*again, overwrite=True)
    assert [v.version for v in published(tmp_path / "a")] == [1]
    assert graph_io(tmp_path / "a" / "1" / "model.onnx")["images"]  # the engine was replaced
    # a file added to its folder since is not the writer's: kept, even with --overwrite
    (tmp_path / "a" / "2").mkdir()
    (tmp_path / "a" / "2" / "model.onnx").write_bytes(b"a user's second version")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"also holds 2/, which"):
            write_repository(*again, overwrite=overwrite)
    assert (tmp_path / "a" / "2" / "model.onnx").read_bytes() == b"a user's second version"


def test_the_served_version_is_the_newest_the_marker_lists(engines, tmp_path):
    """``serve REPO`` serves the newest version the marker lists: a version folder the writer
    did not list (being written, or a user's) is not one; a folder without the writer's model
    folders, or with several, is refused naming them; a version whose engine no longer
    matches its digest is refused by the roll before the server sees it, and the watcher
    reports it once and goes on serving the old one."""
    import threading

    from surgery_edge.runtime.rolling import VersionedServer
    from surgery_edge.runtime.versions import published, served_model

    write_repository(engines["dir"] / "single-expert.onnx", tmp_path, TritonOptions(name="m"))
    assert served_model(tmp_path) == served_model(tmp_path / "m") == tmp_path / "m"
    (tmp_path / "m" / "7").mkdir()
    (tmp_path / "m" / "7" / "model.onnx").write_bytes(b"not listed")
    assert [v.version for v in published(tmp_path / "m")] == [1]
    (tmp_path / "m" / "7" / "model.onnx").unlink()
    (tmp_path / "m" / "7").rmdir()
    with pytest.raises(ExportError, match="holds no such folders"):
        served_model(tmp_path / "m" / "1")
    write_repository(engines["dir"] / "surgeryv2-routed.onnx", tmp_path, TritonOptions(name="n"))
    with pytest.raises(ExportError, match=r"holds several such folders \(m, n\)"):
        served_model(tmp_path)
    write_repository(engines["dir"] / "surgeryv2-routed.onnx", tmp_path, TritonOptions(name="m"))
    newest = published(tmp_path / "m")[-1]
    engine = bytearray(newest.engine.read_bytes())
    engine[-100] ^= 1  # a changed byte: its digest no longer holds
    newest.engine.write_bytes(bytes(engine))
    said = []
    server = VersionedServer(tmp_path / "m", log=said.append, poll_s=0.01)
    assert server.version == 2
    with pytest.raises(ExportError, match="digest"):
        server.roll(newest)
    server.version = 1  # as if version 1 served: the watcher tries 2, reports it, skips it
    watcher = threading.Thread(target=server._poll)
    watcher.start()
    deadline = time.monotonic() + 20
    while not said and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    server._stop_watching.set()
    watcher.join()
    assert len(said) == 1 and said[0].startswith("engine version 2 not served:"), said
    assert "digest" in said[0] and server.version == 1


def test_a_folder_it_did_not_write_is_never_replaced(engines, tmp_path):
    """A user's folder, a run's ``engines`` and ``checkpoints`` (on a copy of the run), a file
    or a link where the model folder goes: refused with exit 2 naming it, with or without
    --overwrite, and nothing in them changes."""
    run = tmp_path / "run"
    shutil.copytree(engines["dir"].parent, run)
    engine = run / "engines" / "surgeryv2-routed.onnx"
    user = tmp_path / "repo" / "mine"
    user.mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    (tmp_path / "repo" / "afile").write_text("a file")
    (tmp_path / "repo" / "alink").symlink_to(user)

    def snapshot(folder):
        return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = snapshot(run), snapshot(tmp_path / "repo")
    cases = [(run, "engines", "not written by"), (run, "checkpoints", "not written by"),
             (tmp_path / "repo", "mine", "not written by"),
             (tmp_path / "repo", "afile", "is not a folder"),
             (tmp_path / "repo", "alink", "is not a folder")]  # fmt: skip
    for out, name, message in cases:
        for overwrite in ([], ["--overwrite"]):
            args = ["triton-repo", str(engine), "--out", str(out), "--name", name, *overwrite]
            said = " ".join(user_error(args).split())
            assert message in said and str(out / name) in said, said
    assert (snapshot(run), snapshot(tmp_path / "repo")) == before
    assert sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in engines["dir"].parent.iterdir()
    )  # no staged or half-written folder left either
    with pytest.raises(SurgeryEdgeError, match="is a file, not a folder"):
        write_repository(engine, tmp_path / "repo" / "afile", TritonOptions(name="m"))


def test_tasks_whose_label_files_collide_are_refused(engines, tmp_path):
    """Tasks ``a b`` and ``A_b`` would both be ``labels_a_b.txt`` (on a file system that
    ignores case): refused, nothing written."""
    meta = read_onnx_metadata(engines["dir"] / "surgeryv2-routed.onnx").to_dict()
    plan = stand_in_plan(tmp_path, {**meta, "tasks": ["a b", "A_b", "c"]})
    with pytest.raises(ExportError, match=r"'a b' and 'A_b' .* share the label file labels_A_b"):
        write_repository(plan, tmp_path / "repo", TritonOptions(max_batch=8))
    assert not (tmp_path / "repo" / "engine").exists()
    plan = stand_in_plan(tmp_path, {**meta, "tasks": ["a b", "ab", "c"]})
    model = write_repository(plan, tmp_path / "repo", TritonOptions(max_batch=8))
    labels = json.loads(parse(model).parameters["task_labels"].string_value)
    assert labels == {"a b": "labels_a_b.txt", "ab": "labels_ab.txt", "c": "labels_c.txt"}


def test_weights_in_an_external_file_travel_with_the_graph(engines, tmp_path):
    big = tmp_path / "src" / "big.onnx"
    big.parent.mkdir()
    proto = onnx.load(str(engines["dir"] / "surgeryv2-routed.onnx"))
    from surgery_edge.export.onnx import write_engine

    write_engine(proto, big, external_data=True)  # big.onnx.data, sealed as an export seals it
    model = write_repository(big, tmp_path / "repo", TritonOptions(name="big"))
    assert (model / "1" / "big.onnx.data").read_bytes() == (
        big.parent / "big.onnx.data"
    ).read_bytes()
    from surgery_edge.runtime import load

    (row,) = load(model / "1" / "model.onnx", device="cpu").predict(png_bytes(), task="shapes")
    assert row.ok  # ONNX Runtime finds the weights beside the copied graph


def test_validation_finds_a_config_that_does_not_fit_the_engine(engines, tmp_path):
    model = write_repository(engines["dir"] / "surgeryv2-routed.onnx", tmp_path)
    text = (model / "config.pbtxt").read_text()
    (model / "config.pbtxt").write_text(
        text.replace("dims: 16\n  dims: 16", "dims: 32\n  dims: 32")
    )
    with pytest.raises(ExportError, match=r"config.pbtxt.*inputs"):
        validate_repository(tmp_path)
    (model / "config.pbtxt").write_text(text.replace("max_batch_size", "max_batch"))
    with pytest.raises(ExportError, match="not a valid Triton model config"):
        validate_repository(tmp_path)
    (model / "config.pbtxt").write_text(text)
    next(model.glob("labels_*.txt")).write_text("cat\ndog\n")
    with pytest.raises(ExportError, match="label file"):
        validate_repository(tmp_path)


def test_a_tensorrt_plan_takes_its_shapes_from_its_metadata(engines, tmp_path):
    """No TensorRT here: a stand-in plan file with a real metadata sidecar checks the layout
    (model.plan, platform tensorrt_plan) and the limit of the plan's optimisation profile."""
    meta = read_onnx_metadata(engines["dir"] / "surgeryv2-routed.onnx").to_dict()
    plan = stand_in_plan(tmp_path, {**meta, "tensorrt": {"max_batch": 8}})
    with pytest.raises(SurgeryEdgeError, match="optimisation profile"):
        write_repository(plan, tmp_path / "repo", TritonOptions(max_batch=32))
    model = write_repository(plan, tmp_path / "repo", TritonOptions(max_batch=8))
    config = parse(model)
    assert config.platform == "tensorrt_plan" and (model / "1" / "model.plan").is_file()
    assert config_io(config) == graph_io(engines["dir"] / "surgeryv2-routed.onnx")
    assert not config.HasField("optimization")


def test_a_changed_engine_is_not_published(engines, tmp_path):
    """The writer verifies the engine's digest first: a copy with one byte flipped, or a plan
    other than the one its sidecar was written for, is refused and nothing is written."""
    onnx_copy = tmp_path / "e.onnx"
    data = bytearray((engines["dir"] / "surgeryv2-routed.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_copy.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="changed or corrupted after export"):
        write_repository(onnx_copy, tmp_path / "repo")
    meta = read_onnx_metadata(engines["dir"] / "surgeryv2-routed.onnx").to_dict()
    del meta[INTEGRITY_KEY]
    plan = tmp_path / "engine.plan"
    write_sidecar(plan, meta, file_sha256(engines["dir"] / "surgeryv2-routed.onnx"))
    plan.write_bytes(b"another plan than the sidecar's")
    with pytest.raises(ExportError, match="written for another engine"):
        write_repository(plan, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (TritonOptions(max_batch=0), "--max-batch"),
        (TritonOptions(max_batch=4, preferred_batches=(8,)), "--preferred-batch"),
        (TritonOptions(kind="tpu"), "instance kind"),
        (TritonOptions(name="a/b"), "cannot name a Triton model"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(engines, tmp_path, options, match):
    with pytest.raises(SurgeryEdgeError, match=match):
        write_repository(engines["dir"] / "surgeryv2-routed.onnx", tmp_path / "repo", options)
    assert not (tmp_path / "repo").exists()


def test_an_aoti_package_is_refused(tmp_path):
    package = tmp_path / "engine.pt2"
    package.write_bytes(b"PK")
    with pytest.raises(ExportError, match="AOTInductor"):
        write_repository(package, tmp_path / "repo")


def test_the_triton_repo_command(engines, tmp_path):
    engine = engines["dir"] / "surgery-all-tasks.onnx"
    args = ["--name", "v1", "--kind", "cpu", "--preferred-batch", "8"]
    result = CliRunner().invoke(app, ["triton-repo", str(engine), "--out", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    assert "tritonserver --model-repository" in result.output
    assert list(validate_repository(tmp_path)["v1"].dynamic_batching.preferred_batch_size) == [8]
    out = user_error(["triton-repo", str(engine), "--out", str(tmp_path), "--kind", "tpu"])
    assert "tpu" in out
    out = user_error(["triton-repo", str(tmp_path / "nope.onnx"), "--out", str(tmp_path)])
    assert "does not exist" in out


def test_export_writes_a_triton_repository(run, tmp_path):
    """``export --triton-repo``: the run's engine, exported and placed in a repository."""
    shutil.rmtree(tmp_path / "repo", ignore_errors=True)
    args = ["export", "--run", str(run.layout.root), "--onnx", str(tmp_path / "e.onnx")]
    args += ["--triton-repo", str(tmp_path / "repo"), "--triton-kind", "cpu", "--max-batch", "8"]
    (tmp_path / "repo" / "e").mkdir(parents=True)  # a folder of the model's name, not its own
    assert "not written by" in user_error(args)
    assert not (tmp_path / "e.onnx").exists()  # refused before any export work
    (tmp_path / "repo" / "e").rmdir()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = validate_repository(tmp_path / "repo")["e"]
    assert config.max_batch_size == 8 and list(config.dynamic_batching.preferred_batch_size) == [8]
    assert config_io(config) == graph_io(tmp_path / "e.onnx")


def test_config_text_is_protobufs_and_the_fallback_writes_the_same(engines, monkeypatch):
    """Every config (routed, all-tasks with label files, the accelerator's string map, the
    serving repository's Python models) is written by protobuf's text_format over
    tritonclient's schema; without tritonclient the hand writer gives the same message."""
    from surgery_edge.export.triton import engine_io, model_config
    from surgery_edge.runtime import serving_repository as serving
    from surgery_edge.runtime import triton_config
    from surgery_edge.runtime.serving import ServeOptions

    configs = []
    for file in ("surgeryv2-routed.onnx", "surgery-all-tasks.onnx"):
        engine = engines["dir"] / file
        meta = read_onnx_metadata(engine)
        labels = {t: f"labels_{t}.txt" for t in meta.tasks}
        graph = engine_io(engine, "onnx", meta)
        opts = TritonOptions(preferred_batches=(4,), accelerator_fp16=True)
        configs.append(model_config("m", "onnx", meta, graph, labels, opts))
        serve = ServeOptions(preferred_batches=(2, 4), threads=1)
        configs.append(serving._engine_config("e", engine, meta, serve))
        configs.append(serving._task_config(meta.tasks[0], "e", meta, serve))
    written = [triton_config.to_pbtxt(c) for c in configs]
    assert all(text == text_format.MessageToString(parse_text(text)) for text in written)
    monkeypatch.setattr(triton_config, "model_config_pb2", lambda: None)
    by_hand = [triton_config.to_pbtxt(c) for c in configs]
    assert by_hand != written  # the fallback really ran
    assert [parse_text(t) for t in by_hand] == [parse_text(t) for t in written]
    monkeypatch.undo()
    with pytest.raises(ExportError, match="not a Triton model config"):
        triton_config.to_pbtxt({"name": "m", "max_batch": 4})


def parse_text(text: str) -> pb2.ModelConfig:
    return text_format.Parse(text, pb2.ModelConfig())

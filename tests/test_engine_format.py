"""The engine format: modes and precisions parsed once, metadata validated field by field."""

from __future__ import annotations

import copy
import json

import pytest

from surgery_edge.engine_format import (
    EngineMode,
    Precision,
    io_names,
    parse_metadata,
    read_sidecar,
    validate_metadata,
    write_sidecar,
)
from surgery_edge.errors import ExportError

GOOD = {
    "format_version": 3,
    "kind": "engine",
    "tasks": ["digits", "shapes"],
    "class_names": [["0", "1"], ["circle", "square", "star"]],
    "preprocessing": {"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3},
    "method": "surgeryv2",
    "mode": "routed",
    "precision": "fp32",
    "inputs": ["images", "task_ids"],
    "outputs": ["logits", "probs"],
    "merge_recipe": {"method": "task_arithmetic", "lam": 0.3},
}


def test_modes_and_precisions_parse_once_and_list_the_choices():
    assert EngineMode.parse("all-tasks") is EngineMode.ALL_TASKS
    assert EngineMode.parse(EngineMode.ROUTED) is EngineMode.ROUTED
    assert EngineMode.ROUTED == "routed" and str(Precision.FP16) == "fp16"
    with pytest.raises(ExportError, match="Unknown engine mode 'batched'; use one of: routed"):
        EngineMode.parse("batched")
    with pytest.raises(ExportError, match="Unknown precision 'int4'.*fp32, fp16, int8, fp8"):
        Precision.parse("int4")
    assert [p.quantized for p in Precision] == [False, False, True, True]
    assert io_names(EngineMode.ALL_TASKS, ["a", "b"]) == (["images"], ["logits_a", "logits_b"])


def test_a_quantised_engine_carries_its_recipe():
    meta = {**copy.deepcopy(GOOD), "precision": "int8"}
    with pytest.raises(ExportError, match="int8 engine must record its quantization"):
        validate_metadata(meta, "e.onnx")
    meta["quantization"] = {"tool": "onnxruntime.quantization.quantize_dynamic"}
    assert validate_metadata(meta, "e.onnx").precision is Precision.INT8


def test_valid_metadata_becomes_a_typed_record():
    meta = validate_metadata(copy.deepcopy(GOOD), "e.onnx")
    assert meta.mode is EngineMode.ROUTED and meta.precision is Precision.FP32
    assert meta.class_counts == [2, 3] and meta.preprocessing.resize == "shortest"
    assert meta["merge_recipe"]["lam"] == 0.3  # the extra fields stay readable


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda m: m.pop("tasks"), r"lacks \['tasks'\]"),
        (lambda m: m.update(tasks="digits"), "tasks must be a non-empty list"),
        (lambda m: m.update(tasks=["digits", "digits"]), "names task 'digits' more than once"),
        (lambda m: m.update(class_names=[["0", "1"]]), "2 tasks but 1 class-name lists"),
        (lambda m: m.update(class_names=[["0"], []]), "one non-empty list of names per task"),
        (lambda m: m["preprocessing"].update(image_size="16"), "image_size must be a positive"),
        (lambda m: m["preprocessing"].update(mean=[0.5, 0.5]), "mean must be three finite"),
        (lambda m: m["preprocessing"].update(std=[0.2, 0.0, 0.2]), r"std must be three .* > 0"),
        (lambda m: m.update(preprocessing={}), "image_size must be a positive integer"),
        (lambda m: m["preprocessing"].update(resize="crop"), "resize 'crop' is not one of"),
        (lambda m: m.update(mode="batched"), "Unknown engine mode"),
        (lambda m: m.update(outputs=["logits"]), "a routed engine has"),
        (lambda m: m.update(kind="adapters"), "no surgery-edge engine metadata"),
    ],
)
def test_malformed_metadata_names_the_file_and_field(change, pattern):
    meta = copy.deepcopy(GOOD)
    change(meta)
    with pytest.raises(ExportError, match=pattern) as info:
        validate_metadata(meta, "model.onnx")
    assert "model.onnx" in str(info.value)


def test_engines_of_the_first_format_are_refused_with_what_to_do():
    meta = copy.deepcopy(GOOD)
    meta["preprocessing"]["resize"] = "bilinear-antialias"
    with pytest.raises(ExportError, match="stretching bilinear resize.*Re-export"):
        parse_metadata(json.dumps(meta), "old.onnx")
    with pytest.raises(ExportError, match="not valid JSON"):
        parse_metadata("{not json", "old.onnx")


def test_sidecars_are_validated_on_write_and_read(tmp_path):
    engine = tmp_path / "model.plan"
    path = write_sidecar(engine, copy.deepcopy(GOOD))
    assert path.name == "model.plan.json" and read_sidecar(engine).tasks == ("digits", "shapes")
    with pytest.raises(ExportError) as info:
        write_sidecar(tmp_path / "other.plan", {"kind": "engine"})
    assert str(info.value).startswith(f"Engine metadata of {tmp_path / 'other.plan.json'} lacks")
    assert not (tmp_path / "other.plan.json").exists()
    path.write_text("{")
    with pytest.raises(ExportError, match="model.plan.json.*not valid JSON"):
        read_sidecar(engine)


def test_a_sidecar_is_read_only_with_its_own_engine(tmp_path):
    """A TensorRT engine swapped (or half rewritten) under its sidecar is refused, not served
    with another engine's tasks and class names."""
    import hashlib

    engine = tmp_path / "model.plan"
    engine.write_bytes(b"serialized engine A")
    write_sidecar(engine, copy.deepcopy(GOOD), hashlib.sha256(engine.read_bytes()).hexdigest())
    assert read_sidecar(engine).tasks == ("digits", "shapes")
    engine.write_bytes(b"serialized engine B")
    with pytest.raises(ExportError, match="written for another engine than .*model.plan"):
        read_sidecar(engine)


# --- integrity ---------------------------------------------------------------------------------


def _sealed_trt(tmp_path):
    from surgery_edge.engine_format import file_sha256

    engine = tmp_path / "model.plan"
    engine.write_bytes(b"serialized engine A" * 50)
    write_sidecar(engine, copy.deepcopy(GOOD), file_sha256(engine))
    return engine


def test_a_sealed_sidecar_and_its_engine_are_verified(tmp_path):
    from surgery_edge.engine_format import verify_engine

    engine = _sealed_trt(tmp_path)
    sidecar = tmp_path / "model.plan.json"
    verify_engine(engine, read_sidecar(engine), "tensorrt")
    text = sidecar.read_text()
    sidecar.write_text(text.replace('"square"', '"circle"', 1).replace('"circle"', '"square"', 1))
    with pytest.raises(ExportError, match="changed or corrupted.*metadata file model.plan.json"):
        verify_engine(engine, read_sidecar(engine), "tensorrt")
    sidecar.write_text(text)
    unsealed = {**json.loads(text), "format_version": 2}
    del unsealed["integrity"]
    sidecar.write_text(json.dumps(unsealed))
    with pytest.raises(ExportError, match="carries no integrity digest.*format 2.*Re-export"):
        verify_engine(engine, read_sidecar(engine), "tensorrt")
    write_sidecar(engine, copy.deepcopy(GOOD))  # sealed, but without the engine's hash
    with pytest.raises(ExportError, match="engine's bytes differ"):
        verify_engine(engine, read_sidecar(engine), "tensorrt")


def test_each_file_is_hashed_once_while_it_is_unchanged(tmp_path, monkeypatch):
    import os

    from surgery_edge import engine_format
    from surgery_edge.engine_format import verify_engine

    engine = _sealed_trt(tmp_path)
    calls = []
    digest = engine_format.sealed_file_digest
    monkeypatch.setattr(
        engine_format, "sealed_file_digest", lambda *a: calls.append(a) or digest(*a)
    )
    meta = read_sidecar(engine)
    for _ in range(3):
        verify_engine(engine, meta, "tensorrt")
    assert len(calls) == 1
    sidecar = tmp_path / "model.plan.json"
    data = bytearray(sidecar.read_bytes())
    data[data.index(b'"digits"') + 1] ^= 0x20  # "Digits": same size ...
    stat = sidecar.stat()
    sidecar.write_bytes(bytes(data))
    os.utime(sidecar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # ... a new mtime
    with pytest.raises(ExportError, match="changed or corrupted"):
        verify_engine(engine, meta, "tensorrt")
    assert len(calls) == 2


def test_a_pt2_package_is_sealed_and_verified_member_by_member(tmp_path):
    import zipfile

    from surgery_edge.engine_format import read_pt2_metadata, seal_pt2, verify_engine

    # as a compile cache may hand it back: another export's metadata
    stale = {**copy.deepcopy(GOOD), "tasks": ["a", "b"]}
    stored = json.dumps({"surgery_edge": json.dumps(stale), "AOTI_DEVICE_KEY": "cpu"})
    package = tmp_path / "m.pt2"
    with zipfile.ZipFile(package, "w") as z:
        z.writestr("m/data/aotinductor/model/x.wrapper_metadata.json", stored)
        z.writestr("m/data/aotinductor/model/x.wrapper.so", bytes(range(256)) * 40)
    digest = seal_pt2(package, copy.deepcopy(GOOD))
    meta = read_pt2_metadata(package)
    assert meta["integrity"]["sha256"] == digest and meta.tasks == ("digits", "shapes")
    verify_engine(package, meta, "pt2")
    with zipfile.ZipFile(package) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    code = "m/data/aotinductor/model/x.wrapper.so"
    members[code] = members[code][:100] + b"\x00" + members[code][101:]
    with zipfile.ZipFile(package, "w") as z:  # a valid archive, one byte of code changed
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(ExportError, match="m.pt2 was changed or corrupted.*package's contents"):
        verify_engine(package, read_pt2_metadata(package), "pt2")


def test_a_tensorrt_build_with_fp16_kernels_is_an_fp16_engine():
    from surgery_edge.engine_format import effective_precision, half_compute

    plain = validate_metadata(copy.deepcopy(GOOD), "m.onnx")
    assert effective_precision(plain) is Precision.FP32 and not half_compute(plain)
    built = validate_metadata({**copy.deepcopy(GOOD), "tensorrt": {"fp16": True}}, "m.plan.json")
    assert effective_precision(built) is Precision.FP16 and half_compute(built)
    fp32 = validate_metadata({**copy.deepcopy(GOOD), "tensorrt": {"fp16": False}}, "m.plan.json")
    assert effective_precision(fp32) is Precision.FP32


# --- the facts users read: devices, choices, io, messages ----------------------------------------


def test_device_names_are_auto_cpu_cuda_or_cuda_n():
    from surgery_edge.engine_format import check_device, is_device_name

    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:999"):
        assert is_device_name(good) and check_device(good) == good
    for bad in ("gpu", "CPU", "cuda:", "cuda:1000", "cuda:-1", " cpu", "cpu0", "cuda0", None, 0):
        assert not is_device_name(bad)
        with pytest.raises(ExportError) as info:
            check_device(bad)
        assert str(info.value) == f"Unknown device {bad!r}; use auto, cpu, cuda or cuda:N."


def test_a_choice_error_names_what_was_asked_and_every_choice():
    with pytest.raises(ExportError) as info:
        Precision.parse(16)
    assert str(info.value) == "Unknown precision 16; use one of: fp32, fp16, int8, fp8."
    with pytest.raises(ExportError) as info:
        EngineMode.parse("batched", "mode of engine.onnx")
    assert (
        str(info.value) == "Unknown mode of engine.onnx 'batched'; use one of: routed, all-tasks."
    )
    assert Precision.parse(Precision.INT8) is Precision.INT8 and Precision.parse("fp8").quantized


def test_an_all_tasks_engine_has_one_output_per_task_of_its_own_width():
    from surgery_edge.engine_format import io_specs

    meta = validate_metadata(_all_tasks(), "m.onnx")
    inputs, outputs = io_specs(meta)
    assert [str(s) for s in inputs] == ["images float32 [batch, 3, 16, 16]"]
    assert [str(s) for s in outputs] == [
        "logits_digits float32 [batch, 2]",
        "logits_shapes float32 [batch, 3]",
    ]
    routed = io_specs(validate_metadata(copy.deepcopy(GOOD), "m.onnx"))
    assert [str(s) for s in routed[0] + routed[1]] == [
        "images float32 [batch, 3, 16, 16]",
        "task_ids int64 [batch]",
        "logits float32 [batch, 3]",
        "probs float32 [batch, 3]",
    ]


def _all_tasks() -> dict:
    meta = copy.deepcopy(GOOD)
    meta.update(mode="all-tasks", inputs=["images"], outputs=["logits_digits", "logits_shapes"])
    return meta


def test_a_graph_s_inputs_are_checked_against_its_metadata():
    from surgery_edge.engine_format import check_graph_inputs

    meta = validate_metadata(copy.deepcopy(GOOD), "m.onnx")
    images, ids = ("images", "float32", ["b", 3, 16, 16]), ("task_ids", "int64", [None])
    check_graph_inputs("m.onnx", meta, [images, ids])  # dynamic batch by name or None
    check_graph_inputs("m.onnx", meta, [("images", "float32", [4, 3, 16, 16]), ids])
    with pytest.raises(ExportError) as info:
        check_graph_inputs("m.onnx", meta, [images])
    assert str(info.value) == (
        "Engine m.onnx: its graph has inputs ['images'], but its metadata names ['images', "
        "'task_ids']. The metadata does not belong to this graph: re-export it."
    )
    wrong = [
        (("images", "float32", [None, 3, 32, 32]), "float32 [?, 3, 32, 32]"),
        (("images", "float16", ["b", 3, 16, 16]), "float16 [b, 3, 16, 16]"),
        (("images", "float32", ["b", 3, 16]), "float32 [b, 3, 16]"),
        (("images", "float32", ["b", 1, "h", "w"]), "float32 [b, 1, h, w]"),
    ]
    for graph_input, shown in wrong:
        with pytest.raises(ExportError) as info:
            check_graph_inputs("m.onnx", meta, [graph_input, ids])
        assert str(info.value) == (
            f"Engine m.onnx: its graph's input 'images' is {shown}, but its metadata (image_size "
            "16) makes it float32 [batch, 3, 16, 16]. The metadata does not belong to this "
            "graph: re-export the engine."
        )
    with pytest.raises(ExportError, match="input 'task_ids' is int32 \\[\\?\\].*int64 \\[batch\\]"):
        check_graph_inputs("m.onnx", meta, [images, ("task_ids", "int32", [None])])


def test_the_metadata_record_reads_its_fields():
    meta = validate_metadata(copy.deepcopy(GOOD), "e.onnx")
    assert meta.get("merge_recipe") == {"method": "task_arithmetic", "lam": 0.3}
    assert meta.get("quantization") is None and meta.get("quantization", {}) == {}
    assert meta.to_dict() == GOOD and meta.to_dict() is not meta.raw
    assert meta.tasks == ("digits", "shapes") and meta.method == "surgeryv2"
    assert meta.class_names == (("0", "1"), ("circle", "square", "star"))
    assert (meta.inputs, meta.outputs) == (("images", "task_ids"), ("logits", "probs"))


WHERE = "Engine metadata of model.onnx"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: [m.pop("inputs"), m.pop("mode")],
            f"{WHERE} lacks ['mode', 'inputs']; re-export the engine.",
        ),
        (
            lambda m: m.update(tasks=[]),
            f"{WHERE}: tasks must be a non-empty list of names, got [].",
        ),
        (
            lambda m: m.update(tasks=["digits", 3]),
            f"{WHERE}: tasks must be a non-empty list of names, got ['digits', 3].",
        ),
        (
            lambda m: m.update(tasks=["b", "a", "b", "a"], class_names=[["0"]] * 4),
            f"{WHERE} names task 'a' more than once (['b', 'a', 'b', 'a']): a request names its "
            "task, so task names must be unique. Re-export the engine.",
        ),
        (
            lambda m: m.update(class_names={"digits": ["0"]}),
            f"{WHERE}: class_names must be one non-empty list of names per task.",
        ),
        (
            lambda m: m.update(class_names=[["0", 1], ["a"]]),
            f"{WHERE}: class_names must be one non-empty list of names per task.",
        ),
        (
            lambda m: m.update(class_names=[["0", "1"]] * 3),
            f"{WHERE} has 2 tasks but 3 class-name lists; re-export it.",
        ),
        (lambda m: m.update(method=None), f"{WHERE}: method must be a name, got None."),
        (
            lambda m: m.update(precision="int4"),
            f"{WHERE}: Unknown precision 'int4'; use one of: fp32, fp16, int8, fp8. Re-export the "
            "engine.",
        ),
        (
            lambda m: m.update(precision="fp8", quantization="modelopt"),
            f"{WHERE}: a fp8 engine must record its quantization (an object under 'quantization'); "
            "re-export it with `surgery-edge export --precision fp8`.",
        ),
        (
            lambda m: m.update(inputs=["images"]),
            f"{WHERE} names inputs ['images'] and outputs ['logits', 'probs']; a routed engine has "
            "['images', 'task_ids'] and ['logits', 'probs']. Re-export the engine.",
        ),
        (
            lambda m: m.update(mode="all-tasks"),
            f"{WHERE} names inputs ['images', 'task_ids'] and outputs ['logits', 'probs']; a "
            "all-tasks engine has ['images'] and ['logits_digits', 'logits_shapes']. Re-export "
            "the engine.",
        ),
    ],
)
def test_each_malformed_field_is_refused_with_the_whole_message(change, message):
    meta = copy.deepcopy(GOOD)
    change(meta)
    with pytest.raises(ExportError) as info:
        validate_metadata(meta, "model.onnx")
    assert str(info.value) == message


@pytest.mark.parametrize("meta", [None, [], {"kind": "adapters"}, {"tasks": ["a"]}])
def test_what_is_not_engine_metadata_is_refused_saying_what_to_do(meta):
    with pytest.raises(ExportError) as info:
        validate_metadata(meta, "x.onnx")
    assert str(info.value) == (
        "x.onnx carries no surgery-edge engine metadata: it was not exported by surgery-edge, "
        "or it is truncated or corrupt. Re-export it with `surgery-edge export`."
    )


def test_metadata_is_found_among_an_onnx_model_s_properties():
    from surgery_edge.engine_format import META_KEY, metadata_from_props

    props = {"producer": "x", META_KEY: json.dumps(GOOD)}
    assert metadata_from_props(props, "m.onnx").tasks == ("digits", "shapes")
    with pytest.raises(ExportError, match="^m.onnx carries no surgery-edge engine metadata"):
        metadata_from_props({"producer": "x"}, "m.onnx")
    with pytest.raises(ExportError) as info:
        parse_metadata(json.dumps({**GOOD, "method": 3}), "m.onnx")
    assert str(info.value) == "Engine metadata of m.onnx: method must be a name, got 3."
    with pytest.raises(ExportError) as info:
        parse_metadata("[1,", "m.onnx")
    assert str(info.value) == (
        "Engine metadata of m.onnx is not valid JSON (Expecting value: line 1 column 4 (char 3))."
    )


def test_engine_files_are_told_apart_by_suffix_then_by_their_bytes(tmp_path):
    from surgery_edge.engine_format import engine_kind, sidecar_path

    assert [engine_kind(tmp_path / n) for n in ("a.onnx", "B.PT2", "c.engine", "d.plan")] == [
        "onnx",
        "pt2",
        "tensorrt",
        "tensorrt",
    ]
    assert engine_kind(tmp_path / "e.trt") == "tensorrt"
    (tmp_path / "zip").write_bytes(b"PK\x03\x04rest")
    (tmp_path / "graph").write_bytes(b"\x08\x07rest")
    assert engine_kind(tmp_path / "zip") == "pt2" and engine_kind(tmp_path / "graph") == "onnx"
    sidecar_path(tmp_path / "graph").write_text("{}")
    assert sidecar_path(tmp_path / "graph") == tmp_path / "graph.json"
    assert engine_kind(tmp_path / "graph") == "tensorrt"
    with pytest.raises(ExportError) as info:
        engine_kind(tmp_path / "missing")
    assert str(info.value) == f"Engine file {tmp_path / 'missing'} does not exist. Check the path."


def test_metadata_is_read_as_each_kind_stores_it(tmp_path):
    import zipfile

    from surgery_edge.engine_format import read_metadata, read_onnx_metadata, read_pt2_metadata

    engine = tmp_path / "model"
    engine.write_bytes(b"serialized engine")
    write_sidecar(engine, copy.deepcopy(GOOD))
    assert read_metadata(engine).tasks == ("digits", "shapes")  # a sidecar: TensorRT
    assert read_metadata(engine, "tensorrt").method == "surgeryv2"
    package = tmp_path / "m.pt2"
    with zipfile.ZipFile(package, "w") as z:
        z.writestr("m/x.wrapper_metadata.json", json.dumps({"surgery_edge": json.dumps(GOOD)}))
    assert read_metadata(package).tasks == read_metadata(package, "pt2").tasks
    with zipfile.ZipFile(package, "w") as z:
        z.writestr("m/x.wrapper_metadata.json", json.dumps(["not", "an", "object"]))
    with pytest.raises(ExportError, match="m.pt2 carries no surgery-edge engine metadata"):
        read_pt2_metadata(package)
    with zipfile.ZipFile(package, "w") as z:
        z.writestr("m/x.wrapper.so", b"code")
    with pytest.raises(ExportError, match="m.pt2 carries no surgery-edge engine metadata"):
        read_pt2_metadata(package)
    with pytest.raises(ExportError) as info:
        read_pt2_metadata(engine)
    assert str(info.value) == (
        f"{engine} is not a readable AOTInductor package (File is not a zip file); re-export "
        "it with `surgery-edge export --aoti`."
    )
    with pytest.raises(ExportError) as info:
        read_onnx_metadata(engine)
    assert str(info.value).startswith(f"{engine} is not a readable ONNX file (DecodeError: ")


def test_a_pt2_metadata_member_too_large_to_read_is_refused(tmp_path, monkeypatch):
    import zipfile

    from surgery_edge import engine_format
    from surgery_edge.engine_format import read_pt2_metadata

    package = tmp_path / "m.pt2"
    with zipfile.ZipFile(package, "w") as z:
        z.writestr("m/x.wrapper_metadata.json", json.dumps({"surgery_edge": json.dumps(GOOD)}))
        size = z.getinfo("m/x.wrapper_metadata.json").file_size
    monkeypatch.setattr(engine_format, "MAX_METADATA_BYTES", size)
    assert read_pt2_metadata(package).tasks == ("digits", "shapes")  # at the limit: read
    monkeypatch.setattr(engine_format, "MAX_METADATA_BYTES", size - 1)
    with pytest.raises(ExportError) as info:
        read_pt2_metadata(package)
    assert str(info.value) == (
        f"{package} is not a readable AOTInductor package (m/x.wrapper_metadata.json is "
        f"{size:,} bytes); re-export it with `surgery-edge export --aoti`."
    )


def test_a_sidecar_that_is_missing_or_unreadable_is_named(tmp_path):
    engine = tmp_path / "model.plan"
    with pytest.raises(ExportError) as info:
        read_sidecar(engine)
    assert str(info.value) == (
        f"Engine {engine} has no metadata file {engine}.json; it is written next to the engine by "
        "`surgery-edge export`. Keep the two files together."
    )
    (tmp_path / "model.plan.json").write_bytes(b'{"tasks": "\xff"}')
    with pytest.raises(ExportError) as info:
        read_sidecar(engine)
    assert str(info.value).startswith(f"Engine metadata file {engine}.json is unreadable (")
    assert "can't decode byte 0xff" in str(info.value)


def test_a_sidecar_records_its_engine_s_hash_and_is_sealed(tmp_path):
    from surgery_edge.engine_format import file_sha256

    engine = tmp_path / "model.plan"
    engine.write_bytes(b"serialized engine A")
    path = write_sidecar(engine, copy.deepcopy(GOOD), file_sha256(engine))
    stored = json.loads(path.read_text())
    assert stored["engine_sha256"] == file_sha256(engine)
    assert len(stored["integrity"]["sha256"]) == 64 and path.read_text().endswith("}\n")
    assert "engine_sha256" not in json.loads(write_sidecar(engine, copy.deepcopy(GOOD)).read_text())
    engine.unlink()  # the hash is checked only against an engine that is there
    write_sidecar(engine, copy.deepcopy(GOOD), "0" * 64)
    assert read_sidecar(engine).get("engine_sha256") == "0" * 64
    engine.write_bytes(b"serialized engine B")
    with pytest.raises(ExportError) as info:
        read_sidecar(engine)
    assert str(info.value) == (
        f"Metadata file {path} was written for another engine than {engine} (the engine's "
        "checksum differs: a swapped, rebuilt or partly written file). Keep each engine with its "
        "own .json, or re-export it with `surgery-edge export --trt`."
    )


def _sealed_onnx(tmp_path, weights: bool = True):
    """An engine file sealed as the ONNX exporter seals one (the metadata inside its bytes),
    with a weight file beside it; returns its path and metadata."""
    from surgery_edge.engine_format import DIGEST_PLACEHOLDER, file_sha256, write_sealed

    record = {"sha256": DIGEST_PLACEHOLDER}
    if weights:
        (tmp_path / "m.onnx.data").write_bytes(b"weights" * 100)
        record["files"] = {"m.onnx.data": file_sha256(tmp_path / "m.onnx.data")}
    text = json.dumps({**GOOD, "integrity": record})
    path = tmp_path / "m.onnx"
    digest = write_sealed(path, b"graph\x00" + text.encode())
    return path, parse_metadata(text.replace(DIGEST_PLACEHOLDER, digest), path)


def _changed(path, detail: str) -> str:
    return (
        f"Engine {path} was changed or corrupted after export: {detail}. A copy cut short, "
        "damaged on disk or edited by hand (its tasks, class names or preprocessing) would "
        "answer wrongly without an error, so it is not used. Re-export it with `surgery-edge "
        "export`, or copy it again, whole, from where it was exported."
    )


def test_an_onnx_engine_and_its_weight_file_are_verified(tmp_path):
    from surgery_edge.engine_format import verify_engine

    (tmp_path / "alone").mkdir()
    verify_engine(*_sealed_onnx(tmp_path / "alone", weights=False), "onnx")
    path, meta = _sealed_onnx(tmp_path)
    verify_engine(path, meta, "onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(b"weights" * 101)
    with pytest.raises(ExportError) as info:
        verify_engine(path, meta, "onnx")
    detail = "its weight file m.onnx.data differs from the SHA-256 digest its export recorded"
    assert str(info.value) == _changed(path, detail)
    data.unlink()
    with pytest.raises(ExportError) as info:
        verify_engine(path, meta, "onnx")
    assert str(info.value) == (
        f"Engine {path} keeps its weights in m.onnx.data, which is not beside it; copy the .onnx "
        "file together with its weight file."
    )
    path.write_bytes(path.read_bytes().replace(b"graph", b"graph!"))
    with pytest.raises(ExportError) as info:
        verify_engine(path, meta, "onnx")
    detail = "its bytes (graph, weights and metadata) differ from the SHA-256 digest its export"
    assert str(info.value) == _changed(path, f"{detail} recorded")


@pytest.mark.parametrize("files", [["m.onnx.data"], {"../m.onnx.data": "0" * 64}])
def test_an_integrity_record_naming_files_elsewhere_is_refused(tmp_path, files):
    from surgery_edge.engine_format import verify_engine

    path, meta = _sealed_onnx(tmp_path)
    meta.raw["integrity"]["files"] = files
    with pytest.raises(ExportError) as info:
        verify_engine(path, meta, "onnx")
    assert str(info.value) == _changed(path, "its metadata's integrity record is malformed")


@pytest.mark.parametrize(
    ("integrity", "version"), [(None, 3), ({"sha256": "ABC"}, 4), ({"sha256": 7}, 3)]
)
def test_a_format_3_engine_without_a_valid_digest_is_refused_as_changed(
    tmp_path, integrity, version
):
    from surgery_edge.engine_format import verify_engine

    meta = validate_metadata({**GOOD, "format_version": version, "integrity": integrity}, "m")
    with pytest.raises(ExportError) as info:
        verify_engine(tmp_path / "m.onnx", meta, "onnx")
    detail = "its metadata's integrity record is missing or malformed"
    assert str(info.value) == _changed(tmp_path / "m.onnx", detail)


def test_an_engine_of_an_older_format_is_refused_naming_its_version(tmp_path):
    from surgery_edge.engine_format import verify_engine

    old = {k: v for k, v in GOOD.items() if k != "format_version"}
    with pytest.raises(ExportError) as info:
        verify_engine(tmp_path / "m.onnx", validate_metadata(old, "m"), "onnx")
    assert str(info.value) == (
        f"Engine {tmp_path / 'm.onnx'} carries no integrity digest: it was exported by "
        "surgery-edge ? in engine format ?, and this version serves format 3 engines only "
        "(their metadata is bound to their weights, so a changed or damaged copy is refused). "
        "Re-export it with `surgery-edge export`; the run's checkpoints are all it needs."
    )
    old.update(format_version=2, package_version="0.4.0")
    with pytest.raises(ExportError, match="exported by surgery-edge 0.4.0 in engine format 2,"):
        verify_engine(tmp_path / "m.onnx", validate_metadata(old, "m"), "onnx")


def test_a_quantised_engine_with_fp16_layers_computes_in_half_precision():
    from surgery_edge.engine_format import effective_precision, half_compute

    quantised = {**copy.deepcopy(GOOD), "precision": "int8"}
    quantised["quantization"] = {"recipe": {"high_precision": "fp16"}}
    meta = validate_metadata(quantised, "m.onnx")
    assert effective_precision(meta) is Precision.INT8 and half_compute(meta)
    quantised["quantization"] = {"recipe": {"high_precision": "fp32"}}
    assert not half_compute(validate_metadata(quantised, "m.onnx"))
    odd = validate_metadata({**copy.deepcopy(GOOD), "tensorrt": ["fp16"]}, "m.plan.json")
    assert effective_precision(odd) is Precision.FP32 and not half_compute(odd)


def test_an_onnx_engine_s_metadata_is_read_without_its_weights(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from surgery_edge.engine_format import META_KEY, read_metadata

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    model = helper.make_model(graph)
    helper.set_model_props(model, {META_KEY: json.dumps(GOOD)})
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (tmp_path / "m.onnx.data").unlink()  # the weights are not needed to read the metadata
    assert read_metadata(path).tasks == ("digits", "shapes")
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "plain.onnx")
    with pytest.raises(ExportError) as info:
        read_metadata(tmp_path / "plain.onnx")
    assert str(info.value).startswith(f"{tmp_path / 'plain.onnx'} carries no surgery-edge engine")


def test_a_tensorrt_engine_changed_after_its_sidecar_was_read_is_refused(tmp_path):
    from surgery_edge.engine_format import verify_engine

    engine = _sealed_trt(tmp_path)
    meta = read_sidecar(engine)
    verify_engine(engine, meta, "tensorrt")
    engine.write_bytes(b"serialized engine B" * 50)
    with pytest.raises(ExportError) as info:
        verify_engine(engine, meta, "tensorrt")
    detail = "the engine's bytes differ from the SHA-256 its metadata records"
    assert str(info.value) == _changed(engine, detail)

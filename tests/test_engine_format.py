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
    with pytest.raises(ExportError, match="lacks"):
        write_sidecar(tmp_path / "other.plan", {"kind": "engine"})
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

"""Engine integrity: a changed or damaged engine is refused, never served with wrong answers.

One table, (case, engine edited, expected exit, expected message), each case run on a copy of
an engine the tiny run exported, through ``runtime.load``, ``surgery-edge predict`` and
``surgery-edge info``. Run it alone with ``pytest tests/runtime/test_integrity.py``.

"unsealed" edits are what a user (or a damaged copy) does to the file: the export's digest no
longer matches. "resealed" ones recompute the digest after the edit (the digest is a checksum,
not a signature), to show the checks behind it: a graph whose input size disagrees with its
metadata, an element type ONNX does not define (ONNX Runtime's own refusal). Duplicate task
names are refused by the metadata's own validation, before the digest is checked.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from cli_checks import user_error
from image_files import png_bytes
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.errors import ExportError

ROUTED = "surgeryv2-routed.onnx"
CHANGED = "was changed or corrupted after export"
REEXPORT = "Re-export it with `surgery-edge export`, or copy it again"
runner = CliRunner()


def _meta_edit(change: Callable[[dict], None]):
    """Edit the ONNX engine's metadata JSON, as a user would (the digest is left as it was)."""

    def edit(src: Path, dst: Path) -> Path:
        model = onnx.load(str(src))
        prop = next(p for p in model.metadata_props if p.key == "surgery_edge")
        meta = json.loads(prop.value)
        change(meta)
        prop.value = json.dumps(meta)
        onnx.save(model, str(dst))
        return dst

    return edit


def _graph_edit(change: Callable[[onnx.ModelProto], None], seal: bool = False):
    def edit(src: Path, dst: Path) -> Path:
        model = onnx.load(str(src))
        change(model)
        _save(model, dst, seal)
        return dst

    return edit


def _save(model, dst: Path, seal: bool) -> None:
    if seal:
        from surgery_edge.export.onnx import write_engine

        write_engine(model, dst)
    else:
        onnx.save(model, str(dst))


def _flip_middle_byte(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the weights: the file still parses
    dst.write_bytes(bytes(data))
    return dst


def _swap_tasks(meta: dict) -> None:
    meta["tasks"][0], meta["tasks"][1] = meta["tasks"][1], meta["tasks"][0]


def _duplicate_task(meta: dict) -> None:
    meta["tasks"][1] = meta["tasks"][0]


def _image_size(model) -> None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = 32


def _old_format(meta: dict) -> None:
    meta.pop("integrity")
    meta["format_version"] = 2


def _external_data(src: Path, dst: Path) -> Path:
    from surgery_edge.export.onnx import write_engine

    write_engine(onnx.load(str(src)), dst, external_data=True)
    data = dst.with_name(dst.name + ".data")
    _flip_middle_byte(data, data)
    return dst


def _pt2_metadata_edit(src: Path, dst: Path) -> Path:
    """Reverse a task's class names in the package's metadata members (a new, valid zip)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            data = z.read(info)
            if info.filename.endswith("_metadata.json"):
                stored = json.loads(data)
                meta = json.loads(stored["surgery_edge"])
                meta["class_names"][1].reverse()
                stored["surgery_edge"] = json.dumps(meta)
                data = json.dumps(stored).encode()
            out.writestr(info, data)
    return dst


def _trt(edit: str):
    """A stand-in TensorRT engine file with a sidecar written as the export writes it, then
    ``edit``-ed (``metadata``: tasks swapped in the sidecar; ``engine``: other engine bytes)."""

    def make(src: Path, dst: Path) -> Path:
        from surgery_edge.engine_format import file_sha256, read_onnx_metadata, write_sidecar

        engine = dst.with_suffix(".plan")
        engine.write_bytes(b"a serialized engine" * 100)
        write_sidecar(engine, read_onnx_metadata(src).to_dict(), file_sha256(engine))
        sidecar = engine.with_name(engine.name + ".json")
        if edit == "metadata":
            meta = json.loads(sidecar.read_text())
            _swap_tasks(meta)
            sidecar.write_text(json.dumps(meta, indent=2))
        else:
            engine.write_bytes(b"another engine!" * 100)
        return engine

    return make


@dataclass(frozen=True)
class Case:
    name: str
    engine: str  # the tiny run's engine the case starts from
    edit: Callable[[Path, Path], Path]  # (engine, destination) -> the file to open
    exit_code: int
    message: str  # a regular expression the message must match
    via: tuple[str, ...] = ("load", "predict", "info")


CASES = [
    Case("task order swapped", ROUTED, _meta_edit(_swap_tasks), 2, CHANGED),
    Case(  # refused by the metadata's own validation, before the digest is checked
        "duplicate task names",
        ROUTED,
        _meta_edit(_duplicate_task),
        2,
        "names task 'digits' more than once.*Re-export the engine",
    ),
    Case(
        "class names reversed",
        ROUTED,
        _meta_edit(lambda m: m["class_names"][0].reverse()),
        2,
        CHANGED,
    ),
    Case(
        "mean and std changed",
        ROUTED,
        _meta_edit(lambda m: m["preprocessing"].update(mean=[0.5] * 3, std=[0.5] * 3)),
        2,
        CHANGED,
    ),
    Case(
        "resize changed",
        ROUTED,
        _meta_edit(lambda m: m["preprocessing"].update(resize="squash")),
        2,
        CHANGED,
    ),
    Case(
        "weight bytes flipped in the middle",
        ROUTED,
        _flip_middle_byte,
        2,
        rf"{CHANGED}: its bytes \(graph, weights and metadata\) differ from the SHA-256",
    ),
    Case("input size edited", ROUTED, _graph_edit(_image_size), 2, CHANGED),
    Case(
        "input size disagrees with the metadata, resealed",
        ROUTED,
        _graph_edit(_image_size, seal=True),
        2,
        r"input 'images' is float32 \[batch, 3, 32, 32\], but its metadata \(image_size 16\)",
    ),
    Case(
        "unknown element type, resealed",
        ROUTED,
        _graph_edit(lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", 999), True),
        2,
        r"not a readable ONNX (model|file) \(.*Invalid tensor data type 999",
    ),
    Case(
        "integrity record removed",
        ROUTED,
        _meta_edit(lambda m: m.pop("integrity")),
        2,
        f"{CHANGED}: its metadata's integrity record is missing",
    ),
    Case(
        "exported before engine format 3",
        ROUTED,
        _meta_edit(_old_format),
        2,
        "carries no integrity digest: .*engine format 2.*Re-export it",
    ),
    Case(
        "external weight file damaged",
        ROUTED,
        _external_data,
        2,
        r"its weight file x\.onnx\.data differs from the SHA-256",
    ),
    Case(
        "all-tasks engine, weight bytes flipped",
        "surgery-all-tasks.onnx",
        _flip_middle_byte,
        2,
        CHANGED,
    ),
    Case(
        "fp16 engine, weight bytes flipped",
        "surgeryv2-routed-fp16.onnx",
        _flip_middle_byte,
        2,
        CHANGED,
    ),
    Case(
        "int8 engine, class names reversed",
        "surgeryv2-routed-int8.onnx",
        _meta_edit(lambda m: m["class_names"][2].reverse()),
        2,
        CHANGED,
    ),
    Case(
        ".pt2 class names reversed",
        "surgeryv2-routed.pt2",
        _pt2_metadata_edit,
        2,
        rf"{CHANGED}: the package's contents",
    ),
    Case(".pt2 byte flipped", "surgeryv2-routed.pt2", _flip_middle_byte, 2, CHANGED),
    Case(
        "TensorRT sidecar edited",
        ROUTED,
        _trt("metadata"),
        2,
        rf"{CHANGED}: its metadata file x\.plan\.json",
    ),
    Case(
        "TensorRT engine swapped under its sidecar",
        ROUTED,
        _trt("engine"),
        2,
        "was written for another engine than",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_changed_engine_is_refused(engines, tmp_path, case):
    from surgery_edge.runtime import load

    source = engines["dir"] / case.engine
    path = case.edit(source, tmp_path / f"x{source.suffix}")
    if "load" in case.via:
        with pytest.raises(ExportError, match=case.message) as info:
            load(path, device="cpu")
        assert str(path) in str(info.value)
        if CHANGED in str(info.value):
            assert REEXPORT in str(info.value)
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes())
    commands = {
        "predict": ["predict", str(path), str(image), "--task", "shapes"],
        "info": ["info", str(path)],
    }
    for via in case.via:
        if via in commands:
            result = runner.invoke(app, commands[via])
            assert result.exit_code == case.exit_code, (via, result.output)
            assert "Traceback" not in result.output
            assert re.search(case.message, " ".join(result.output.split())), (via, result.output)


@pytest.mark.parametrize("name", [ROUTED, "surgeryv2-routed-int8.onnx", "surgeryv2-routed.pt2"])
def test_an_intact_copy_loads_and_info_says_it_was_verified(engines, tmp_path, name):
    from surgery_edge.runtime import load

    copy = Path(shutil.copy(engines["dir"] / name, tmp_path / f"copied-{name}"))
    assert load(copy, device="cpu").tasks == ["digits", "shapes", "colours"]
    result = runner.invoke(app, ["info", str(copy)])
    assert result.exit_code == 0, result.output
    assert "integrity  SHA-256" in result.output and "verified" in result.output


def test_external_weights_travel_sealed(engines, tmp_path):
    from surgery_edge.engine_format import read_onnx_metadata
    from surgery_edge.export.onnx import write_engine
    from surgery_edge.runtime import load

    path = tmp_path / "big.onnx"
    write_engine(onnx.load(str(engines["dir"] / ROUTED)), path, external_data=True)
    files = read_onnx_metadata(path)["integrity"]["files"]
    assert list(files) == ["big.onnx.data"]
    assert load(path, device="cpu").predict(png_bytes(), task="shapes")[0].ok
    (tmp_path / "big.onnx.data").unlink()
    with pytest.raises(ExportError, match=r"External data path does not exist.*big\.onnx\.data"):
        load(path, device="cpu")  # ONNX Runtime's own message, as its session is created first
    assert "its weights file (big.onnx.data) may be missing" in " ".join(
        user_error(["info", str(path)]).split()
    )


def test_the_demo_exports_engines_of_an_older_format_again(tiny_run, monkeypatch):
    from surgery_edge.run import engines
    from surgery_edge.run.state import Run

    run = Run.open(tiny_run[0], log=lambda *a: None)
    run.require_experts()
    run.find_merges()
    run.find_adapters()
    assert engines.cached_engines(run) is not None  # its own engines: reused
    monkeypatch.setattr(engines, "FORMAT_VERSION", engines.FORMAT_VERSION + 1)
    assert engines.cached_engines(run) is None  # after a format change: exported again


def test_serve_refuses_a_changed_engine_before_its_server_starts(engines, tmp_path):
    from surgery_edge.runtime.serving import ServeOptions, serving_repository

    changed = _flip_middle_byte(engines["dir"] / ROUTED, tmp_path / "x.onnx")
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match=f"x.onnx {CHANGED}"):
        serving_repository({"engine": changed}, repo, ServeOptions())
    assert not (repo / "engine").exists()


def test_eval_engine_refuses_a_changed_engine_before_reading_data(engines, tiny_run, tmp_path):
    changed = _meta_edit(_swap_tasks)(engines["dir"] / ROUTED, tmp_path / "x.onnx")
    output = " ".join(user_error(["eval-engine", str(changed), "--run", str(tiny_run[0])]).split())
    assert f"x.onnx {CHANGED}" in output and REEXPORT in output

"""``predict``'s arguments: files, folders (recursively, images only) and globs."""

from __future__ import annotations

import json

import pytest
from cli_checks import partial_result, user_error
from PIL import Image
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.errors import ConfigError
from surgery_edge.runtime.inputs import expand_images


@pytest.fixture
def photos(tmp_path):
    """photos/{a.png, b.JPG, notes.txt, .hidden.png, sub/c.png, sub/deeper/d.webp}"""
    root = tmp_path / "photos"
    for rel in ["a.png", "b.JPG", "sub/c.png", "sub/deeper/d.webp", ".hidden.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 9), (20, 200, 40)).save(root / rel, format="PNG")
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_folder_gives_its_images_recursively_sorted(photos):
    found = [p.relative_to(photos).as_posix() for p in expand_images([photos])]
    assert found == ["a.png", "b.JPG", "sub/c.png", "sub/deeper/d.webp"]


def test_globs_files_and_order(photos):
    pattern = str(photos / "**" / "*.png")
    found = [p.name for p in expand_images([photos / "b.JPG", pattern])]
    assert found == ["b.JPG", "a.png", "c.png"]  # arguments in order, each glob sorted
    # a named file is taken whatever its suffix (the decoder decides), a folder filters
    assert [p.name for p in expand_images([photos / "notes.txt"])] == ["notes.txt"]


def test_missing_and_empty_inputs_are_named(tmp_path):
    with pytest.raises(ConfigError, match="imgs does not exist"):
        list(expand_images([tmp_path / "imgs"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no image files"):
        list(expand_images([tmp_path / "empty"]))
    with pytest.raises(ConfigError, match="matches no image files"):
        list(expand_images([str(tmp_path / "*.jpg")]))


def test_predict_a_folder_and_a_glob(engines, photos):
    engine = str(engines["dir"] / "surgeryv2-routed.onnx")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", engine, str(photos), "--task", "digits", "--json"])
    assert result.exit_code == 0, result.output
    sources = [json.loads(line)["source"] for line in result.stdout.splitlines()]
    assert sources == [str(p) for p in expand_images([photos])] and len(sources) == 4
    result = runner.invoke(
        app, ["predict", engine, str(photos / "sub" / "*.png"), "--task", "digits"]
    )
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [
        str(photos / "sub" / "c.png")
    ]
    assert "does not exist" in user_error(["predict", engine, str(photos / "nope"), "--task", "0"])
    out = partial_result(["predict", engine, str(photos / "notes.txt"), str(photos / "a.png"),
                          "--task", "digits"])  # fmt: skip
    assert "notes.txt" in out and "1 of 2 images" in out

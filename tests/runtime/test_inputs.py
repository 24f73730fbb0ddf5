"""``predict``'s arguments: files, folders (recursively, images only) and globs."""

from __future__ import annotations

import json
import os
import re

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


def test_links_back_into_a_folder_are_followed_once(photos):
    """Two self-links made a recursive glob exponential (a hang); each image comes once."""
    os.symlink(".", photos / "loop")
    os.symlink("..", photos / "sub" / "up")
    expected = ["a.png", "b.JPG", "sub/c.png", "sub/deeper/d.webp"]
    found = [p.relative_to(photos).as_posix() for p in expand_images([photos])]
    assert found == expected
    pattern = str(photos / "**" / "*.png")
    assert [p.relative_to(photos).as_posix() for p in expand_images([pattern])] == [
        "a.png",
        "sub/c.png",
    ]
    # glob's own rules: a pattern without ** stays at its depth, wildcards skip hidden names
    assert [p.name for p in expand_images([str(photos / "*" / "*.png")])] == ["c.png"]
    assert [p.name for p in expand_images([str(photos / "s?b" / "**")])] == ["c.png", "d.webp"]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: os.mkfifo(p), "is a FIFO (named pipe), not a file"),
        (lambda p: os.symlink("/dev/null", p), "is a character device, not a file"),
        (lambda p: os.symlink(p.parent / "gone.png", p), "gone.png, which does not exist"),
    ],
)
def test_what_is_not_an_image_file_is_named_for_what_it_is(tmp_path, make, expected):
    odd = tmp_path / "odd.png"
    make(odd)
    with pytest.raises(ConfigError, match=re.escape(expected)) as e:
        list(expand_images([odd]))  # never opened: a FIFO would block here
    assert "odd.png" in str(e.value) and "Image file or folder" not in str(e.value)
    folder = tmp_path / "photos"
    folder.mkdir()
    os.rename(odd, folder / "odd.png")
    Image.new("RGB", (4, 4)).save(folder / "ok.png")
    skipped: list[str] = []
    assert [p.name for p in expand_images([folder], skipped)] == ["ok.png"]
    assert len(skipped) == 1 and "odd.png (" in skipped[0]


def test_an_unreadable_folder_is_a_skipped_input(photos, engines, monkeypatch):
    real = os.scandir

    def scandir(path):  # tests run as root, for whom chmod 000 changes nothing
        if str(path).endswith("deeper"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    engine = str(engines["dir"] / "surgeryv2-routed.onnx")
    out = partial_result(["predict", engine, str(photos), "--task", "digits"])
    assert "Skipped 1 input(s)" in out and "deeper (a folder that cannot be listed" in out
    assert "sub/c.png" in out  # the readable images were answered
    text = user_error(["predict", "/dev/null", str(photos), "--task", "digits"])
    assert "The engine /dev/null is a character device, not a file" in text  # not "missing"

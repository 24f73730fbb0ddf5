"""The file helpers every writer shares: atomic files, output checks, safe names, content hashes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

import surgery_edge.io
from surgery_edge.errors import ConfigError
from surgery_edge.io import (
    HashCache,
    atomic_path,
    check_output,
    fingerprint,
    load_yaml,
    printable,
    safe_name,
    staged_dir,
    walk_files,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_what_a_killed_writer_left_is_cleared_by_the_next_write(tmp_path):
    """A SIGKILLed writer leaves a hidden temporary (never read); the next writer removes it."""
    file, folder = str(tmp_path / "a.bin"), str(tmp_path / "d")
    script = (
        "import os, signal, sys\n"
        "from surgery_edge.io import atomic_path, staged_dir\n"
        f"with atomic_path({file!r}) as tmp, staged_dir({folder!r}):\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=False)
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and all(n.startswith((".a.bin.", ".d.staged-")) for n in left)
    with atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"whole")
    with staged_dir(tmp_path / "d") as folder:
        (folder / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "d"]
    assert (tmp_path / "a.bin").read_bytes() == b"whole"


def test_outputs_are_checked_before_the_work(tmp_path, monkeypatch):
    (tmp_path / "folder").mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ConfigError, match="is a folder; give a file path"):
        check_output(tmp_path / "folder", "adapter file")
    with pytest.raises(ConfigError, match=r"is not an artefact of this kind \(adapter file\)"):
        check_output(notes, "adapter file", same_kind=lambda p: False)
    assert check_output(notes, "note", same_kind=lambda p: True) == notes
    with pytest.raises(ConfigError, match="notes.txt is a file, not a folder"):
        check_output(notes / "x.onnx", "engine")
    monkeypatch.setattr(
        surgery_edge.io, "_may_write", lambda folder: False
    )  # as a read-only folder (tests run as root)
    with pytest.raises(ConfigError, match="permission denied"):
        check_output(tmp_path / "new.onnx", "engine")
    assert notes.read_text() == "mine"


@pytest.mark.parametrize(
    "name", ["../../../X", "a/b", "..", ".hidden", "", "x" * 101, "tab\tname", "a\x1b[2J", 3]
)
def test_names_that_would_leave_their_folder_are_refused(name):
    with pytest.raises(ConfigError, match="cannot be used"):
        safe_name(name, "Task name")


@pytest.mark.parametrize("name", ["SUN397", "EuroSATVal", "cluttered_digits", "ViT-B-32", "a.b+c"])
def test_ordinary_names_pass(name):
    assert safe_name(name, "Task name") == name


def test_control_characters_are_shown_escaped():
    assert printable("cat\x1b[2J\x07") == "cat\\x1b[2J\\x07"
    assert printable("a\nb\tc") == "a\nb\tc"
    assert printable("a\nb\tc", keep_newlines=False) == "a\\x0ab\\x09c"
    assert printable("\x9b31m") == "\\x9b31m"  # the 8-bit CSI too


def test_hashes_are_of_content_and_remembered_by_stat(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "copy" / "a.bin"
    a.write_bytes(b"weights")
    b.parent.mkdir()
    b.write_bytes(b"weights")
    cache = HashCache(tmp_path / "hashes.json")
    assert cache.digest(a) == cache.digest(b)  # where a file is plays no part
    assert (tmp_path / "hashes.json").is_file()
    a.write_bytes(b"other!!")  # same size, new content: the stat changed, so it is hashed again
    assert HashCache(tmp_path / "hashes.json").digest(a) != cache.digest(b)
    (tmp_path / "hashes.json").write_text("{not json")  # a damaged store is ignored
    assert HashCache(tmp_path / "hashes.json").digest(b) == cache.digest(b)


def test_fingerprints_are_canonical():
    assert fingerprint({"a": 1, "b": [2, 3]}) == fingerprint({"b": [2, 3], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_a_file_changed_in_place_is_seen_when_fresh_bytes_are_asked_for(tmp_path):
    """Same size, same mtime, same inode: the stat cache keeps the old hash (that is what makes
    re-runs fast); ``fresh=True``, asked for before publishing, reads the bytes again."""
    path = tmp_path / "merged.bin"
    path.write_bytes(b"weights")
    cache = HashCache(tmp_path / "hashes.json")
    old = cache.digest(path)
    st = path.stat()
    with open(path, "r+b") as f:  # edited in place, its modification time put back
        f.write(b"W")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    later = HashCache(tmp_path / "hashes.json")
    assert later.digest(path) == old  # trusted from the stat
    new = later.digest(path, fresh=True)
    assert new != old and later.digest(path) == new  # and the stored hash is corrected
    assert HashCache(tmp_path / "hashes.json").digest(path) == new


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (not hang) when the block takes longer: a walk that follows a loop never ends."""

    def fail(*args):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_walk_enters_each_folder_once_and_opens_no_fifo(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.png").write_bytes(b"a")
    os.symlink(".", tmp_path / "cls" / "loop")
    os.symlink("..", tmp_path / "cls" / "up")
    os.symlink("a.png", tmp_path / "cls" / "b.png")
    os.mkfifo(tmp_path / "cls" / "zz.png")
    with deadline(20):  # two links back up made an exponential walk
        walk = walk_files(tmp_path, keep=lambda parts: parts[-1].endswith(".png"))
    assert [p.name for p in walk.files] == ["a.png", "b.png"]
    assert [s.split(" (")[0].rsplit("/", 1)[1] for s in walk.skipped] == ["zz.png"]
    assert sorted(r.split(" (")[0].rsplit("/", 1)[1] for r in walk.repeated) == ["loop", "up"]
    once = walk_files(tmp_path, keep=lambda parts: True, same_file_once=True)
    assert [p.name for p in once.files] == ["a.png"]  # b.png is another name of it


def test_yaml_aliases_are_refused_before_they_expand():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, n in zip("abcdefgh", "bcdefghi")
    )  # 9**9 (387 million) strings from 470 bytes
    with pytest.raises(ConfigError, match=r"bomb.yaml, line 2: the alias \*a is not allowed"):
        load_yaml(bomb, "bomb.yaml")
    with pytest.raises(ConfigError, match="deep.yaml, line 1: nested more than 50 levels"):
        load_yaml("[" * 200 + "]" * 200, "deep.yaml")  # stopped before any recursion limit
    with pytest.raises(ConfigError, match="a run config is a few kB"):
        load_yaml("x" * (2 << 20), "big.yaml")
    assert load_yaml("surgery: {lr: 1.0e-3, methods: [surgery]}", "ok") == {
        "surgery": {"lr": 1e-3, "methods": ["surgery"]}
    }

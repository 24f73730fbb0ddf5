"""The wheel: built with ``python -m build``, installed outside the source tree, it works.

The fresh virtual environment takes the project's dependencies from the test's own environment
(one ``.pth`` line, instead of downloading torch again); the project itself comes only from the
wheel, which is what the assertions check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

from surgery_edge import __version__ as version_string

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment holding only the built wheel of this project."""
    work = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the files git knows (committed or not, never ignored ones), so that
    # neither a stale build/ folder nor anything else outside the project reaches the wheel.
    listed = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout
    source = work / "source"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(work), "."],
        cwd=source,
    )
    (wheel,) = work.glob("surgery_edge-*.whl")
    env = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=work)
    python = env / "bin" / "python"
    site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=work
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         str(wheel)],
        cwd=work,
    )  # fmt: skip
    return env


def test_the_wheel_holds_the_whole_package(venv, tmp_path):
    code = (
        "import json, surgery_edge, surgery_edge.kernels, surgery_edge.cli.app, surgery_edge.bench;"
        "from surgery_edge.evaluation.published import published_table;"
        "print(json.dumps([surgery_edge.__file__, surgery_edge.kernels.__file__,"
        " len(published_table('paper_vit_b32')['rows'])]))"
    )
    package, kernels, rows = json.loads(
        _run([str(venv / "bin/python"), "-c", code], tmp_path).stdout
    )
    assert Path(package).is_relative_to(venv) and Path(kernels).is_relative_to(venv)
    assert rows > 0  # package data (the published tables) is inside the wheel


def test_the_installed_cli_benchmarks_and_exports(venv, tiny_run, tmp_path):
    cli = str(venv / "bin" / "surgery-edge")
    # one engine through both paths (tests/bench covers the rest of the benchmark)
    bench = ["bench", "--quick", "--num-tasks", "2", "--configs", "surgeryv2", "--modes", "routed"]
    _run([cli, *bench, "--batches", "1", "--out", str(tmp_path / "bench")], tmp_path, timeout=600)
    rows = json.loads(next((tmp_path / "bench").glob("*.json")).read_text())["results"]
    assert {r["path"] for r in rows} == {"eager", "onnxruntime"}
    assert all(r["status"] == "ok" for r in rows)
    engine = tmp_path / "engine.onnx"
    done = _run([cli, "export", "--run", str(tiny_run[0]), "--onnx", str(engine)], tmp_path)
    assert engine.is_file() and f"onnx: {engine}" in done.stdout
    # ...and what a user runs next: --version, info, predict, and a shipped recipe by name.
    assert _run([cli, "--version"], tmp_path).stdout.strip() == f"surgery-edge {version_string}"
    info = json.loads(_run([cli, "info", str(engine), "--json"], tmp_path).stdout)
    assert info["mode"] == "routed" and info["tasks"]
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    task = info["tasks"][0]["name"]
    answers = json.loads(
        _run([cli, "predict", str(engine), str(tmp_path / "red.png"), "--task", task, "--json"],
             tmp_path).stdout
    )  # fmt: skip
    assert len(answers) == 1 and task in json.dumps(answers)
    assert "shipped recipe" in _run([cli, "run", "--help"], tmp_path).stdout
    bad = subprocess.run([cli, "run", "paper_vit_b32", "--out", str(tmp_path / "r")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "SURGERY_EDGE_DATA" in bad.stderr  # found by name, then
    assert "Traceback" not in bad.stderr  # refused: its data root is unset

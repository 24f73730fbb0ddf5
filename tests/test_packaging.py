"""The wheel: built once with ``python -m build``, installed outside the source tree, it works.

Two virtual environments hold it:

- the base install, as an edge box gets it: ``pip install surgery_edge-*.whl`` with its
  dependencies from the package registry (numpy, pillow, onnxruntime, typer, rich), nothing
  borrowed from this environment. It must predict and describe an engine without torch or onnx,
  stay under :data:`BASE_INSTALL_LIMIT` bytes, and send a training command to ``[train]``. pip's
  cache is used as configured (``PIP_CACHE_DIR`` or pip's default): a warm cache saves the
  downloads. The install runs in the background while the other environment's checks run;
  the base test waits for it.
- the full install: the project's dependencies taken from the test's own environment (one
  ``.pth`` line, instead of downloading torch again); the project itself comes only from the
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
BASE_INSTALL_LIMIT = 300 * 10**6  # bytes on disk of the base install, onnxruntime included


def _env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def _new_venv(path: Path) -> Path:
    """A virtual environment without pip (this environment's pip installs into it)."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    return path / "bin" / "python"


class _BaseInstall:
    """``pip install WHEEL`` into a fresh environment, running in the background."""

    def __init__(self, wheel: Path, env: Path):
        self.env, self.python = env, _new_venv(env)
        self.log = env.parent / "base-install.log"
        args = [sys.executable, "-m", "pip", "--python", str(self.python), "install", "-q",
                "--no-compile", str(wheel)]  # fmt: skip
        with self.log.open("w") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_env())

    def wait(self) -> Path:
        code = self._proc.wait(timeout=600)
        assert code == 0, f"pip install of the base wheel failed:\n{self.log.read_text()[-4000:]}"
        return self.env


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory) -> dict:
    """The wheel, built once; its base install started in the background."""
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
    return {"wheel": wheel, "work": work, "base": _BaseInstall(wheel, work / "base")}


@pytest.fixture(scope="module")
def venv(wheel_build) -> Path:
    """A fresh virtual environment holding the built wheel and this environment's packages."""
    work, env = wheel_build["work"], wheel_build["work"] / "venv"
    python = _new_venv(env)
    site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=work
    ).stdout.strip()
    # every site folder of this environment (a worktree's reaches its dependencies through a
    # .pth file of its own, which Python reads only in a site folder)
    folders = [p for p in sys.path if p.endswith("site-packages")] or [
        sysconfig.get_path("purelib")
    ]
    (Path(site) / "dependencies.pth").write_text("".join(f"{p}\n" for p in folders))
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         str(wheel_build["wheel"])],
        cwd=work,
    )  # fmt: skip
    return env


def test_the_wheel_holds_the_whole_package(venv, tmp_path):
    code = (
        "import json, surgery_edge, surgery_edge.kernels, surgery_edge.cli.app, surgery_edge.bench;"
        "from surgery_edge.evaluation.published import published_table;"
        "from importlib.metadata import version;"
        "print(json.dumps([surgery_edge.__file__, surgery_edge.kernels.__file__,"
        " len(published_table('paper_vit_b32')['rows']), version('surgery-edge')]))"
    )
    package, kernels, rows, installed = json.loads(
        _run([str(venv / "bin/python"), "-c", code], tmp_path).stdout
    )
    assert Path(package).is_relative_to(venv) and Path(kernels).is_relative_to(venv)
    assert rows > 0  # package data (the published tables) is inside the wheel
    assert installed == version_string  # the wheel's version is surgery_edge.__version__


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
    assert "shipped recipe" in _run([cli, "run", "--help"], tmp_path).stdout
    bad = subprocess.run([cli, "run", "paper_vit_b32", "--run", str(tmp_path / "r")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "SURGERY_EDGE_DATA" in bad.stderr  # found by name, then
    assert "Traceback" not in bad.stderr  # refused: its data root is unset
    assert not (tmp_path / "r").exists()  # and nothing was written


def _size(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def test_the_base_install_serves_an_engine_without_torch(wheel_build, engines, tmp_path):
    """The edge install: predict and info on the tiny run's engine, no torch, no onnx, no rich
    needed by the runtime, under 300 MB; a training command names the [train] extra."""
    env = wheel_build["base"].wait()
    python, cli = str(env / "bin" / "python"), str(env / "bin" / "surgery-edge")
    engine = str(engines["dir"] / "surgeryv2-routed.onnx")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    code = (
        "import importlib.util, json, sys\n"
        "absent = [m for m in ('torch', 'onnx', 'open_clip', 'triton', 'safetensors')"
        " if importlib.util.find_spec(m)]\n"
        "sys.modules['rich'] = None  # the runtime works where rich is missing too\n"
        "from surgery_edge import runtime\n"
        f"(r,) = runtime.load({engine!r}).predict(['red.png'], task='digits')\n"
        "print(json.dumps([absent, r.source, r['digits'].label]))\n"
    )
    absent, source, label = json.loads(_run([python, "-c", code], tmp_path).stdout)
    assert absent == [] and source == "red.png" and label
    info = json.loads(_run([cli, "info", engine, "--json"], tmp_path).stdout)
    assert info["mode"] == "routed" and [t["name"] for t in info["tasks"]][0] == "digits"
    assert info["metadata"]["package_version"] == version_string
    lines = _run([cli, "predict", engine, "red.png", "--all-tasks", "--json"], tmp_path).stdout
    (answer,) = [json.loads(line) for line in lines.splitlines()]
    assert answer["source"] == "red.png" and set(answer["predictions"]) == {
        t["name"] for t in info["tasks"]
    }
    train = subprocess.run([cli, "train", "--run", str(tmp_path)], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert train.returncode == 3 and "Traceback" not in train.stderr, train.stderr
    assert "pip install 'surgery-edge[train]'" in " ".join(train.stderr.split())
    size = _size(env)
    print(f"base install: {size / 1e6:.1f} MB")
    assert size < BASE_INSTALL_LIMIT, f"the base install holds {size / 1e6:.0f} MB"

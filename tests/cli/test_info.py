"""``--version``, ``-h``, ``env``, ``info ENGINE`` and the global ``-q``/``-v`` options."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import onnx
import pytest
from cli_checks import user_error
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge import __version__
from surgery_edge.engine_format import read_onnx_metadata
from surgery_edge.progress import silence_cuda_home_notice

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"surgery-edge {__version__}"


@pytest.mark.parametrize(
    "args", [[], ["info"], ["env"], ["export"], ["predict"], ["merge"], ["import", "hf"]]
)
def test_short_help_everywhere(args):
    result = runner.invoke(app, [*args, "-h"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--help" in result.output


def test_root_help_documents_exit_codes_and_completion():
    out = runner.invoke(app, ["--help"]).output
    assert "Exit codes: 0 done; 1 a partial result" in " ".join(out.split())
    assert "--install-completion" in out


def test_env_json_names_versions_and_cuda():
    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["surgery-edge"] == __version__
    assert data["packages"]["torch"] and data["packages"]["onnxruntime"]
    assert "CPUExecutionProvider" in data["onnxruntime_providers"]
    assert set(data["cuda"]) == {"torch_built_with", "available", "devices"}
    assert data["problems"] == []  # this machine has onnxruntime only


def test_env_flags_both_onnxruntime_builds(monkeypatch):
    from surgery_edge.cli import info

    real = info._installed
    monkeypatch.setattr(info, "_installed", lambda n: "1.20" if "onnxruntime" in n else real(n))
    (problem,) = info.environment()["problems"]
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in problem


def test_info_describes_a_routed_engine(engines):
    path = engines["dir"] / "surgeryv2-routed.onnx"
    meta = read_onnx_metadata(path)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(f"{path.name}: ONNX, ")
    assert f"made by surgery-edge {__version__}" in out
    assert "mode       routed" in out and "precision  fp32" in out
    assert f"surgeryv2 rank {meta['rank']} on {meta['merge_recipe']['method']}" in out
    for task, names in zip(meta.tasks, meta.class_names):
        assert f"{task}" in out and f"{len(names)} classes" in out
    size = meta.preprocessing.image_size
    assert f"images float32 [batch, 3, {size}, {size}]; task_ids int64 [batch]" in out


def test_info_json_matches_the_graph(engines):
    path = engines["dir"] / "surgery-all-tasks.onnx"
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [o["name"] for o in data["outputs"]] == [o.name for o in graph.output]
    assert data["io_source"] == "graph" and data["mode"] == "all-tasks"
    assert data["size_bytes"] == path.stat().st_size
    meta = read_onnx_metadata(path)
    assert [t["classes"] for t in data["tasks"]] == meta.class_counts
    assert [o["shape"][1] for o in data["outputs"]] == meta.class_counts
    assert data["metadata"]["preprocessing"] == meta["preprocessing"]


def test_info_refuses_what_is_not_an_engine(tmp_path):
    assert "does not exist" in user_error(["info", str(tmp_path / "missing.onnx")])
    plain = tmp_path / "plain.onnx"
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    onnx.save(model, str(plain))
    assert "carries no surgery-edge engine metadata" in user_error(["info", str(plain)])
    assert "no metadata file" in user_error(["info", str(_touch(tmp_path / "model.plan"))])


def _touch(path):
    path.write_bytes(b"\0" * 16)
    return path


def test_quiet_and_verbose_exclude_each_other():
    result = runner.invoke(app, ["-q", "-v", "env"])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_quiet_reaches_the_commands_processes(monkeypatch):
    monkeypatch.delenv("SURGERY_EDGE_QUIET", raising=False)
    assert runner.invoke(app, ["-q", "env", "--json"]).exit_code == 0
    assert os.environ.get("SURGERY_EDGE_QUIET") == "1"


def test_cuda_home_notice_is_dropped_and_nothing_else():
    logger = logging.getLogger("torch.utils.cpp_extension")

    def record(msg):
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, ("/usr",), None)

    silence_cuda_home_notice()
    try:
        assert not logger.filter(record("No CUDA runtime is found, using CUDA_HOME='%s'"))
        assert logger.filter(record("Error building extension '%s'"))
    finally:
        silence_cuda_home_notice(False)
    assert logger.filter(record("No CUDA runtime is found, using CUDA_HOME='%s'"))


def test_help_stays_torch_free():
    """Help, and the completion and check of merge methods, never import torch (1.8 s)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from surgery_edge.cli.common import complete_merge_method, merge_method\n"
        "assert complete_merge_method('ties') == [merge_method('ties_merging')]\n"
        "from surgery_edge.cli.app import main\nmain()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "info", "-h"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


@pytest.mark.parametrize(
    "words, expected",
    [
        ("surgery-edge ex", ["experts", "export"]),
        ("surgery-edge merge --method ada", ["adamerging_layerwise", "adamerging_taskwise"]),
    ],
)
def test_shell_completion(words, expected):
    env = {
        "_SURGERY_EDGE_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    result = runner.invoke(app, [], env=env, prog_name="surgery-edge")
    assert result.exit_code == 0, result.output
    assert result.output.split() == expected


def test_the_readme_python_example_runs(engines, tmp_path, monkeypatch, capsys):
    """The README's "An engine from Python" block, run as written on the tiny run's engine."""
    from pathlib import Path

    from PIL import Image

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("An engine from Python, without torch:\n\n```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/demo").mkdir(parents=True)
    (tmp_path / "runs/demo/engines").symlink_to(engines["dir"])
    Image.new("RGB", (40, 30), (250, 250, 250)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("['digits'")
    assert out[1].startswith("a.png ") and out[2].startswith("b.jpg ")


def test_eval_keeps_the_engines_table_shows_progress_and_prints_json(
    tiny_run, tmp_path, monkeypatch
):
    """`eval` rewrites the report with the exported engines while they are up to date, shows
    its progress on stderr (plain lines without a terminal; none with -q), and --json prints
    report.json on stdout, which parses when piped with the progress on."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    assert "Exported engines" in (run / "report.md").read_text()  # as the demo wrote it
    monkeypatch.delenv("SURGERY_EDGE_QUIET", raising=False)
    result = runner.invoke(app, ["eval", "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"report: {run / 'report.md'}\n"
    n = 1 + 3 + 5 + 10  # pretrained, experts, merges, merges x surgeries
    assert f"evaluation  {n}/{n}  100%  elapsed " in result.stderr  # a plain line, all columns
    assert "Exported engines" in (run / "report.md").read_text()
    piped = subprocess.run(  # the real command, stdout into a pipe, progress on
        [sys.executable, "-m", "surgery_edge.cli", "eval", "--run", str(run), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "SURGERY_EDGE_QUIET"},
    )
    assert piped.returncode == 0, piped.stderr
    assert f"evaluation  {n}/{n}  100%" in piped.stderr
    report = json.loads(piped.stdout)
    assert report == json.loads((run / "report.json").read_text())
    assert report["engines"]["engines"]  # the table's data
    # A summary that no longer matches the run is dropped from the report, never shown as current.
    (run / "engines" / "summary.json").write_text("{}")
    assert runner.invoke(app, ["-q", "eval", "--run", str(run)]).exit_code == 0
    assert "Exported engines" not in (run / "report.md").read_text()


def test_nested_progress_bars_share_one_display(monkeypatch):
    """rich allows one live display at a time: a bar inside another's loop must not raise."""
    from surgery_edge.progress import progress_bar

    monkeypatch.delenv("SURGERY_EDGE_QUIET", raising=False)
    with progress_bar(2, "outer") as outer:
        for _ in range(2):
            with progress_bar(3, "inner") as inner:
                for _ in range(3):
                    inner.advance()
            outer.advance()
    with progress_bar(1, "after") as bar:  # the display was released
        bar.advance()


def test_progress_without_a_terminal_is_plain_lines_on_stderr(monkeypatch, capsys):
    """CI and log files get whole lines (every column, the step count), at the start, every
    10% of the steps, every LINE_INTERVAL_S seconds while a step runs, and at the end."""
    import time

    from surgery_edge import progress

    monkeypatch.delenv("SURGERY_EDGE_QUIET", raising=False)
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.05)
    with progress.progress_bar(40, "training") as bar:
        for _ in range(8):
            bar.advance(loss=0.25)
        time.sleep(0.6)  # a slow step: the log is not left silent
        bar.advance(32)
    out, err = capsys.readouterr()
    assert out == ""  # stdout is for results
    lines = err.splitlines()
    assert lines[0].startswith("training  0/40  0%  elapsed 0:00:00")
    assert "training  4/40  10%" in err and "training  8/40  20%" in err
    assert sum("8/40  20%" in line for line in lines) >= 2  # said again while the step ran
    assert lines[-1].startswith("training  40/40  100%") and lines[-1].endswith("done  loss 0.25")
    monkeypatch.setenv("SURGERY_EDGE_QUIET", "1")  # -q: no progress; messages on stderr
    with progress.progress_bar(3, "quiet") as bar:
        bar.advance(3)
    progress.message("reusing merge y")
    out, err = capsys.readouterr()
    assert out == "" and err == "reusing merge y\n"


def test_a_missing_extra_is_named_with_exit_code_3():
    from surgery_edge.cli.common import missing_extra

    error = missing_extra(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert error.exit_code == 3 and "needs torch, which is not installed" in str(error)
    assert "pip install 'surgery-edge[train]'" in str(error)
    assert "the CPU build of torch" in str(error)
    error = missing_extra(ModuleNotFoundError(name="pytriton.triton"))
    assert "surgery-edge[serve]" in str(error)
    assert missing_extra(ModuleNotFoundError(name="numpyy")) is None  # a bug, not an extra


def test_one_version_everywhere():
    """The package and the CHANGELOG's top release carry one version (the wheel's is read from
    the package: tests/test_packaging.py), and it is not the version of the refused 0.1 engines
    (test_info_describes_a_routed_engine: an engine records it)."""
    from pathlib import Path

    changelog = (Path(__file__).resolve().parents[2] / "CHANGELOG.md").read_text()
    top = changelog.split("\n## ")[1].splitlines()[0]
    assert f"({__version__})" in top or f"[{__version__}]" in top, top
    assert __version__ != "0.1.0"


def test_readme_runs_benchmark_scripts_as_they_can_be_run():
    """A `benchmarks/*.py` command in the README starts with `python`, or the script is
    executable with a shebang."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    for match in re.finditer(r"(python3? )?(benchmarks/[\w/]+\.py) (?=[-\w])", readme):
        script = root / match.group(2)
        runnable = script.read_text().startswith("#!") and os.access(script, os.X_OK)
        assert match.group(1) or runnable, match.group(0)

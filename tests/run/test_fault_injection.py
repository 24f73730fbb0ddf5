"""Fault injection: commands killed by SIGKILL at random points, then resumed or re-run.

``train`` is killed several times (at random points, and while it writes a checkpoint or its
adapters) and resumed each time: the final adapters equal an uninterrupted run's bit for bit.
``merge``, ``eval`` and ``export`` are killed while they write: what is left under each final
name is either the previous artefact or a complete new one, and the next command trusts nothing
partial. Real processes (``python -m surgery_edge.cli.app``) on a copy of the tiny run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.engine_format import read_onnx_metadata
from surgery_edge.models.checkpoint import load_encoder, load_tensors

ENV = {**os.environ, "SURGERY_EDGE_QUIET": "1", "OMP_NUM_THREADS": "1"}
STEPS = 160


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "surgery_edge.cli.app", *args]


def run_to_end(args: list[str]):
    """Run ``surgery-edge ARGS`` to its end, in this process (only killed runs need their own)."""
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result


def kill_when(args: list[str], ready: Callable[[int], bool], timeout: float = 120) -> bool:
    """Start ``surgery-edge ARGS``; SIGKILL it as soon as ``ready(pid)`` holds. Returns whether
    it was killed (False: it finished first)."""
    proc = subprocess.Popen(
        command(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(proc.pid):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.0002)
        assert proc.poll() is not None, "the command hung"
        assert b"Traceback" not in proc.stderr.read()
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def writing(folder: Path, name: str) -> Callable[[int], bool]:
    """True while process ``pid`` has its temporary file for ``folder / name`` open."""
    prefix = f".{name}."

    def ready(pid: int) -> bool:
        try:
            return any(n.startswith(f"{prefix}{pid}.") for n in os.listdir(folder))
        except FileNotFoundError:
            return False

    return ready


def after_progress(state: Path, delay: float) -> Callable[[int], bool]:
    """True ``delay`` seconds after ``state`` was first rewritten by this process."""
    start = state.stat().st_mtime_ns if state.exists() else 0
    seen: list[float] = []

    def ready(pid: int) -> bool:
        if not seen:
            if state.exists() and state.stat().st_mtime_ns != start:
                seen.append(time.monotonic())
            return False
        return time.monotonic() - seen[0] >= delay

    return ready


def step_of(state: Path) -> int | None:
    return int(torch.load(state, weights_only=True)["step"]) if state.exists() else None


@pytest.fixture
def copy(tiny_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(tiny_run[0], dest)
    return dest


def test_killed_training_resumes_to_the_uninterrupted_adapters(copy, tmp_path):
    rng = random.Random(14)
    base = ["train", "--run", str(copy), "--merge", "task_arithmetic", "--surgery", "surgeryv2"]
    base += ["--steps", str(STEPS), "--rank", "4", "--batch-size", "4", "--checkpoint-every", "1"]
    reference = tmp_path / "reference.safetensors"
    assert run_to_end([*base, "--out", str(reference)]).exit_code == 0
    out = tmp_path / "killed.safetensors"
    state = out.with_name(out.name + ".state.pt")
    args = [*base, "--out", str(out), "--resume"]
    # While it writes a checkpoint, then at random points of its progress, then while it writes
    # the final adapters: four kills, each followed by a resume.
    plans = [writing(tmp_path, state.name)]
    plans += [after_progress(state, rng.uniform(0.0, 0.4)) for _ in range(2)]
    plans.append(writing(tmp_path, out.name))
    steps, kills = [], 0
    for ready in plans:
        if kill_when(args, ready):
            kills += 1
        steps.append(step_of(state))
        # Nothing partial under a final name: the adapter file exists only when complete, and
        # the checkpoint always loads.
        if out.exists():
            load_tensors(out)
    assert kills >= 3, f"only {kills} kills landed"
    progressed = [s for s in steps if s is not None]
    assert progressed == sorted(progressed) and any(0 < s < STEPS for s in progressed)
    if not out.exists():
        assert run_to_end(args).exit_code == 0
    ref, got = load_tensors(reference)[0], load_tensors(out)[0]
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    assert not state.exists()
    # No temporary file of a killed writer survives the next write into the same folder.
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def until_killed(args: list[str], ready: Callable[[int], bool], tries: int = 4) -> int:
    """Run ``args`` until one run is killed by ``ready`` (a race with a short write window);
    returns the number of runs it took."""
    for attempt in range(1, tries + 1):
        if kill_when(args, ready):
            return attempt
    raise AssertionError(f"no kill landed in {tries} runs of {args[0]}")


def test_killed_merge_eval_and_export_leave_nothing_a_later_command_trusts(copy, tmp_path):
    report, plot = copy / "report.json", copy / "bias.png"
    before = report.read_bytes(), (copy / "report.md").read_bytes()
    evaluate = ["eval", "--run", str(copy)]
    until_killed(evaluate, writing(copy, plot.name))  # while it writes its last plot
    assert (report.read_bytes(), (copy / "report.md").read_bytes()) == before
    assert plot.read_bytes().startswith(b"\x89PNG")

    merged = copy / "merged" / "ties_merging.safetensors"
    old = merged.read_bytes()
    merge = ["merge", "--run", str(copy), "--method", "ties_merging", "--param", "k=0.5"]
    merge.append("--overwrite")
    until_killed(merge, writing(merged.parent, merged.name))
    # The old merge, never a partial file under the final name.
    assert merged.read_bytes() == old
    assert run_to_end(merge).exit_code == 0
    assert load_encoder(merged).meta["recipe"]["k"] == 0.5
    assert not [n for n in os.listdir(merged.parent) if n.endswith(".tmp")]  # cleared
    # The ties adapters were trained on the old merge: eval refuses them (exit 2, no traceback).
    refused = run_to_end(evaluate)
    assert refused.exit_code == 2 and "adapters/ties_merging" in refused.output

    engine = tmp_path / "engine.onnx"
    export = ["export", "--run", str(copy), "--surgery", "surgeryv2", "--onnx", str(engine)]
    until_killed(export, writing(tmp_path, engine.name))
    assert not engine.exists()
    assert run_to_end([*export, "--overwrite"]).exit_code == 0
    assert read_onnx_metadata(engine).method == "surgeryv2"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    predict = run_to_end(["predict", str(engine), str(Path(__file__)), "--task", "digits"])
    assert predict.exit_code == 1 and "Could not answer 1 of 1" in predict.output  # not an image

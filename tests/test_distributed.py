"""Distributed training: two CPU processes (gloo) against one, on copies of the tiny run.

``train --nproc 2`` (and ``torchrun`` itself) must give the adapters one process gives with the
same global batch (within 1e-5) and write the same representation cache bit for bit; killing
one rank stops the job with one clear paragraph and leaves nothing partial under a final name,
and the job resumed from the writer's checkpoint ends with the same adapters. AdaMerging's
coefficients learn the same way. Real processes, real process groups.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from surgery_edge.cli import launch
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.distributed import World
from surgery_edge.errors import ConfigError
from surgery_edge.io import HashCache
from surgery_edge.models.checkpoint import load_tensors
from surgery_edge.surgery.targets import _cache_problem, _paths

ENV = {**os.environ, "SURGERY_EDGE_QUIET": "1", "OMP_NUM_THREADS": "1"}
TRAIN = ["--merge", "task_arithmetic", "--surgery", "surgeryv2", "--rank", "4"]
TRAIN += ["--batch-size", "4", "--steps", "60", "--checkpoint-every", "1"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "surgery_edge.cli", *args]


def in_process(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def fresh(tiny_run, dest: Path) -> Path:
    """A copy of the tiny run without its adaptation-split representation cache."""
    shutil.copytree(tiny_run[0], dest)
    for path in (dest / "cache").glob("*-adapt-*"):
        path.unlink()
    (dest / "cache" / "hashes.json").unlink(missing_ok=True)
    return dest


def entries(cache: Path) -> dict[str, bytes]:
    """Every file of the adaptation-split cache entries, by name."""
    return {p.name: p.read_bytes() for p in sorted(cache.glob("*-adapt-*"))}


def descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid]
        found += children
        frontier += children
    return found


def rank_pid(root: int, rank: int) -> int | None:
    """The pid of the process that torchrun started as ``rank``, under launcher ``root``."""
    for pid in descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"WORLD_SIZE=2" in environ:
            return pid
    return None


def kill_rank_when(
    args: list[str], ready, timeout: float = 180, launcher: signal.Signals | None = None
) -> tuple[int, str]:
    """Start ``args`` as a 2-process job; SIGKILL rank 1 once ``ready()`` holds (or send the
    launcher ``launcher``, and check that no rank outlives it). Returns the job's exit code and
    stderr."""
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, killed, ranks = time.monotonic() + timeout, False, []
    try:
        while proc.poll() is None and time.monotonic() < deadline and not killed:
            victim = rank_pid(proc.pid, 1)
            if victim is not None and ready():
                ranks = [victim, rank_pid(proc.pid, 0)]
                os.kill(*((proc.pid, launcher) if launcher else (victim, signal.SIGKILL)))
                killed = True
            time.sleep(0.001)
        _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed, "the job ended before rank 1 could be killed"
    assert not [pid for pid in ranks if pid and _running(pid)], "a rank outlived its launcher"
    return proc.returncode, stderr.decode()


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def assert_stopped_clearly(code: int, stderr: str) -> None:
    assert code == 3, stderr  # a worker failed (errors.EXIT_FAILED)
    assert "Traceback" not in stderr, stderr
    assert "The 2-process job stopped: rank 1" in stderr and "SIGKILL" in stderr, stderr
    assert "Nothing partial was written" in stderr


def assert_no_corrupt_entry(cache: Path) -> None:
    """Every entry under its final names is complete and checked; at most hidden temp files."""
    for record in cache.glob("*-adapt-*.json"):
        key = record.name.removesuffix(".json")
        paths, record_path = _paths(cache, key)
        assert _cache_problem(record_path, paths, 16, HashCache()) is None
    names = {p.name.split(".")[0] for p in cache.glob("*-adapt-*.npy")}
    recorded = {p.name.split(".")[0] for p in cache.glob("*-adapt-*.json")}
    assert names <= recorded, "an entry's arrays were published without its record"


def test_two_gloo_processes_train_as_one_and_a_killed_rank_corrupts_nothing(tiny_run, tmp_path):
    one = fresh(tiny_run, tmp_path / "one")
    reference = tmp_path / "one.safetensors"
    in_process(["train", "--run", str(one), *TRAIN, "--adapters", str(reference)])

    two = fresh(tiny_run, tmp_path / "two")
    out = tmp_path / "two.safetensors"
    state = out.with_name(out.name + ".state.pt")
    args = ["train", "--run", str(two), *TRAIN, "--adapters", str(out), "--resume"]
    cache = two / "cache"

    # 1. SIGTERM to the launcher while the writer assembles the cache (its temporary files are
    # open): every rank stops with it (a traceback and exit 1 before), nothing is published.
    def assembling() -> bool:
        return any(n.startswith(".") and "-adapt-" in n for n in os.listdir(cache))

    job = cli(*args, "--nproc", "2")
    code, stderr = kill_rank_when(job, assembling, launcher=signal.SIGTERM)
    assert code == 130 and "Traceback" not in stderr, stderr  # errors.EXIT_INTERRUPTED
    assert "error: Stopped by SIGTERM: the 2 processes of the job were stopped too" in stderr
    assert_no_corrupt_entry(cache)
    assert not out.exists()

    # 2. Rank 1 killed during training, once the writer has checkpointed a few steps.
    def training() -> bool:
        try:
            return int(torch.load(state, weights_only=True)["step"]) >= 5
        except (OSError, RuntimeError, EOFError, KeyError):
            return False

    assert_stopped_clearly(*kill_rank_when(cli(*args, "--nproc", "2"), training))
    assert_no_corrupt_entry(cache)
    assert not out.exists()
    resumed_from = int(torch.load(state, weights_only=True)["step"])
    assert 5 <= resumed_from < 60

    # 3. Resumed from the writer's checkpoint by torchrun itself: the one-process result.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    # (torchrun's own parser would take --run for its --run-path: --run-dir is the same option)
    args[1] = "--run-dir"
    torchrun += ["--nproc-per-node", "2", "-m", "surgery_edge.cli", *args]
    done = subprocess.run(torchrun, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not state.exists()
    ref, got = load_tensors(reference)[0], load_tensors(out)[0]
    assert set(ref) == set(got)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5
    assert entries(one / "cache") == entries(cache)  # the cache, bit for bit
    assert not [n for n in os.listdir(cache) if n.startswith(".")]  # leftovers removed


def test_adamerging_learns_the_same_coefficients_on_two_processes(tiny_run, tmp_path):
    method = ["--method", "adamerging_taskwise", "--overwrite"]
    method += ["--param", "steps=4", "--param", "batch_size=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(tiny_run[0], one)
    shutil.copytree(tiny_run[0], two)
    in_process(["merge", "--run", str(one), *method])
    done = subprocess.run(
        cli("merge", "--run", str(two), *method, "--nproc", "2"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    name = "merged/adamerging_taskwise.safetensors"
    (sa, meta_a), (sb, meta_b) = load_tensors(one / name), load_tensors(two / name)
    learned = meta_a["recipe"]["coefficients"]
    assert learned == pytest.approx(meta_b["recipe"]["coefficients"], abs=1e-6)
    assert any(abs(c - meta_a["recipe"]["init"]) > 1e-4 for c in learned.values())  # it learned
    assert max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa) <= 1e-5


def test_shares_cover_every_row_once_and_batches_too_small_are_refused():
    world = World(0, 3, 0, torch.device("cpu"), "gloo")
    for n in (1, 3, 7, 256):
        shares = [world.share(n, r) for r in range(3)]
        assert [i for s in shares for i in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ConfigError, match="--batch-size 3 or more"):
        world.require_rows(2, "The batch size per task")
    World.single().require_rows(1, "anything")  # one process: one row is enough


def test_nproc_is_checked_and_refused_under_torchrun(monkeypatch):
    assert launch.check_nproc(None) == 1
    for bad in (0, -2, 5000):
        with pytest.raises(ConfigError, match="--nproc must be"):
            launch.check_nproc(bad)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="leave --nproc out under torchrun"):
        launch.check_nproc(2)


def test_settings_are_checked_before_any_process_starts(tiny_run, tmp_path, monkeypatch):
    """`--nproc 2 --batch-size 1` exited 1 after starting the processes; a settings conflict
    was printed by every rank, with advice to --resume that could not fix it."""
    from cli_checks import user_error

    def never(ctx, nproc):
        raise AssertionError("the processes were started")

    monkeypatch.setattr(launch, "relaunch", never)
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    train = ["train", "--run", str(run), "--merge", "task_arithmetic", "--surgery", "surgeryv2"]
    text = user_error([*train, "--nproc", "2", "--batch-size", "1"])
    assert "is 1, smaller than the 2 processes" in text
    text = user_error([*train, "--nproc", "4", "--steps", "20"])
    assert text.count("error:") == 1 and "settings.steps: 3 -> 20" in text
    assert "--resume" not in text
    merge = ["merge", "--run", str(run), "--method", "adamerging_taskwise", "--nproc", "2"]
    assert "batch_size is 1, smaller than the 2" in user_error([*merge, "--param", "batch_size=1"])
    assert "params.steps: 3 -> 5" in user_error([*merge, "--param", "steps=5"])


def test_the_launcher_prints_the_cause_once_with_its_exit_code():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank: int, code: int, at: float) -> ProcessFailure:
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="")
        f.timestamp = at
        return f

    lost = {"kind": "DistributedError", "code": 3, "message": "Rank 1 lost contact ..."}
    usage = {"kind": "ConfigError", "code": 2, "message": "The adapter file X exists but ..."}
    # a user error on rank 0: its message once, exit 2, no advice to resume
    error = launch._stopped({0: failure(0, 2, 1.0), 1: failure(1, -15, 2.0)}, {0: usage}, 2)
    assert error.exit_code == 2 and str(error).startswith(usage["message"])
    assert "--resume" not in str(error)
    # a rank killed by a signal is the cause; the rank that lost contact with it comes after
    error = launch._stopped({0: failure(0, 3, 1.0), 1: failure(1, -9, 2.0)}, {0: lost}, 2)
    assert error.exit_code == 3 and "rank 1 (pid 101) was killed by SIGKILL" in str(error)
    assert "then rank 0 lost contact with it" in str(error) and "--resume" in str(error)
    error = launch._stopped({1: failure(1, 130, 1.0)}, {1: {"kind": "x", "code": 130}}, 2)
    assert error.exit_code == 130


def test_a_rank_dies_with_the_process_that_started_it(tmp_path):
    """Killing the launcher of a job (SIGKILL) left two ranks that went on and wrote adapters."""
    ready = tmp_path / "ready"
    child = (
        "import time; from surgery_edge.cli.launch import die_with_parent; die_with_parent(); "
        f"open({str(ready)!r}, 'w').close(); time.sleep(60)"
    )
    parent = (
        f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no handler runs in the parent
    proc.wait()
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _running(pid)

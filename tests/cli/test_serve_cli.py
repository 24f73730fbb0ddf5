"""`surgery-edge serve` as a process: it serves, SIGTERM drains the requests in flight, and no
stop (a signal while serving or starting, Ctrl-C, SIGKILL) leaves a process, a work folder or
a shared-memory segment behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from cli_checks import user_error
from serving_checks import engine_inputs, free_ports, images

pytest.importorskip("pytriton")
httpclient = pytest.importorskip("tritonclient.http")


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the server at {url} was not ready in {timeout_s} s")


def leftovers(owner: int) -> list[str]:
    """What the server owned by ``owner`` left: work folders, shared-memory segments, and
    processes (tritonserver and stubs run from the work folder; the watchdog names its owner
    in its environment)."""
    found = [str(p) for p in Path(tempfile.gettempdir()).glob(f"surgery-edge-serve-{owner}-*")]
    found += [str(p) for p in Path("/dev/shm").glob(f"pytrtion{owner}-*")]
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"surgery-edge-serve-{owner}-".encode() in argv or (
            f"SURGERY_EDGE_SERVE_OWNER={owner}\0".encode() in environ
        ):
            found.append(f"process {entry.name}: {argv[:100]!r}")
    return found


def nothing_left(owner: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := leftovers(owner)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left


def serve_command(engine, *options: str) -> list[str]:
    http, grpc, metrics = free_ports(3)
    return [sys.executable, "-m", "surgery_edge.cli.app", "serve", str(engine),
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
            "--device", "cpu", *options]  # fmt: skip


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_sigterm_answers_the_requests_in_flight_then_exits_0(engines):
    """Requests wait in Triton's queue (a 3 s batching delay) when SIGTERM arrives: every one
    is answered, the command exits with code 0 and leaves nothing behind. On IPv6 loopback
    where the machine has it (HTTP through the front, gRPC and metrics as well)."""
    host = "::1" if ipv6_loopback() else "127.0.0.1"
    command = serve_command(engines["dir"] / "surgeryv2-routed.onnx", "--no-task-models",
                            "--max-batch", "64", "--max-queue-delay-us", "3000000",
                            "--drain-timeout-s", "15", "--host", host)  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = command[command.index("--http-port") + 1]
        url = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        wait_ready(url, process)
        client = httpclient.InferenceServerClient(url, concurrency=8, network_timeout=60)
        x = images(6, seed=11)
        pending = [
            client.async_infer("engine", engine_inputs(httpclient, x[i : i + 1], [i % 3]))
            for i in range(6)
        ]
        time.sleep(0.5)  # the requests are queued, waiting for their batch to fill
        process.send_signal(signal.SIGTERM)
        answers = [p.get_result(timeout=60).as_numpy("logits") for p in pending]
        client.close()
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "model engine:" in output and "stopped." in output
    nothing_left(process.pid)
    from surgery_edge.runtime import load

    want = load(engines["dir"] / "surgeryv2-routed.onnx").routed_logits(x, np.arange(6) % 3)
    np.testing.assert_allclose(np.concatenate(answers), want, atol=1e-5)


# `surgery-edge serve` with an engine model that Triton refuses to load (a preferred batch
# above its max_batch_size: refused before any stub starts, so the failure comes fast)
FAILING_LOAD = """
import surgery_edge.runtime.serving_repository as serving
config = serving._engine_config
def broken(*args, **kwargs):
    out = config(*args, **kwargs)
    out["dynamic_batching"]["preferred_batch_size"] = [out["max_batch_size"] + 1]
    return out
serving._engine_config = broken
from surgery_edge.cli.app import main
main()
"""


def test_a_stop_while_starting_leaves_nothing(engines):
    """Four starts that end early: SIGTERM once the work folder exists (before tritonserver),
    Ctrl-C (SIGINT to the process group: serve, tritonserver and the stubs at once) and
    SIGKILL while tritonserver loads the models (its shared-memory segments exist), and a
    model that fails to load. Ctrl-C and SIGTERM exit with 130, the failed load with 2,
    naming the model and the server's message; SIGKILL cannot clean up by itself, so the
    watchdog does. None leaves a process, a work folder or a segment."""
    engine = engines["dir"] / "surgeryv2-routed.onnx"
    stops = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
    commands = {name: serve_command(engine, "--drain-timeout-s", "1") for name in stops}
    failing = serve_command(engine, "--drain-timeout-s", "1", "--no-task-models")
    commands["load fails"] = [sys.executable, "-c", FAILING_LOAD, *failing[3:]]
    processes = {
        name: subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for name, command in commands.items()
    }
    try:
        waiting = {name: processes[name] for name in stops}
        deadline = time.monotonic() + 120
        while waiting and time.monotonic() < deadline:
            for name, process in list(waiting.items()):
                assert process.poll() is None, process.communicate()[0]
                where = Path(tempfile.gettempdir()) if name == "sigterm" else Path("/dev/shm")
                prefix = "surgery-edge-serve-" if name == "sigterm" else "pytrtion"
                if list(where.glob(f"{prefix}{process.pid}-*")):
                    if name == "ctrl-c":
                        os.killpg(process.pid, stops[name])
                    else:
                        process.send_signal(stops[name])
                    del waiting[name]
            time.sleep(0.1)
        assert not waiting, f"no model started loading in {list(waiting)}"
        outputs = {name: p.communicate(timeout=60)[0] for name, p in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    for name in ("ctrl-c", "sigterm"):
        assert processes[name].returncode == 130, outputs[name]
        assert "interrupted" in outputs[name] and "Traceback" not in outputs[name]
    assert processes["sigkill"].returncode == -signal.SIGKILL
    failed = " ".join(outputs["load fails"].split())
    assert processes["load fails"].returncode == 2, failed
    assert "model 'engine' failed to load: dynamic batching preferred size must be <=" in failed
    assert "Traceback" not in failed
    for process in processes.values():
        nothing_left(process.pid)


def test_serve_refuses_bad_input(engines, tmp_path):
    assert "does not exist" in user_error(["serve", str(tmp_path / "nope.onnx")])
    engine = str(engines["dir"] / "surgeryv2-routed.onnx")
    assert "must differ" in user_error(
        ["serve", engine, "--http-port", "9000", "--grpc-port", "9000"]
    )
    user_error(["serve", engine, "--max-batch", "0"])  # out of range: a usage error, exit 2
    # Triton would ignore these logs silently: refused before anything starts
    assert "is a folder" in user_error(["serve", engine, "--log-file", str(tmp_path)])
    missing = tmp_path / "no" / "such" / "triton.log"
    assert "does not exist" in user_error(["serve", engine, "--log-file", str(missing)])
    # a model repository: one the repository writer made, and --watch only with one
    assert "needs a model repository folder" in user_error(["serve", engine, "--watch"])
    said = " ".join(user_error(["serve", str(tmp_path), "--watch"]).split())
    assert "holds no such folders" in said and str(tmp_path) in said

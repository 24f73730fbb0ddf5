"""`surgery-edge serve` as a process: it serves, and SIGTERM drains the requests in flight."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

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


def test_sigterm_answers_the_requests_in_flight_then_exits_0(engines):
    """Requests wait in Triton's queue (a 3 s batching delay) when SIGTERM arrives: every one
    is answered, and the command exits with code 0."""
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "surgery_edge.cli.app", "serve",
               str(engines["dir"] / "surgeryv2-routed.onnx"), "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--device", "cpu",
               "--no-task-models", "--max-batch", "64", "--max-queue-delay-us", "3000000",
               "--drain-timeout-s", "15"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"127.0.0.1:{http}"
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
    from surgery_edge.runtime import load

    want = load(engines["dir"] / "surgeryv2-routed.onnx").routed_logits(x, np.arange(6) % 3)
    np.testing.assert_allclose(np.concatenate(answers), want, atol=1e-5)


def test_serve_refuses_bad_input(engines, tmp_path):
    assert "does not exist" in user_error(["serve", str(tmp_path / "nope.onnx")])
    engine = str(engines["dir"] / "surgeryv2-routed.onnx")
    assert "must differ" in user_error(
        ["serve", engine, "--http-port", "9000", "--grpc-port", "9000"]
    )
    user_error(["serve", engine, "--max-batch", "0"])  # out of range: a usage error, exit 2

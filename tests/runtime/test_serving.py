"""Serving through Triton Inference Server (PyTriton): one real server for the module, loopback
only, every wait bounded. The request handling is also tested without a server."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
import urllib.error
import urllib.request
import zlib
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from image_files import png_bytes, png_header
from serving_checks import engine_inputs, free_ports, image_input, images

from surgery_edge.errors import ExportError
from surgery_edge.runtime.triton_models import FLUSH_S

pytest.importorskip("pytriton")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TIMEOUT_S = 60  # any one request


@pytest.fixture(scope="module")
def predictors(engines):
    from surgery_edge.runtime import load

    return {
        "engine": load(engines["dir"] / "surgeryv2-routed.onnx", device="cpu"),
        "v1": load(engines["dir"] / "surgery-all-tasks.onnx", device="cpu"),
    }


@pytest.fixture(scope="module")
def server(engines):
    """The V2 routed engine (with a model per task) and the V1 all-tasks engine, one server.

    The queue delay is long (50 ms) so that concurrent requests surely meet in the batcher."""
    from surgery_edge.runtime.serving import ServeOptions, Server

    http, grpc, metrics = free_ports(3)
    options = ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, max_batch=16,
                           max_queue_delay_us=50_000, device="cpu", threads=1, top_k=3,
                           startup_timeout_s=120, drain_timeout_s=5)  # fmt: skip
    engines = {"engine": engines["dir"] / "surgeryv2-routed.onnx",
               "v1": engines["dir"] / "surgery-all-tasks.onnx"}  # fmt: skip
    with Server(engines, options) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    client = httpclient.InferenceServerClient(server.http_url, concurrency=32,
                                              network_timeout=TIMEOUT_S)  # fmt: skip
    yield client
    client.close()


def metric(server, name: str, until=lambda values: True) -> dict[str, float]:
    """``{labels: value}`` of one Prometheus counter, once ``until(values)`` holds.

    The models send their counters every ``FLUSH_S``, not on the request path: a reading
    waits two flushes, then polls (bounded) for what the test expects."""
    time.sleep(2 * FLUSH_S)
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        found = re.findall(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M)
        values = {labels: float(value) for labels, value in found}
        if until(values) or time.monotonic() > deadline:
            return values
        time.sleep(FLUSH_S)


# --- the server ------------------------------------------------------------------------------


def test_health_readiness_and_metrics(server, http):
    assert http.is_server_live() and http.is_server_ready()
    assert sorted(server.models) == ["colours", "digits", "engine", "shapes", "v1"]
    assert all(http.is_model_ready(m) for m in server.models)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    assert grpc.is_server_ready() and grpc.is_model_ready("engine")
    assert grpc.get_model_metadata("engine").inputs[1].name == "task_ids"
    grpc.close()
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert "nv_inference_request_success" in text


def test_the_engine_model_answers_as_the_runtime_does(server, http, predictors):
    x, ids = images(5), np.array([0, 1, 2, 1, 0])
    want = predictors["engine"].routed_logits(x, ids)
    got = http.infer("engine", engine_inputs(httpclient, x, ids)).as_numpy("logits")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    got = grpc.infer("engine", engine_inputs(grpcclient, x, ids)).as_numpy("logits")
    grpc.close()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    every = predictors["v1"].all_task_logits(x)
    answer = http.infer("v1", engine_inputs(httpclient, x, None))
    for task, logits in zip(predictors["v1"].tasks, every):
        np.testing.assert_allclose(answer.as_numpy(f"logits_{task}"), logits, rtol=1e-5, atol=1e-5)
    # and every task in one tensor: unnamed outputs are all sent (KServe), or ask for it alone
    answers = [answer]
    for client, url in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
        c = client.InferenceServerClient(url)
        asked = [client.InferRequestedOutput("logits")]
        answers.append(c.infer("v1", engine_inputs(client, x, None), outputs=asked))
        c.close()
        assert answers[-1].as_numpy("logits_digits") is None
    for stacked in (a.as_numpy("logits") for a in answers):
        assert stacked.shape == (5, len(every), max(e.shape[1] for e in every))
        for t, logits in enumerate(every):
            width = logits.shape[1]
            np.testing.assert_allclose(stacked[:, t, :width], logits, rtol=1e-5, atol=1e-5)
            assert np.isneginf(stacked[:, t, width:]).all()


def test_task_models_take_image_bytes(http, predictors):
    encoded = [png_bytes(40, 30, (200, 30, 30)), png_bytes(17, 64, (30, 30, 220))]
    for task in predictors["engine"].tasks:
        answer = http.infer(task, image_input(httpclient, *encoded), parameters={"top_k": 2})
        labels, probs = answer.as_numpy("labels"), answer.as_numpy("probs")
        assert labels.shape == probs.shape == (2, 2)
        for row, result in enumerate(predictors["engine"].predict(encoded, task=task)):
            top = np.argsort(result[task].probs)[::-1][:2]
            names = predictors["engine"].class_names[predictors["engine"].task_index(task)]
            assert [b.decode() for b in labels[row]] == [names[i] for i in top]
            np.testing.assert_allclose(probs[row], np.array(result[task].probs)[top], atol=1e-5)
    default = http.infer("shapes", image_input(httpclient, encoded[0])).as_numpy("labels")
    assert default.shape == (1, 3)  # the server's --top-k


def test_requests_for_different_tasks_share_engine_calls(server, http, predictors):
    """Concurrent requests for three tasks, to the routed engine and through the task models,
    meet in Triton's dynamic batcher: engine calls hold several tasks."""
    before = metric(server, "surgery_edge_engine_calls_total")
    x = images(24, seed=3)
    tasks = predictors["engine"].tasks

    def ask(i: int):
        if i % 2:
            return http.async_infer("engine", engine_inputs(httpclient, x[i : i + 1], [i % 3]))
        return http.async_infer(tasks[i % 3], image_input(httpclient, png_bytes(30 + i, 30)))

    pending = [ask(i) for i in range(24)]
    answers = [p.get_result(timeout=TIMEOUT_S) for p in pending]
    want = predictors["engine"].routed_logits(x, np.arange(24) % 3)
    for i in range(1, 24, 2):
        np.testing.assert_allclose(answers[i].as_numpy("logits")[0], want[i], atol=1e-5)

    def engine_calls(after: dict[str, float]) -> dict[str, float]:
        new = {k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
        return {k: v for k, v in new.items() if 'model="engine"' in k}

    def engine_rows(after: dict[str, float]) -> float:
        calls = engine_calls(after)
        return sum(int(re.search(r'rows="(\d+)"', k)[1]) * v for k, v in calls.items())

    after = metric(server, "surgery_edge_engine_calls_total", until=lambda m: engine_rows(m) >= 24)
    rows = engine_rows(after)
    assert rows == 24  # every request reached the engine once, its task-model ones by BLS
    mixed = [k for k in engine_calls(after) if int(re.search(r'tasks="(\d+)"', k)[1]) >= 2]
    assert mixed, f"no engine call held more than one task: {engine_calls(after)}"


def test_a_bad_request_fails_alone(server, http, predictors):
    """Bad requests sent together with good ones, so that they share batches: each bad one
    gets its own error (HTTP 400), every good one its answer, and the server stays ready."""
    x = images(4, seed=5)
    good = [("engine", engine_inputs(httpclient, x[i : i + 1], [i % 3])) for i in range(4)]
    nan = x[:1].copy()
    nan[0, 0, 0, 0] = np.nan
    bad = {
        "task id out of range": ("engine", engine_inputs(httpclient, x[:1], [3]), "out of range"),
        "negative task id": ("engine", engine_inputs(httpclient, x[:1], [-1]), "out of range"),
        "non-finite images": ("engine", engine_inputs(httpclient, nan, [0]), "NaN"),
        "corrupt bytes": ("digits", image_input(httpclient, b"\x89PNG garbage"), "not a readable"),
        "bomb": ("shapes", image_input(httpclient, png_header(50000, 50000)), "max_pixels"),
        "empty bytes": ("colours", image_input(httpclient, b""), "empty"),
        "unknown task": ("sunsets", image_input(httpclient, png_bytes()), "unknown model"),
    }  # fmt: skip
    wrong_shape = httpclient.InferInput("images", [1, 3, 8, 8], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    wrong_dtype = httpclient.InferInput("images", [1, 3, 16, 16], "FP64")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float64))
    empty = httpclient.InferInput("images", [0, 3, 16, 16], "FP32")
    empty.set_data_from_numpy(np.zeros((0, 3, 16, 16), np.float32))
    bad["wrong shape"] = ("v1", [wrong_shape], "unexpected shape")
    bad["wrong dtype"] = ("v1", [wrong_dtype], "FP64")
    bad["empty batch"] = ("v1", [empty], "expected")

    def result(pending):
        try:
            return pending.get_result(timeout=TIMEOUT_S)
        except InferenceServerException as e:
            return e

    jobs = [*good, *((m, i) for m, i, _ in bad.values())]
    results = [result(p) for p in [http.async_infer(m, i) for m, i in jobs]]
    want = predictors["engine"].routed_logits(x, np.arange(4) % 3)
    for i, answer in enumerate(results[: len(good)]):
        assert not isinstance(answer, Exception), answer
        np.testing.assert_allclose(answer.as_numpy("logits")[0], want[i], atol=1e-5)
    for (what, (_, _, message)), answer in zip(bad.items(), results[len(good) :]):
        assert isinstance(answer, InferenceServerException), what
        assert message.lower() in answer.message().lower(), (what, answer.message())
        assert answer.status() in ("400", "404"), (what, answer.status())
    assert "Traceback" not in " ".join(str(r) for r in results)
    reasons = ('reason="task_id"', 'reason="too_large"')
    rejected = metric(server, "surgery_edge_rejected_requests_total",
                      until=lambda m: all(any(r in k for k in m) for r in reasons))  # fmt: skip
    assert any('reason="task_id"' in k for k in rejected)
    assert any('reason="too_large"' in k for k in rejected)
    # the server is healthy and answers the next good request
    assert http.is_server_ready() and all(http.is_model_ready(m) for m in server.models)
    answer = http.infer("engine", engine_inputs(httpclient, x[:1], [2]))
    want = predictors["engine"].routed_logits(x[:1], np.array([2]))
    np.testing.assert_allclose(answer.as_numpy("logits"), want, atol=1e-5)


def gzip_bomb(mib: int) -> bytes:
    """A gzip stream of ``mib`` MiB of zeros, about a thousandth of that in size, built without
    holding what it inflates to: one MiB compressed and fully flushed (which resets the
    compressor, so every MiB gives the same bytes), repeated."""
    zeros = bytes(1 << 20)
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = raw.compress(zeros) + raw.flush(zlib.Z_FULL_FLUSH)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", _zeros_crc32(mib), (mib << 20) & 0xFFFFFFFF)
    return header + block * mib + raw.flush() + trailer


def _zeros_crc32(mib: int) -> int:
    """The CRC-32 of ``mib`` MiB of zeros without reading them: adding a MiB of zeros is an
    affine map of the CRC over GF(2) (``zlib.crc32`` gives its columns), raised to ``mib`` by
    squaring."""
    zeros = bytes(1 << 20)

    def apply(columns: list[int], offset: int, x: int) -> int:
        for i in range(32):
            if x >> i & 1:
                offset ^= columns[i]
        return offset

    offset = zlib.crc32(zeros, 0)
    columns = [zlib.crc32(zeros, 1 << i) ^ offset for i in range(32)]
    crc = 0
    while mib:
        if mib & 1:
            crc = apply(columns, offset, crc)
        columns, offset = [apply(columns, 0, c) for c in columns], apply(columns, offset, offset)
        mib >>= 1
    return crc


def _peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM), where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M)[1]) / 1024


def test_hostile_requests_are_refused_before_the_engine(server, http, predictors):
    """What took the server down or grew it by gigabytes: KServe JSON declaring 2^31 images,
    1x3x32x2^31, 2^31 task ids; a body that is not JSON (Triton's own answer: 500); a 1 MB
    gzip body inflating to 1 GiB. The HTTP front (in this process) refuses each with 400 or
    413 and a one-line message, reading at most --max-request-mb of the bomb; after each the
    server is ready and answers a normal request."""
    import gzip

    assert gzip.decompress(gzip_bomb(5)) == bytes(5 << 20)  # the builder makes real gzip
    images_input = {"name": "images", "datatype": "FP32", "data": [0.0]}
    good = {"name": "images", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.0] * 768}
    cases = [
        ("v1", {"inputs": [{**images_input, "shape": [2**31]}]}, 400, "unexpected shape"),
        ("v1", {"inputs": [{**images_input, "shape": [1, 3, 32, 2**31]}]}, 400,
         "expected [B, 3, 16, 16] with B from 1 to 16"),
        ("engine", {"inputs": [good, {"name": "task_ids", "shape": [2**31, 1], "datatype": "INT64",
                                      "data": [0]}]}, 400, "'task_ids' of model 'engine'"),
        ("v1", b"{not json", 400, "not JSON"),
        ("v1", {"inputs": [{**good, "data": "abc"}]}, 400, "'data' must be an array"),
        ("v1", ("gzip", gzip_bomb(1025)), 413, "larger than 67108864 bytes"),
        ("v1", ("br", b"\x0b\x02\x80{}\x03"), 415, "'br' is not taken"),
    ]  # fmt: skip
    host, port = server.http_url.rsplit(":", 1)
    x = images(2, seed=9)
    want = predictors["engine"].routed_logits(x, np.array([2, 0]))
    for model, body, status, message in cases:
        headers = {"Content-Type": "application/json"}
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        elif isinstance(body, tuple):
            headers["Content-Encoding"], body = body
        if status == 413:
            assert len(body) < 1.1e6
            measured = _peak_rss_reset()
            before = _rss_mb("VmRSS")
        connection = HTTPConnection(host, int(port), timeout=TIMEOUT_S)
        connection.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        reply = connection.getresponse()
        answer = json.loads(reply.read())
        connection.close()
        assert (reply.status, message in answer["error"]) == (status, True), answer
        if status == 413 and measured:  # the front inflated 64 MiB of the bomb, not 1 GiB
            assert _rss_mb("VmHWM") - before < 400
        assert http.is_server_ready() and all(http.is_model_ready(m) for m in server.models)
        got = http.infer("engine", engine_inputs(httpclient, x, [2, 0])).as_numpy("logits")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a client's compressed request and answer pass the front both ways
    got = http.infer("engine", engine_inputs(httpclient, x, [2, 0]),
                     request_compression_algorithm="gzip",
                     response_compression_algorithm="gzip").as_numpy("logits")  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_statistics_are_reachable_with_the_access_token(server):
    """Triton's statistics and repository API want PyTriton's token: the server writes it to
    a 0600 file that ``serve`` names, and it passes the HTTP front."""
    token = server.token_file.read_text().strip()
    assert token == server.access_token and server.token_file.stat().st_mode & 0o777 == 0o600
    assert str(server.token_file) in "\n".join(server.describe())
    url = f"http://{server.http_url}/v2/models/engine/stats"
    with pytest.raises(urllib.error.HTTPError, match="restricted|403|401|400"):
        urllib.request.urlopen(url, timeout=TIMEOUT_S)
    asked = urllib.request.Request(url, headers={"triton-access-token": token})
    with urllib.request.urlopen(asked, timeout=TIMEOUT_S) as reply:
        stats = json.loads(reply.read())
    assert stats["model_stats"][0]["name"] == "engine"


def test_serve_stats_shows_each_models_counts_and_queue_times(server, http, tmp_path):
    """``surgery-edge serve-stats`` against the running server: the requests each model
    answered, its engine calls and mean queue time, with the token file; a wrong token or no
    server is a user error naming what to give."""
    from cli_checks import user_error
    from surgery_edge.cli.app import app
    from typer.testing import CliRunner

    x = images(2, size=server.metadata["v1"].preprocessing.image_size)
    http.infer("v1", engine_inputs(httpclient, x, None))
    args = ["serve-stats", server.http_url, "--token-file", str(server.token_file)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["model", "requests", "failed"] and "queue" in lines[0]
    v1 = next(line.split() for line in lines if line.startswith("v1 "))
    assert int(v1[1]) >= 1 and int(v1[3]) >= 1 and float(v1[5]) >= 0, v1  # requests, calls, queue
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token\n")
    assert "not this server's" in user_error([*args[:2], "--token-file", str(wrong)])
    assert "is `surgery-edge serve` running" in user_error(
        ["serve-stats", f"127.0.0.1:{free_ports(1)[0]}", "--token-file", str(wrong)]
    )


def test_grpc_requests_are_bounded_by_triton(server):
    """gRPC does not pass the HTTP front: Triton itself refuses the same shapes before it
    allocates (INVALID_ARGUMENT), and the server stays ready."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(server.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    cases = [("v1", {"images": [2**31]}), ("v1", {"images": [1, 3, 32, 2**31]}),
             ("engine", {"images": [1, 3, 16, 16], "task_ids": [2**31, 1]})]  # fmt: skip
    for model, shapes in cases:
        request = service_pb2.ModelInferRequest(model_name=model)
        for name, shape in shapes.items():
            tensor = request.inputs.add(name=name, shape=shape)
            tensor.datatype = "FP32" if name == "images" else "INT64"
            request.raw_input_contents.append(bytes(3072 if shape[0] == 1 else 8))
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_ready()
    client.close()


def test_a_new_engine_version_rolls_in_under_load_without_a_failed_request(engines, tmp_path):
    """``serve REPO --watch``: version 1 (one task) serves while clients send requests for it
    steadily, to the engine (task ids) and to its task model (image bytes); version 2 (three
    tasks) is written into the folder, picked up and rolled to. No request fails; a request for
    a task only version 2 has gets an error naming it and the loading version until it is
    ready, then its answer from version 2; the old version is gone from the server."""
    import threading

    from surgery_edge.export.triton import TritonOptions, write_repository
    from surgery_edge.runtime.rolling import VersionedServer
    from surgery_edge.runtime.serving import ServeOptions

    options = TritonOptions(name="m", kind="cpu")
    write_repository(engines["dir"] / "single-expert.onnx", tmp_path, options)
    http_port, grpc_port, metrics_port = free_ports(3)
    serve = ServeOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                         max_batch=8, device="cpu", threads=1, startup_timeout_s=120,
                         drain_timeout_s=5)  # fmt: skip
    said: list[str] = []
    x, encoded = images(2, seed=11), png_bytes(20, 20)
    answers: list[str] = []  # the engine version of each answer
    failures: list[str] = []
    stop = threading.Event()

    def steady(url: str) -> None:  # one request in flight at a time, for the old version's task
        client = httpclient.InferenceServerClient(url, network_timeout=TIMEOUT_S)
        while not stop.is_set():
            try:
                if len(answers) % 2:
                    reply = client.infer("engine", engine_inputs(httpclient, x[:1], [0]))
                    answers.append(reply.get_response()["model_version"])
                else:
                    client.infer("digits", image_input(httpclient, encoded))
                    answers.append("task model")
            except Exception as e:  # counted, and the load goes on
                failures.append(str(e))
        client.close()

    with VersionedServer(tmp_path / "m", serve, watch=True, poll_s=0.1, log=said.append) as server:
        assert sorted(server.models) == ["digits", "engine"] and server.version == 1
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=TIMEOUT_S)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        load = threading.Thread(target=steady, args=(server.http_url,))
        load.start()
        try:
            write_repository(engines["dir"] / "surgeryv2-routed.onnx", tmp_path, options)
            refused = set()
            deadline = time.monotonic() + 120
            while server.version == 1 and time.monotonic() < deadline:
                for ask, module in ((client, httpclient), (grpc, grpcclient)):
                    try:
                        ask.infer("shapes", image_input(module, encoded))
                    except InferenceServerException as e:
                        refused.add(e.message())
                time.sleep(0.05)
            assert server.version == 2, said
            before = len(answers)
            while len(answers) < before + 4:  # the load goes on against version 2
                time.sleep(0.05)
        finally:
            stop.set()
            load.join(timeout=TIMEOUT_S)
        assert failures == [] and len(answers) >= 8  # requests before, during and after
        assert {"1", "2"} <= set(answers)  # the engine answered from both versions
        loading = [m for m in refused if "which is loading" in m]
        assert loading and all("'shapes'" in m and "engine version 2" in m for m in loading)
        assert all(m in loading or "unknown model" in m.lower() for m in refused), refused
        reply = grpc.infer("shapes", image_input(grpcclient, encoded))
        assert reply.as_numpy("labels").shape == (1, 5)  # the default top_k of its 6 classes
        reply = client.infer("engine", engine_inputs(httpclient, x[:1], [2]))
        assert reply.get_response()["model_version"] == "2"
        assert sorted(server.models) == ["colours", "digits", "engine", "shapes"]
        assert not client.is_model_ready("engine", "1") and client.is_model_ready("engine", "2")
        assert said and "engine version 2 serving" in said[-1] and "shapes, colours" in said[-1]
        client.close()
        grpc.close()


# --- the repository and the request handling, without a server ------------------------------


def test_the_serving_repository_is_valid_triton_config(engines, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb2

    from surgery_edge.runtime.serving import ServeOptions, serving_repository

    options = ServeOptions(max_batch=8, preferred_batches=(4,), instances=2, device="cpu")
    metas = serving_repository(
        {"engine": engines["dir"] / "surgeryv2-routed.onnx"}, tmp_path, options
    )
    assert list(metas) == ["engine"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["engine", *metas["engine"].tasks])
    for name in names:
        config = text_format.Parse(
            (tmp_path / name / "config.pbtxt").read_text(), pb2.ModelConfig()
        )
        assert config.name == name and config.backend == "python" and config.max_batch_size == 8
        assert list(config.dynamic_batching.preferred_batch_size) == [4]
        assert "TritonPythonModel" in (tmp_path / name / "1" / "model.py").read_text()
    engine = text_format.Parse(
        (tmp_path / "engine" / "config.pbtxt").read_text(), pb2.ModelConfig()
    )
    assert engine.instance_group[0].count == 2
    assert [i.name for i in engine.input] == ["images", "task_ids"]
    assert list(engine.input[0].dims) == [3, 16, 16]
    assert [o.name for o in engine.output] == ["logits", "probs"]
    v1 = engines["dir"] / "surgery-all-tasks.onnx"
    only = ServeOptions(task_models=False)
    meta = serving_repository({"v1": v1}, tmp_path / "v1", only)["v1"]
    config = text_format.Parse((tmp_path / "v1" / "v1" / "config.pbtxt").read_text(),
                               pb2.ModelConfig())  # fmt: skip
    outputs = {o.name: list(o.dims) for o in config.output}
    width = max(meta.class_counts)
    assert outputs == {**{f"logits_{t}": [c] for t, c in zip(meta.tasks, meta.class_counts)},
                       "logits": [len(meta.tasks), width]}  # fmt: skip


def test_serving_refuses_bad_engines_and_options(engines, tmp_path):
    from surgery_edge.runtime.serving import ServeOptions, Server, serving_repository

    with pytest.raises(ExportError, match="does not exist"):
        serving_repository({"engine": tmp_path / "nope.onnx"}, tmp_path / "r", ServeOptions())
    routed = engines["dir"] / "surgeryv2-routed.onnx"
    with pytest.raises(ExportError, match="name of an engine model"):
        serving_repository({"engine": routed, "digits": routed}, tmp_path / "r2", ServeOptions())
    for options, match in [
        (ServeOptions(http_port=8000, grpc_port=8000), "must differ"),
        (ServeOptions(max_batch=0), "--max-batch"),
        (ServeOptions(drain_timeout_s=60), "--drain-timeout-s"),
        (ServeOptions(name="a b"), "cannot name a Triton model"),
        (ServeOptions(max_pixels=0), "max_pixels"),
    ]:
        with pytest.raises(ExportError, match=match):
            Server(routed, options)


def test_a_busy_port_is_named(engines):
    from surgery_edge.runtime.serving import ServeOptions, Server

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http, metrics = free_ports(2)
        options = ServeOptions(http_port=http, grpc_port=port, metrics_port=metrics)
        with pytest.raises(ExportError, match=rf"Port {port} .* --grpc-port"):
            Server(engines["dir"] / "surgeryv2-routed.onnx", options).start()


def test_engine_requests_answer_each_request_on_its_own(predictors):
    from surgery_edge.runtime.triton_models import EngineRequests, Rejected

    handler = EngineRequests(predictors["engine"].backend)
    x = images(6, seed=7)
    requests = [
        {"images": x[:2], "task_ids": np.array([[0], [2]])},
        {"images": x[2:3], "task_ids": np.array([[7]])},
        {"images": x[3:3], "task_ids": np.zeros((0, 1), np.int64)},
        {"images": x[3:6], "task_ids": np.array([[1], [1], [0]])},
    ]
    answers = handler.run(requests)
    assert [type(a).__name__ for a in answers] == ["dict", "Rejected", "Rejected", "dict"]
    assert answers[1].reason == "task_id" and answers[2].reason == "empty"
    want = predictors["engine"].routed_logits(x[[0, 1, 3, 4, 5]], np.array([0, 2, 1, 1, 0]))
    np.testing.assert_allclose(np.concatenate([answers[0]["logits"], answers[3]["logits"]]), want,
                               atol=1e-6)  # fmt: skip
    assert handler.last_rows == 5 and sorted(handler.last_tasks.tolist()) == [0, 0, 1, 1, 2]
    assert isinstance(
        handler.check({"images": x[:1].astype(np.float64), "task_ids": np.zeros(1)}), Rejected
    )
    assert handler.stacked is None  # a routed engine pads one output already
    every = EngineRequests(predictors["v1"].backend)
    answer = every.run([{"images": x[:2]}])[0]
    stacked = every.stack(answer)
    counts = predictors["v1"].backend.meta.class_counts
    assert stacked.shape == (2, len(counts), max(counts)) and stacked.dtype == np.float32
    for t, name in enumerate(every.outputs):
        assert np.array_equal(stacked[:, t, : counts[t]], answer[name])
        assert np.isneginf(stacked[:, t, counts[t] :]).all()


def test_a_request_naming_its_task_is_answered_by_name_by_any_version(predictors):
    """What task models send: the task by name (another version may number it otherwise) and
    the engine version they were made for. A version without the task says whether the
    version that has it is loading or this one dropped it; an id out of range names the
    version loading beside it."""
    from surgery_edge.runtime.triton_models import EngineRequests

    handler = EngineRequests(predictors["engine"].backend, version=3, newer=lambda: [4])
    x = images(3, seed=8)
    wrong_ids = {"images": x[:2], "task_ids": np.array([[0], [0]])}  # another version's ids
    answers = handler.run(
        [wrong_ids, {"images": x[2:], "task_ids": np.array([[0]])}, *[wrong_ids] * 3],
        [("colours", 2), (None, None), ("sunsets", 4), ("sunsets", 2), ("sunsets", 3)],
    )
    want = predictors["engine"].routed_logits(x[:2], np.array([2, 2]))
    np.testing.assert_allclose(answers[0]["logits"], want, atol=1e-6)
    assert handler.last_tasks.tolist() == [2, 2, 0]
    assert answers[2].reason == "loading" and answers[2].message == (
        "task 'sunsets' is served by engine version 4, which is loading; version 3 answers now "
        "and serves digits, shapes, colours. Retry once version 4 is ready."
    )
    assert answers[3].reason == answers[4].reason == "task"  # this version dropped it
    assert "not served by engine version 3" in answers[3].message
    refused = handler.check({"images": x[:1], "task_ids": np.array([[5]])})
    assert refused.message.startswith("task id 5 is out of range: this engine (version 3)")
    assert refused.message.endswith("Version 4 of this model is loading: retry once it is ready.")
    every = EngineRequests(predictors["v1"].backend, version=1)
    assert every.check({"images": x[:1]}, "sunsets", 2).reason == "loading"
    assert every.run([{"images": x[:1]}], [("shapes", 1)])[0]["logits_shapes"].shape == (1, 6)


def test_task_requests_decode_with_the_engines_preprocessing(predictors):
    from surgery_edge.runtime.preprocess import preprocess
    from surgery_edge.runtime.triton_models import Rejected, TaskRequests

    meta = predictors["engine"].meta
    task = TaskRequests(meta, "shapes", top_k=3, max_pixels=10_000)
    encoded = png_bytes(50, 20)
    np.testing.assert_array_equal(task.decode(np.array([[encoded]], dtype=object)),
                                  preprocess([encoded], meta.preprocessing))  # fmt: skip
    too_big = task.decode(np.array([[png_bytes(200, 200)]], dtype=object))
    assert isinstance(too_big, Rejected) and too_big.reason == "too_large"
    assert isinstance(task.requested_top_k({"top_k": 0}), Rejected)
    assert task.requested_top_k({}) == 3 and task.requested_top_k({"top_k": 6}) == 6
    answer = task.answer(np.array([[0.0, 3.0, 1.0, -1.0, 2.0, 0.5, -np.inf]]), 2)
    assert answer["labels"].tolist() == [[b"triangle", b"star"]]
    assert answer["classes"].tolist() == [[1, 4]] and answer["probs"].dtype == np.float32
    with pytest.raises(ExportError, match="not one of"):
        TaskRequests(meta, "sunsets", 3, 100)


def test_model_counters_are_summed_and_sent_off_the_request_path():
    """The stub's counters cost a round trip to the server each: requests only add to sums,
    sent at most every flush_s (after an execute, or by a thread once the model is idle); a
    failing send is logged once and never reaches a request."""
    from types import SimpleNamespace

    from surgery_edge.runtime.triton_models import _Metrics

    sent, warnings, broken = [], [], []

    class Family:
        COUNTER = "counter"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels):  # noqa: N802 (pb_utils's name)
            family = self.name

            class Metric:
                def increment(self, value):
                    if broken:
                        raise RuntimeError("the server went away")
                    sent.append((family, labels, value))

            return Metric()

    pb = SimpleNamespace(MetricFamily=Family, Logger=SimpleNamespace(log_warn=warnings.append))
    metrics = _Metrics(pb, "engine", flush_s=3600)  # the thread never wakes: flush by hand
    for _ in range(3):
        metrics.add("calls", rows="4", tasks="2")
    metrics.add("rows", 5.0, task="digits")
    assert sent == []  # nothing on the request path
    metrics.flush()
    calls = ("surgery_edge_engine_calls_total", {"model": "engine", "rows": "4", "tasks": "2"})
    assert sent == [(*calls, 3.0), ("surgery_edge_engine_rows_total",
                                     {"model": "engine", "task": "digits"}, 5.0)]  # fmt: skip
    with metrics.executing():  # the end of an execute sends only once flush_s has passed
        metrics.add("calls", rows="4", tasks="2")
    assert len(sent) == 2
    metrics._flush_s = 0.0
    with metrics.executing():
        metrics.add("calls", rows="4", tasks="2")
    assert sent[-1] == (*calls, 2.0)  # both executes' calls, in one increment
    metrics._flush_s = 3600
    metrics.add("calls", rows="4", tasks="2")
    metrics.close()  # what is left goes out at finalize
    assert sent[-1] == (*calls, 1.0) and not metrics._thread.is_alive()
    with pytest.raises(KeyError, match="no metric family"):
        metrics.add("latency")
    fast = _Metrics(pb, "v1", flush_s=0.01)
    broken.append(True)
    fast.add("rejected", reason="shape")
    fast.add("rejected", reason="shape")
    deadline = time.monotonic() + 10
    while not warnings and time.monotonic() < deadline:
        time.sleep(0.01)
    fast.add("rejected", reason="shape")
    time.sleep(0.05)
    fast._stop.set()
    fast._thread.join()
    assert len(warnings) == 1 and "v1: metrics not sent: the server went away" in warnings[0]


def test_a_failed_start_names_each_model_and_the_servers_message(engines, tmp_path):
    """From Triton's log (lines as Triton 2.51 writes them): a model whose stub failed to
    initialise and one whose config was refused, each named with the message's first line."""
    from surgery_edge.runtime.serving import ServeOptions, Server

    log = tmp_path / "triton.log"
    log.write_text(
        'E1206 17:34:05.128184 27545 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        "E1206 17:34:13.435749 27545 model_lifecycle.cc:642] \"failed to load 'digits' version 1"
        ': Internal: ExportError: the stub loaded another libpython.\\n\\nAt:\\n  model.py(2)"\n'
        'E1206 17:40:49.043898 32068 model_repository_manager.cc:1460] "Poll failed for model '
        "directory 'engine': dynamic batching preferred size must be <= max batch size\"\n"
    )
    server = Server(engines["dir"] / "surgeryv2-routed.onnx", ServeOptions(log_file=log))
    assert server._failure("exited while loading the models") == (
        "Triton Inference Server exited while loading the models: model 'digits' failed to "
        "load: Internal: ExportError: the stub loaded another libpython.; model 'engine' failed "
        "to load: dynamic batching preferred size must be <= max batch size"
    )


def test_a_model_that_fails_to_load_fails_the_start_naming_it(engines, tmp_path, monkeypatch):
    """A real server where one model's engine breaks after the repository is written: the
    start fails at once (no second try), naming that model and the server's message, as a
    usage error (exit 2), and leaves nothing behind."""
    import shutil

    from surgery_edge.runtime import serving

    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    shutil.copy(engines["dir"] / "surgery-all-tasks.onnx", good)
    shutil.copy(engines["dir"] / "surgery-all-tasks.onnx", bad)
    write = serving.serving_repository

    def then_break(*args, **kwargs):
        metas = write(*args, **kwargs)
        bad.write_bytes(b"not an engine any more")  # the stub's load fails, not the check here
        return metas

    monkeypatch.setattr(serving, "serving_repository", then_break)
    starts = []
    once = serving.Server._start_once
    monkeypatch.setattr(serving.Server, "_start_once", lambda self: starts.append(1) or once(self))
    http, grpc, metrics = free_ports(3)
    options = serving.ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics,
                                   device="cpu", threads=1, task_models=False,
                                   startup_timeout_s=60, drain_timeout_s=2)  # fmt: skip
    server = serving.Server({"good": good, "broken": bad}, options)
    with pytest.raises(serving.StartFailed) as failed:
        server.start()
    assert list(failed.value.models) == ["broken"] and failed.value.exit_code == 2
    message = str(failed.value)
    assert "model 'broken' failed to load" in message and "'good'" not in message
    assert "not a readable ONNX model" in message, message  # the server's (the stub's) words
    assert starts == [1] and server._work is None  # one start, and it cleaned up


def test_a_start_with_no_model_to_blame_is_tried_once_more(engines, monkeypatch, capsys):
    from surgery_edge.runtime import serving

    outcomes = [serving.StartFailed("Triton Inference Server exited: no error in its log", {})]
    outcomes.append(None)

    def start_once(self):
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return self

    monkeypatch.setattr(serving.Server, "_start_once", start_once)
    server = serving.Server(engines["dir"] / "surgeryv2-routed.onnx")
    assert server.start() is server and not outcomes  # the second start served
    assert "no error in its log Starting once more" in capsys.readouterr().err
    twice = [serving.StartFailed("exited", {}), serving.StartFailed("exited again", {})]
    outcomes[:] = twice
    with pytest.raises(serving.StartFailed, match="exited again") as failed:
        server.start()
    assert failed.value.exit_code == 3  # the server failed, not the input: run again
    outcomes[:] = [serving.StartFailed("model 'x' failed to load: bad", {"x": "bad"}), None]
    with pytest.raises(serving.StartFailed, match="model 'x'"):
        server.start()  # a model to blame: no second try
    assert outcomes == [None]


def _wait_for_command_line(pid: int, word: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while word not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
        assert time.monotonic() < deadline, f"process {pid} never showed {word!r}"
        time.sleep(0.01)


def test_the_next_start_removes_what_a_dead_server_left(tmp_path):
    """``sweep_stale`` (called by every start): a work folder and segments named after a pid
    that no process has are removed, and a process still running from that folder (an
    orphaned stub) is killed; a live owner's folder and a segment a process names are kept."""
    import subprocess
    import sys

    from surgery_edge.runtime import server_processes as sp

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has now
    stale = tmp_path / f"{sp.WORK_PREFIX}{gone.pid}-abcd1234"
    (stale / "repository").mkdir(parents=True)
    live = tmp_path / f"{sp.WORK_PREFIX}{os.getpid()}-abcd1234"
    live.mkdir()
    other = tmp_path / "surgery-edge-serve-someone-else"  # not named after a pid: not ours
    other.mkdir()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               f"{stale}/repository/model.py"])  # fmt: skip
    segments = [sp.SHM_DIR / f"{sp.SHM_PREFIX}{gone.pid}-test{i}" for i in range(2)]
    try:
        for segment in segments:
            segment.write_bytes(b"")
        named = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                  segments[1].name])  # fmt: skip
        # a process shows its own command line only once it has exec'd: on a loaded machine
        # that can come after the sweep, which then sees the parent's (seen in make test)
        for proc, word in ((orphan, str(stale)), (named, segments[1].name)):
            _wait_for_command_line(proc.pid, word)
        removed = sp.sweep_stale(tmp_path)
        named.kill()
        named.wait()
        assert orphan.wait(timeout=10) < 0  # ended by a signal
        assert sorted(removed) == sorted([str(stale), str(segments[0])])
        assert not stale.exists() and live.is_dir() and other.is_dir()
        assert not segments[0].exists() and segments[1].exists()
    finally:
        orphan.kill()
        for segment in segments:
            segment.unlink(missing_ok=True)


def test_the_stub_gets_this_interpreters_libpython():
    import sysconfig

    from surgery_edge.runtime.serving import _pytriton_libs, stub_environment
    from surgery_edge.runtime.triton_models import check_interpreter

    env = stub_environment({"LD_LIBRARY_PATH": "/opt/x:" + str(sysconfig.get_config_var("LIBDIR"))})
    paths = env["LD_LIBRARY_PATH"].split(":")
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert paths[:2] == [sysconfig.get_config_var("LIBDIR"), "/opt/x"]
    assert paths[-1] == str(_pytriton_libs())  # tritonserver's own libraries, found
    assert stub_environment(env) == {}  # nothing more to change
    check_interpreter({"python_version": __import__("platform").python_version()})
    with pytest.raises(ExportError, match="another libpython"):
        check_interpreter({"python_version": "3.11.2-other"})


def test_serving_and_the_repository_writer_need_no_torch():
    """The stub processes import the runtime's Triton models; the repository writer runs where
    only the engine file is: neither may pull in torch (or the ONNX exporter)."""
    import subprocess
    import sys

    script = (
        'import sys; sys.modules["torch"] = None\n'
        "import surgery_edge.runtime.serving, surgery_edge.runtime.triton_models\n"
        "import surgery_edge.export.triton\n"
        "print(sorted(m for m, v in sys.modules.items()\n"
        '             if v and m.split(".")[0] in ("torch", "triton")))'
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

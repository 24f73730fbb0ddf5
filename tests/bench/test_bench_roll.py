"""The version-roll benchmark's bookkeeping, without a server (``serve REPO --watch`` itself is
tested under load in tests/runtime/test_serving.py): which requests count as steady and which
as the roll's, the CPU read from the samples, the load's end, the verdict and the page."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from surgery_edge.bench.proc import ServerCpuSampler
from surgery_edge.bench.roll import (
    Roll,
    RollBenchConfig,
    _Observed,
    _part,
    _roll,
    _totals,
    main,
    markdown,
)
from surgery_edge.bench.serve_load import load, plan

ROOT = Path(__file__).resolve().parents[2]


def test_steady_requests_lie_inside_their_window_and_the_rolls_overlap_it():
    done = [(0.0, 0.5, True), (0.9, 1.1, True), (1.2, 1.3, False), (1.9, 2.5, True),
            (2.6, 2.7, True)]  # fmt: skip
    assert _part(done, 0.0, 1.0, overlap=False) == ([500.0], 0)  # (0.9, 1.1) ends after it
    latencies, failed = _part(done, 1.0, 2.0, overlap=True)
    assert [round(x) for x in latencies] == [200, 600] and failed == 1  # in flight in [1, 2]


def test_cores_come_from_the_samples_and_a_new_stub_counts_from_its_birth():
    cpu = ServerCpuSampler()
    cpu.models = {1: None, 2: "engine", 3: "engine"}
    cpu.born = {1: -math.inf, 2: -math.inf, 3: 5.0}
    cpu.samples = [(0.0, {1: 1.0, 2: 2.0}, 10.0), (4.0, {1: 2.0, 2: 4.0}, 18.0),
                   (6.0, {1: 2.5, 2: 4.5, 3: 0.5}, 22.0)]  # fmt: skip
    assert cpu.cores(0.0, 4.0) == (0.75, 2.0)
    assert cpu.cores(4.0, 6.0) == (0.75, 2.0)  # pid 3 from 0: it did not exist at 4 s
    assert cpu.cores(4.5, 5.5) == (None, None)  # no two samples inside
    assert cpu.new_process_cpu(4.0, 6.0, "engine") == 0.5
    assert cpu.new_process_cpu(0.0, 4.0, "engine") == 0.0


def test_a_roll_and_the_totals_are_cut_from_what_the_run_saw():
    # version 2 published from 2.0 to 2.4 s, served at 3.0 s; steady: inside the 2 s before;
    # the roll: in flight from 2.0 to 3.0 s; the last request is in neither
    done = [(0.5, 0.6, True), (1.0, 1.2, True),
            (1.9, 2.1, True), (2.2, 2.6, False), (2.5, 2.9, True),
            (3.5, 3.6, True)]  # fmt: skip
    cpu = ServerCpuSampler()
    cpu.models, cpu.born = {1: None, 2: "engine", 3: "engine"}, {1: -math.inf, 2: -math.inf, 3: 2.5}
    cpu.samples = [(0.0, {1: 0.0, 2: 0.0}, 0.0), (2.0, {1: 1.0, 2: 1.0}, 4.0),
                   (3.0, {1: 1.5, 2: 1.5, 3: 0.25}, 6.0)]  # fmt: skip
    seen = _Observed(done, marks=[(2, 2.0, 2.4)], served={1: 0.0, 2: 3.0}, cpu=cpu)
    cfg = RollBenchConfig(steady_s=2.0)
    roll = _roll(seen, cfg, [Path("v1.onnx"), Path("v2.onnx")], seen.marks[0])
    expected = Roll(version=2, engine="v2.onnx", publish_s=0.4, roll_s=1.0, steady_requests=2,
                    steady_p50_ms=200.0, steady_p99_ms=200.0, roll_requests=2, roll_p50_ms=400.0,
                    roll_p99_ms=400.0, roll_max_ms=400.0, failed=1, steady_server_cores=1.0,
                    roll_server_cores=1.25, steady_machine_cores=2.0, roll_machine_cores=2.0,
                    new_engine_cpu_s=0.25)  # fmt: skip
    assert asdict(roll) == pytest.approx(asdict(expected))
    totals = _totals(seen, cfg, [roll], ["a", "b"], [2, 3])
    assert (totals["requests"], totals["failed"], totals["steady_requests"]) == (6, 1, 2)
    assert totals["seconds"] == pytest.approx(3.1) and totals["p99_ratio"] == pytest.approx(2.0)
    assert totals["roll_p99_ratios"] == [pytest.approx(2.0)] and totals["rolls_within_target"] == 1
    assert totals["target"]["met"] is False  # a failed request
    assert (totals["load_tasks"], totals["task_counts"]) == (["a", "b"], [2, 3])


class _Client:
    """tritonclient's asyncio client as the load uses it: each call answered after a
    millisecond; the third call fails, the fifth sets the roll's stop event."""

    def __init__(self, stop: threading.Event):
        self.calls, self.stop = 0, stop

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def infer(self, model, inputs, outputs=None):
        self.calls += 1
        call = self.calls
        if call == 5:
            self.stop.set()
        await asyncio.sleep(0.001)
        if call == 3:
            raise ConnectionError("the third call fails")


def test_the_load_runs_until_its_time_or_until_it_is_stopped(monkeypatch):
    aio = pytest.importorskip("tritonclient.grpc.aio")
    stop = threading.Event()
    monkeypatch.setattr(aio, "InferenceServerClient", lambda url: _Client(stop))
    requests = SimpleNamespace(inputs=lambda model, task: [], outputs=lambda model: [])
    _, route = plan("mixed", "engine", ["a", "b"])
    # the stop event ends it long before its time; each client finishes the call in flight
    done = asyncio.run(load("url", requests, route, 2, time.monotonic() + 2, 0, stop))
    assert len(done) in (5, 6) and [ok for *_, ok in done].count(False) == 1
    assert all(start <= end for start, end, _ in done)
    # without a stop event (the serving benchmark's windows), the time ends it
    until = time.monotonic() + 0.05
    done = asyncio.run(load("url", requests, route, 2, until, 0))
    assert len(done) > 6 and all(start < until for start, _, _ in done)


def test_an_unreadable_engine_exits_2_before_any_server_starts(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not an engine")
    with pytest.raises(SystemExit) as e:
        main(["--engine", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {bad} is not a readable ONNX file" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_the_committed_record_reads_as_its_page():
    record = json.loads((ROOT / "benchmarks/results/cpu/serve-roll-tiny-vit-32.json").read_text())
    page = markdown(record)
    totals = record["totals"]
    verdict = "met" if totals["target"]["met"] else "**not met**"
    assert f"): {verdict}. {totals['requests']} requests, {totals['failed']} failed" in page
    ratios = [r["roll_p99_ms"] / r["steady_p99_ms"] for r in record["rolls"]]
    assert totals["roll_p99_ratios"] == pytest.approx(ratios)
    assert totals["rolls_within_target"] == sum(1 for x in ratios if x <= 2.0)
    assert page.count("\n| ") == 1 + len(record["rolls"])  # the header, a row per roll

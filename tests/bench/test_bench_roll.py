"""The version-roll benchmark's bookkeeping, without a server (``serve REPO --watch`` itself is
tested under load in tests/runtime/test_serving.py): which requests count as steady and which
as the roll's, the CPU read from the samples, the verdict and the page."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from surgery_edge.bench.roll import _CpuSampler, _part, markdown

ROOT = Path(__file__).resolve().parents[2]


def test_steady_requests_lie_inside_their_window_and_the_rolls_overlap_it():
    done = [(0.0, 0.5, True), (0.9, 1.1, True), (1.2, 1.3, False), (1.9, 2.5, True),
            (2.6, 2.7, True)]  # fmt: skip
    assert _part(done, 0.0, 1.0, overlap=False) == ([500.0], 0)  # (0.9, 1.1) ends after it
    latencies, failed = _part(done, 1.0, 2.0, overlap=True)
    assert [round(x) for x in latencies] == [200, 600] and failed == 1  # in flight in [1, 2]


def test_cores_come_from_the_samples_and_a_new_stub_counts_from_its_birth():
    cpu = _CpuSampler()
    cpu.models = {1: None, 2: "engine", 3: "engine"}
    cpu.born = {1: -math.inf, 2: -math.inf, 3: 5.0}
    cpu.samples = [(0.0, {1: 1.0, 2: 2.0}, 10.0), (4.0, {1: 2.0, 2: 4.0}, 18.0),
                   (6.0, {1: 2.5, 2: 4.5, 3: 0.5}, 22.0)]  # fmt: skip
    assert cpu.cores(0.0, 4.0) == (0.75, 2.0)
    assert cpu.cores(4.0, 6.0) == (0.75, 2.0)  # pid 3 from 0: it did not exist at 4 s
    assert cpu.cores(4.5, 5.5) == (None, None)  # no two samples inside
    assert cpu.new_engine_cpu(4.0, 6.0) == 0.5 and cpu.new_engine_cpu(0.0, 4.0) == 0.0


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

"""The GPU run's tests step: a pytest plugin that logs each test's result as it ends
(``-p surgery_edge.bench.gpu_tests --result-log FILE``), and the totals read back from pytest's
JUnit XML or, for a step stopped before pytest wrote it, from that log."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def test_results(path: Path, log: Path | None = None) -> dict[str, Any] | None:
    """Totals and the non-passing tests: from the JUnit XML file (pytest ``--junitxml``,
    written when pytest ends) or, where it is missing (the step was stopped), from the per-test
    log (``--result-log``, :class:`ResultLog`), marked incomplete."""
    if not path.is_file():
        return _results_from_log(log) if log is not None and log.is_file() else None
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    totals = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    problems = []
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            kind = "failed" if "failure" in kinds else "errors"
            child = case.find("failure") if "failure" in kinds else case.find("error")
            message = (
                (child.get("message") or "").splitlines()[0][:300] if child is not None else ""
            )
            problems.append({"test": name, "outcome": kind, "message": message})
            totals[kind] += 1
        elif "skipped" in kinds:
            totals["skipped"] += 1
        else:
            totals["passed"] += 1
    return {**totals, "problems": problems, "complete": True, "source": path.name}


def _results_from_log(log: Path) -> dict[str, Any]:
    """The totals of a :class:`ResultLog` file: each test's worst outcome over its phases."""
    collected = None
    outcome: dict[str, tuple[str, str]] = {}  # test -> (outcome, message)
    rank = {"passed": 0, "skipped": 1, "failed": 2, "errors": 3}
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the last line, cut by the kill
            continue
        if "collected" in entry:
            collected = entry["collected"]
            continue
        kind = entry["outcome"]
        if kind == "failed" and entry["when"] != "call":
            kind = "errors"  # a fixture failed, as JUnit counts it
        test = entry["test"]
        if test not in outcome or rank[kind] > rank[outcome[test][0]]:
            outcome[test] = (kind, entry.get("message", ""))
    totals = {k: sum(1 for o, _ in outcome.values() if o == k) for k in rank}
    problems = [
        {"test": test, "outcome": o, "message": message}
        for test, (o, message) in outcome.items()
        if o in ("failed", "errors")
    ]
    return {
        **totals,
        "problems": problems,
        "complete": False,
        "source": log.name,
        "collected": collected,
        "reported": len(outcome),
    }


class ResultLog:
    """A pytest plugin (``-p surgery_edge.bench.gpu_tests --result-log FILE``) that appends one JSON
    line per test phase as it ends (the call, and a setup or teardown that did not pass), so
    that a run stopped before pytest writes its JUnit XML keeps the results so far."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def _write(self, entry: dict[str, Any]) -> None:
        with self.path.open("a") as f:  # flushed at close: a kill loses at most the next line
            f.write(json.dumps(entry) + "\n")

    def pytest_collection_finish(self, session: Any) -> None:
        self._write({"collected": len(session.items)})

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and report.outcome == "passed":
            return
        message = ""
        if report.outcome == "failed":  # the exception's first line, as JUnit's message
            crash = getattr(report.longrepr, "reprcrash", None)
            text = crash.message if crash is not None else str(report.longrepr)
            message = (text.strip().splitlines() or [""])[0][:300]
        self._write(
            {
                "test": report.nodeid,
                "when": report.when,
                "outcome": report.outcome,
                "message": message,
            }
        )


def pytest_addoption(parser: Any) -> None:
    """``--result-log FILE`` (this module loaded as a pytest plugin)."""
    parser.addoption("--result-log", type=Path, help="append each test's result to FILE (JSON)")


def pytest_configure(config: Any) -> None:
    """Register :class:`ResultLog` where ``--result-log`` was given."""
    path = config.getoption("--result-log")
    if path is not None:
        config.pluginmanager.register(ResultLog(path), "surgery-edge-result-log")

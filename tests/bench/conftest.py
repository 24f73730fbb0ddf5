"""The benchmark tests write only under tmp_path: the recorded results in benchmarks/results/
are re-run deliberately (the command is in their Markdown), never overwritten by a test."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _digest(root: Path) -> dict[str, str]:
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session", autouse=True)
def recorded_results_untouched():
    before = _digest(RESULTS)
    yield
    after = _digest(RESULTS)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into {RESULTS}: {changed} (write under tmp_path)"

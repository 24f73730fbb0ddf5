"""The red-team table (tests/redteam.py) names real tests, and each row's expected message is
one its tests assert: a row cannot outlive the test that backs it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from redteam import TABLE

TESTS = Path(__file__).parent


def _functions(file: Path) -> dict[str, str]:
    source = file.read_text(encoding="utf-8")
    return {
        node.name: ast.get_source_segment(source, node) or ""
        for node in ast.parse(source).body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


@pytest.mark.parametrize("case", TABLE, ids=[c.finding.split(" ", 1)[0] for c in TABLE])
def test_each_finding_is_backed_by_a_test_asserting_its_message(case):
    sources = []
    for node in case.tests:
        file, name = node.split("::")
        functions = _functions(TESTS / file)
        assert name.startswith("test_") and name in functions, f"{node}: no such test"
        sources.append(functions[name])
    assert any(case.message in s for s in sources), (
        f"{case.finding}: none of {case.tests} asserts {case.message!r}"
    )


def test_make_redteam_selects_the_tables_tests(request):
    """conftest marks exactly the table's tests ``redteam`` (``make redteam`` runs them)."""
    marked = {
        item.nodeid.removeprefix("tests/")
        for item in request.session.items
        if item.get_closest_marker("redteam")
    }
    named = {n for case in TABLE for n in case.tests}
    collected = {item.nodeid.removeprefix("tests/").split("[")[0] for item in request.session.items}
    assert {m.split("[")[0] for m in marked} == named & collected

"""The package's shape, read from the source (``ast``): files and functions a reader can hold
in mind, and imports of the package's own modules at the top of a module unless a comment says
why one waits until a function runs.

Every exception is listed here with its reason; an entry that is no longer needed fails too, so
the lists only shrink.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("surgery_edge", "kernels", "cli")  # kernels/ and cli/ install inside surgery_edge
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80

CLI = "a typer command declares each of its options as a parameter (the CLI is excepted)"
LONG_FILES: dict[str, str] = {}
LONG_FUNCTIONS = {
    "cli/bench.py::bench": CLI,
    "cli/pipeline.py::train": CLI,
    "cli/serve.py::serve": CLI,
}


def _sources() -> dict[str, str]:
    return {
        path.relative_to(ROOT).as_posix(): path.read_text()
        for folder in FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return _sources()


@pytest.fixture(scope="module")
def trees(sources) -> dict[str, ast.Module]:
    return {name: ast.parse(text) for name, text in sources.items()}


def _long_files(sources: dict[str, str]) -> dict[str, int]:
    lines = {name: len(text.splitlines()) for name, text in sources.items()}
    return {name: n for name, n in lines.items() if n > MAX_FILE_LINES}


def _long_functions(trees: dict[str, ast.Module]) -> dict[str, int]:
    """``{"file::function": lines}`` of every function (nested ones too) over the limit."""
    found = {}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # decorators not counted
                if length > MAX_FUNCTION_LINES:
                    found[f"{name}::{node.name}"] = length
    return found


def _own(node: ast.stmt) -> bool:
    """Whether an import statement imports the package's own modules."""
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "surgery_edge"
    return any(alias.name.split(".")[0] == "surgery_edge" for alias in node.names)


def _local_import_groups(tree: ast.AST) -> list[list[ast.stmt]]:
    """Runs of consecutive imports of the package's own modules inside functions."""
    groups: list[list[ast.stmt]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        in_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)  # a lambda's body is one expression
            run: list[ast.stmt] = []
            for statement in statements if isinstance(statements, list) else []:
                own = isinstance(statement, (ast.Import, ast.ImportFrom)) and _own(statement)
                if own and in_function:
                    run.append(statement)
                elif run:
                    groups.append(run)
                    run = []
            if run:
                groups.append(run)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    return groups


def _unexplained_local_imports(text: str, tree: ast.Module | None = None) -> list[int]:
    """The lines of imports of the package's own modules inside functions that carry no reason.

    A reason is a comment on the import (any of its lines) or on the line above it; an import
    that directly follows one with a reason shares it (a group of deferred imports under one
    comment).
    """
    groups = _local_import_groups(tree or ast.parse(text))
    if not groups:
        return []
    comments = {
        token.start[0]
        for token in tokenize.generate_tokens(io.StringIO(text).readline)
        if token.type == tokenize.COMMENT
    }
    missing = []
    for group in groups:
        explained = False
        for statement in group:
            lines = range(statement.lineno - 1, statement.end_lineno + 1)
            explained = explained or any(line in comments for line in lines)
            if not explained:
                missing.append(statement.lineno)
    return missing


def test_the_checks_find_what_they_look_for():
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    tree = ast.parse(long_function)
    assert _long_functions({"m.py": tree}) == {"m.py::f": MAX_FUNCTION_LINES + 1}
    assert _long_files({"m.py": "x = 1\n" * (MAX_FILE_LINES + 1)}) == {"m.py": 601}
    assert _long_files({"m.py": "x = 1\n" * MAX_FILE_LINES}) == {}
    code = (
        "import surgery_edge.io\n"  # at the top: nothing to explain
        "def f():\n"
        "    import json\n"  # not the package's own
        "    from surgery_edge import io\n"  # 4: no reason
        "    # deferred: imports torch\n"
        "    from surgery_edge.models import get_arch\n"
        "    from surgery_edge.models import load_encoder\n"  # shares the reason above
        "    x = 1\n"
        "    from . import run  # deferred: a cycle\n"
        "    if x:\n"
        "        from surgery_edge.run import state\n"  # 11: no reason
    )
    assert _unexplained_local_imports(code) == [4, 11]


def test_no_file_is_too_long(sources):
    assert _long_files(sources).keys() == LONG_FILES.keys()


def test_no_function_is_too_long(trees):
    assert _long_functions(trees).keys() == LONG_FUNCTIONS.keys()


def test_imports_of_the_package_inside_functions_say_why(sources, trees):
    missing = {
        name: lines
        for name, text in sources.items()
        if (lines := _unexplained_local_imports(text, trees[name]))
    }
    assert missing == {}

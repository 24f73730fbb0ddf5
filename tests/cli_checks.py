"""The checks CLI tests make: exit code 2 for bad input, 1 for a partial result; one message,
no traceback."""

from __future__ import annotations

from surgery_edge.cli.app import app
from typer.testing import CliRunner

_runner = CliRunner()


def user_error(args: list[str]) -> str:
    """Run ``surgery-edge ARGS``; assert it failed as a user error; return its output."""
    result = _runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.output


def partial_result(args: list[str]) -> str:
    """Run ``surgery-edge ARGS``; assert it answered part of the input (exit code 1, the
    failures named, no traceback); return its output."""
    result = _runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return result.output

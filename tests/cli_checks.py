"""The check every bad-input CLI test makes: exit code 2, one message, no traceback."""

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

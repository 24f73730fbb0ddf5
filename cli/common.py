"""What every command shares: user errors as exit code 2, common options, registry choices.

Nothing here imports torch: ``surgery-edge --help`` stays fast. The surgery methods and engine
modes are enums built from their (torch-free) registries, so help lists them; the merge methods'
registry needs torch, so it is imported only when ``--method`` is parsed or ``merge --help``
lists the methods and their parameters.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from surgery_edge.engine_format import EngineMode, Precision
from surgery_edge.errors import ConfigError, SurgeryEdgeError
from surgery_edge.surgery.methods import surgery_names

RunDir = Annotated[Path, typer.Option("--run", help="Run directory (made by `experts`/`demo`).")]
Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N.")]


def err(message: str) -> None:
    """Print ``message`` as one paragraph on stderr (markup in it is shown, not interpreted)."""
    from rich.console import Console  # deferred: only error paths print through rich
    from rich.markup import escape  # deferred with rich.console

    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
    )


def user_errors(fn: Callable) -> Callable:
    """Turn SurgeryEdgeError into a one-paragraph message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryEdgeError as e:
            err(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted; finished artefacts are kept, unfinished ones were not written.")
            raise typer.Exit(130) from None

    return wrapper


def merge_method(value: str) -> str:
    """A registered merge method's name (``--method``); the registry loads on first use."""
    from surgery_edge import merging  # deferred: the methods import torch

    if value not in merging.MERGE_METHODS:
        raise typer.BadParameter(
            f"unknown merge method {value!r}; use one of: {', '.join(merging.available())}."
        )
    return value


def complete_merge_method(ctx, param, incomplete: str) -> list[str]:
    from surgery_edge import merging  # deferred: the methods import torch

    return [n for n in merging.available() if n.startswith(incomplete)]


def merge_methods_help() -> str:
    """Each merge method and its parameters, from the registry (for ``merge --help``)."""
    from surgery_edge import merging  # deferred: the methods import torch

    lines = [merging.get(name).describe() for name in merging.available()]
    return "Methods and their --param settings:\n\n" + "\n\n".join(lines)


def lazy_epilog(make: Callable[[], str]) -> type[TyperCommand]:
    """A command class whose help ends with ``make()``, computed only when help is shown."""

    class Command(TyperCommand):
        @property
        def epilog(self) -> str:
            return make()

        @epilog.setter
        def epilog(self, value: str | None) -> None:  # click sets it; the factory wins
            pass

    return Command


# Choices as enums, so help lists them; built from the (torch-free) registries.
SurgeryName = enum.Enum("SurgeryName", {n: n for n in surgery_names()}, type=str)
SurgeryOrNone = enum.Enum("SurgeryOrNone", {n: n for n in surgery_names(with_none=True)}, type=str)
ModeName = enum.Enum("ModeName", {m.value: m.value for m in EngineMode}, type=str)
PrecisionName = enum.Enum("PrecisionName", {p.value: p.value for p in Precision}, type=str)
# "auto" and the quantisers of surgery_edge.export.quantize.Quantizer (which imports onnx: not
# here, so that --help stays light; tests/cli checks the two lists agree)
QUANTIZERS = ("auto", "modelopt", "ort-dynamic", "ort-static")
QuantizerName = enum.Enum("QuantizerName", {q.replace("-", "_"): q for q in QUANTIZERS}, type=str)


def parse_pairs(values: list[str] | None, option: str, example: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; ConfigError naming the bad item."""
    pairs = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE, e.g. {option} {example}.")
        pairs[key] = value
    return pairs


def parse_values(values: list[str] | None, option: str, example: str) -> dict[str, Any]:
    """Like :func:`parse_pairs`, with each value read as YAML (``0.5`` -> 0.5, ``[a, b]``)."""
    import yaml  # deferred: only commands with KEY=VALUE options need it

    out = {}
    for key, text in parse_pairs(values, option, example).items():
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{option} {key}={text!r} is not a value ({e}).") from None
    return out

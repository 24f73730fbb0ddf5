"""What every command shares: user errors as exit code 2 (a missing extra as 3), common
options, registry choices, and where output goes (results on stdout, the rest on stderr).

Nothing here imports torch: ``surgery-edge --help`` stays fast. The surgery methods and engine
modes are enums built from their (torch-free) registries, so help lists them; the merge methods'
registry needs torch, so ``--method`` is checked against :data:`MERGE_METHOD_NAMES` (a test
keeps it equal to the registry) and only ``merge --help`` imports the registry, to list the
methods' parameters.
"""

from __future__ import annotations

import enum
import errno
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from surgery_edge.engine_format import EngineMode, Precision, is_device_name
from surgery_edge.errors import ConfigError, DependencyError, SurgeryEdgeError
from surgery_edge.io import load_yaml, printable
from surgery_edge.surgery.methods import SCHEDULES, surgery_names


def device_name(value: str | None) -> str | None:
    """``--device``: auto, cpu, cuda or cuda:N (anything else is a usage error, exit 2)."""
    if value is not None and not is_device_name(value):
        raise typer.BadParameter(
            f"{printable(repr(value))} is not a device; use auto, cpu, cuda or cuda:N."
        )
    return value


RunDir = Annotated[
    Path,
    typer.Option(
        "--run",
        "--run-dir",
        help="Run directory (made by `experts`/`demo`); under torchrun spell it --run-dir.",
    ),
]
# The run folder of the commands that create one (experts, demo, run): None when not given,
# so that the hidden --out of 0.1 can be told apart (see :func:`renamed`).
NewRunDir = Annotated[
    Path | None,
    typer.Option(
        "--run",
        "--run-dir",
        help="Run directory to create or continue (default: runs/demo; `run`: runs/<config>).",
    ),
]
OldRunDir = Annotated[Path | None, typer.Option("--out", hidden=True)]  # 0.1: --out
Device = Annotated[str | None, typer.Option(parser=device_name, help="auto | cpu | cuda | cuda:N.")]
Json = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout (nothing else there).")
]
NProc = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        help="Run as N processes of one torchrun job on this machine (gloo on the CPU, nccl on "
        "GPUs, one GPU each); across machines start the command with torchrun instead.",
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace artefacts made with other settings (without it, they are refused).",
    ),
]


def renamed(old: str, new: str, old_value: Any, new_value: Any) -> Any:
    """An option kept under its old name for one release (hidden from help): its value, with
    a note on stderr, when it was given; else the new option's value."""
    if old_value is None:
        return new_value
    typer.echo(f"note: {old} is now {new}; the old name goes in the next release.", err=True)
    return old_value


def run_folder(run_dir: Path | None, out: Path | None, default: Path) -> Path:
    """The run folder of ``--run`` (or the hidden ``--out`` of 0.1, with a note), else
    ``default``; giving both is a usage error."""
    if run_dir is not None and out is not None:
        raise ConfigError("--out is the old name of --run: give only --run.")
    return renamed("--out", "--run", out, run_dir) or default


def err(message: str) -> None:
    """Print ``message`` as one paragraph on stderr (markup in it is shown, not interpreted;
    control characters, e.g. terminal escapes from a file's names, are shown escaped)."""
    from rich.console import Console  # deferred: only error paths print through rich
    from rich.markup import escape  # deferred with rich.console

    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True
    )


def say(text: str) -> None:
    """Print one line of results on stdout, control characters escaped (names come from
    files)."""
    typer.echo(printable(text, keep_newlines=False))


def note(text: str) -> None:
    """A status line on stderr, control characters escaped; the ``log`` that commands pass to
    the library."""
    from surgery_edge.progress import message  # deferred: keeps this module's imports light

    message(printable(text, keep_newlines=False))


# The packages of each extra (by import name), for the message a missing one gets.
EXTRAS = {
    "train": (
        "torch torchvision open_clip triton onnx onnxscript safetensors pydantic yaml sklearn "
        "matplotlib psutil"
    ).split(),
    "serve": ["pytriton", "tritonclient"],
    "quant": ["modelopt", "onnx_graphsurgeon", "onnxslim", "lief", "ml_dtypes"],
    "trt": ["tensorrt"],
    "datasets": ["h5py"],
}


def missing_extra(e: ModuleNotFoundError) -> DependencyError | None:
    """The error for a command that needs an extra this installation lacks (None when the
    missing module is no extra's)."""
    root = (e.name or "").split(".")[0]
    extra = next((x for x, modules in EXTRAS.items() if root in modules), None)
    if extra is None:
        return None
    what = {
        "train": "the training extra (torch, open_clip, Triton, the ONNX exporter); on a "
        "machine without a GPU install the CPU build of torch first",
        "serve": "the serving extra (PyTriton and its Triton Inference Server)",
        "quant": "the quantisation extra (NVIDIA ModelOpt's ONNX quantiser)",
        "trt": "the TensorRT extra (an NVIDIA GPU machine)",
        "datasets": "the datasets extra (h5py, for PCAM)",
    }[extra]
    return DependencyError(
        f"This command needs {root}, which is not installed: install "
        f"`pip install 'surgery-edge[{extra}]'`, {what}. The base install runs engines only "
        "(predict, info, env)."
    )


def user_errors(fn: Callable) -> Callable:
    """Turn SurgeryEdgeError into a one-paragraph message and its exit code (2; 3 for a
    missing extra: a ModuleNotFoundError of an extra's package), without a traceback.

    A file that may not be written or read (permissions, a read-only or full disk) is the
    user's to fix as well, and is reported the same way.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except ModuleNotFoundError as e:
                missing = missing_extra(e)
                if missing is None:
                    raise
                raise missing from None
        except SurgeryEdgeError as e:
            err(str(e))
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            if e.errno not in _USER_ERRNOS:
                raise
            where = f" {e.filename}" if e.filename else ""
            err(
                f"Cannot write or read{where}: {e.strerror or e}. Check the folder's permissions "
                "and free space, or choose another path; unfinished artefacts were not written."
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err("interrupted; finished artefacts are kept, unfinished ones were not written.")
            raise typer.Exit(130) from None

    return wrapper


_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


# The registered merge methods' names, as merging.available() lists them, for --method without
# importing the registry (which imports torch): tests/cli checks that they are the registry's.
MERGE_METHOD_NAMES = (
    "adamerging_layerwise",
    "adamerging_taskwise",
    "task_arithmetic",
    "ties_merging",
    "weight_averaging",
)


def merge_method(value: str) -> str:
    """A registered merge method's name (``--method``), checked without importing torch."""
    if value not in MERGE_METHOD_NAMES:
        raise typer.BadParameter(
            f"unknown merge method {value!r}; use one of: {', '.join(MERGE_METHOD_NAMES)}."
        )
    return value


def complete_merge_method(incomplete: str) -> list[str]:
    """Shell completion of ``--method``: the merge methods that start with ``incomplete``."""
    return [n for n in MERGE_METHOD_NAMES if n.startswith(incomplete)]


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
Schedule = enum.Enum("Schedule", {n: n for n in SCHEDULES}, type=str)
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
            out[key] = load_yaml(text, f"{option} {key}")  # no aliases: a value, not a bomb
        except yaml.YAMLError as e:
            raise ConfigError(f"{option} {key}={text!r} is not a value ({e}).") from None
    return out

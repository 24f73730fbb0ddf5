"""Commands that describe rather than do: ``info ENGINE``, ``env`` and ``--version``."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from surgery_edge.cli.common import Json, say, user_errors

from surgery_edge import __version__

# The distributions whose versions decide what surgery-edge can do on a machine.
PACKAGES = (
    "torch",
    "triton",
    "open_clip_torch",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "nvidia-modelopt",
    "nvidia-pytriton",
    "tritonclient",
    "numpy",
    "pillow",
)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"surgery-edge {__version__}")
        raise typer.Exit()


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions of the packages that matter, CUDA and the devices, as one JSON-able dict."""
    env = {
        "surgery-edge": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _installed(name) for name in PACKAGES},
    }
    both = env["packages"]["onnxruntime"] and env["packages"]["onnxruntime-gpu"]
    env["problems"] = (
        [
            "onnxruntime and onnxruntime-gpu are both installed and overwrite each other's "
            "files: pip uninstall -y onnxruntime onnxruntime-gpu, then pip install "
            "onnxruntime-gpu (GPU) or onnxruntime (CPU)."
        ]
        if both
        else []
    )
    try:
        import onnxruntime  # deferred: env is the only command that asks ORT what it has

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    try:
        import torch  # deferred: only env asks torch about CUDA

        env["cuda"] = {
            "torch_built_with": torch.version.cuda,
            "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        }
    except ImportError:
        env["cuda"] = {"torch_built_with": None, "available": False, "devices": []}
    return env


def env(json_out: Json = False) -> None:
    """Print the versions of the packages, CUDA and the devices (for a bug report).

    Covers surgery-edge, torch, triton, open_clip, onnx, onnxruntime (and its providers),
    TensorRT, ModelOpt, PyTriton, the CUDA torch was built with and the GPUs it sees.
    """
    data = environment()
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    say(f"surgery-edge {data['surgery-edge']}  (python {data['python']}, {data['platform']})")
    for name, version in data["packages"].items():
        say(f"  {name:<16} {version or 'not installed'}")
    say(f"  onnxruntime providers: {', '.join(data['onnxruntime_providers']) or 'none'}")
    cuda = data["cuda"]
    devices = ", ".join(cuda["devices"]) or "none"
    say(
        f"  CUDA: torch built with {cuda['torch_built_with'] or 'no CUDA'}, "
        f"{'available' if cuda['available'] else 'not available'}; GPUs: {devices}"
    )
    for problem in data["problems"]:
        say(f"  problem: {problem}")


@user_errors
def info(
    engine: Annotated[Path, typer.Argument(help="An exported engine: .onnx, .pt2 or TensorRT.")],
    json_out: Json = False,
) -> None:
    """Say what an engine holds, without running it.

    Mode, tasks with their class counts, precision, inputs and outputs with shapes,
    preprocessing, architecture, merge recipe, size, and the version that made it. Nothing
    is run or loaded onto a device. The engine is first verified against the digest its
    export recorded: a changed or damaged copy is refused (exit 2).

    Example: surgery-edge info runs/demo/engines/surgeryv2-routed.onnx --json
    """
    from surgery_edge.runtime.describe import (  # deferred: reading ONNX imports onnx
        describe_engine,
        format_info,
    )

    described = describe_engine(engine)
    if json_out:
        typer.echo(json.dumps(described.to_dict(), indent=2))
    else:
        for line in format_info(described):
            say(line)

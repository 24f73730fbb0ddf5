"""``surgery-edge import ...``: checkpoints of other tools into surgery-edge's format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from surgery_edge.cli.common import Json, note, parse_pairs, say, user_errors

from surgery_edge.errors import ConfigError
from surgery_edge.io import safe_name, write_json_atomic


@user_errors
def import_task_vectors(
    root: Annotated[Path, typer.Argument(help="Folder holding <model>/zeroshot.pt etc.")],
    model: Annotated[str, typer.Option(help="open_clip config name, e.g. ViT-B-32.")],
    out: Annotated[Path, typer.Option(help="Folder for the converted checkpoints.")],
    trust_pickle: Annotated[
        bool,
        typer.Option(
            help="Allow unpickling (restricted to the known classes). Only for trusted files."
        ),
    ] = False,
    task: Annotated[list[str] | None, typer.Option(help="Import only these tasks.")] = None,
    overwrite: bool = False,
    json_out: Json = False,
):
    """Convert the task_vectors / AdaMerging layout (pickled ImageEncoder / heads)."""
    from surgery_edge.models.convert import import_task_vectors as run_import  # deferred: torch

    summary = run_import(root, model, out, trust_pickle, tasks=task, overwrite=overwrite, log=note)
    if json_out:
        typer.echo(json.dumps({"checkpoints": str(out), **summary.to_dict()}, indent=2))
        return
    for text in summary.to_dict().get("notes", []):
        note(f"note: {text}")
    say(f"checkpoints: {out}")


def _paths(values: list[str] | None, option: str) -> dict[str, Path]:
    """``TASK=PATH`` pairs; every TASK checked to be a plain name (it names the output files)."""
    pairs = parse_pairs(values, option, "MNIST=a.pt")
    return {safe_name(t, f"{option} task name"): Path(p) for t, p in pairs.items()}


def _import_weights(
    fmt: str,
    model,
    pretrained,
    expert,
    out,
    clip_weights,
    classes,
    trust_pickle,
    overwrite,
    json_out=False,
):
    # deferred: these import torch
    from surgery_edge.data.disk import load_class_names
    from surgery_edge.models import get_arch
    from surgery_edge.models.convert import check_out_dir, import_weights

    experts = _paths(expert, "--expert")
    if not experts:
        raise ConfigError("Give at least one --expert TASK=PATH.")
    class_files = _paths(classes, "--classes")
    missing = sorted(set(experts) - set(class_files))
    if missing:
        raise ConfigError(
            f"No --classes for tasks {missing}: these experts carry no heads, so each task's "
            "zero-shot head is built from its class names (--classes TASK=names.json, a JSON list)."
        )
    names = {}
    for task, path in class_files.items():
        loaded = load_class_names(path)
        if not isinstance(loaded, list):
            raise ConfigError(f"{path} must hold a JSON list of class names, in label order.")
        names[task] = loaded
    check_out_dir(out, overwrite)
    arch = import_weights(
        fmt,
        get_arch(model),
        pretrained,
        experts,
        out,
        trust_pickle=trust_pickle,
        clip_weights=clip_weights,
        class_names={t: names[t] for t in experts},
        log=note,
    )
    record = {
        "format": fmt,
        "pretrained": str(pretrained),
        "experts": {t: str(p) for t, p in experts.items()},
        "heads": f"zero-shot from {clip_weights}",
        "arch": arch.to_dict(),
    }
    write_json_atomic(out / "import.json", record)
    if json_out:
        typer.echo(json.dumps({"checkpoints": str(out), **record}, indent=2))
    else:
        say(f"checkpoints: {out} ({arch.name})")


Experts = Annotated[
    list[str], typer.Option("--expert", help="TASK=PATH of one fine-tuned expert (repeatable).")
]
ClipWeights = Annotated[
    Path,
    typer.Option(help="open_clip CLIP weights with the text tower, for the zero-shot heads."),
]
Classes = Annotated[
    list[str] | None,
    typer.Option("--classes", help="TASK=names.json: the task's class names (repeatable)."),
]


@user_errors
def import_open_clip(
    model: Annotated[
        str, typer.Option(help="open_clip config, e.g. ViT-B-32-quickgelu for OpenAI weights.")
    ],
    pretrained: Annotated[Path, typer.Option(help="Pretrained open_clip state dict.")],
    expert: Experts,
    out: Annotated[Path, typer.Option(help="Folder for the converted checkpoints.")],
    clip_weights: ClipWeights,
    classes: Classes = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
    json_out: Json = False,
):
    """Convert open_clip state dicts (.pt / .safetensors) and build zero-shot heads."""
    _import_weights(
        "open_clip",
        model,
        pretrained,
        expert,
        out,
        clip_weights,
        classes,
        trust_pickle,
        overwrite,
        json_out,
    )


@user_errors
def import_hf(
    model: Annotated[str, typer.Option(help="open_clip config name the towers must fit.")],
    pretrained: Annotated[Path, typer.Option(help="Pretrained HF CLIP(Vision) folder or file.")],
    expert: Experts,
    out: Annotated[Path, typer.Option(help="Folder for the converted checkpoints.")],
    clip_weights: ClipWeights,
    classes: Classes = None,
    overwrite: bool = False,
    json_out: Json = False,
):
    """Convert Hugging Face CLIP vision experts (e.g. FusionBench's) and build zero-shot heads."""
    _import_weights(
        "hf", model, pretrained, expert, out, clip_weights, classes, False, overwrite, json_out
    )

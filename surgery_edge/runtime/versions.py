"""Engine versions in a model repository: which versions a model folder holds, and which to serve.

``surgery-edge triton-repo`` and ``export --triton-repo`` keep every engine they place in a model
folder as a version of it, as Triton numbers them::

    REPO/MODEL/1/model.onnx   REPO/MODEL/2/model.onnx   ...   REPO/MODEL/surgery-edge-model.json

The marker (:data:`MARKER`) lists every file the writer made and, per version, the engine it
came from, its SHA-256 and its task set (:func:`read_marker`). A version counts as published
once its folder is in place and the marker lists its engine file (the writer moves a finished
folder in with one rename), so a reader never sees half a version.

``surgery-edge serve REPO`` serves the newest published version (:func:`served_model`); with
``--watch`` it rolls to each new one while it serves (:mod:`surgery_edge.runtime.rolling`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery_edge.errors import ExportError

MARKER = "surgery-edge-model.json"  # in every model folder the repository writer makes
WRITER = "surgery-edge triton-repo"
ENGINE_FILES = ("model.onnx", "model.plan")  # a version's engine, as Triton's backends name it


@dataclass(frozen=True)
class EngineVersion:
    """One published version of a model folder: its number and its engine file."""

    version: int
    engine: Path


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The repository writer's marker in ``folder``, or None when there is no valid one."""
    path = Path(folder) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = (
        isinstance(marker, dict)
        and marker.get("written_by") == WRITER
        and isinstance(marker.get("files"), list)
        and all(isinstance(f, str) for f in marker["files"])
    )
    return marker if ok else None


def version_numbers(folder: str | os.PathLike) -> list[int]:
    """The version folders of a model folder (``1``, ``2``, ...), in increasing order."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.isdigit() and p.is_dir() and not p.is_symlink()]
    return sorted(int(p.name) for p in found if int(p.name) > 0)


def published(folder: str | os.PathLike) -> list[EngineVersion]:
    """The versions of a model folder the writer's marker lists, oldest first."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return []
    listed = set(marker["files"])
    out = []
    for n in version_numbers(folder):
        for name in ENGINE_FILES:
            if f"{n}/{name}" in listed and (folder / str(n) / name).is_file():
                out.append(EngineVersion(n, folder / str(n) / name))
                break
    return out


def served_model(repo: str | os.PathLike) -> Path:
    """The model folder ``serve REPO`` serves: ``repo`` itself when it is one the writer made,
    else the one such folder in it; ExportError naming what was found otherwise."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ExportError(f"The model repository {repo} is not a folder; check the path.")
    if read_marker(repo) is not None:
        folder = repo
    else:
        models = sorted(p for p in repo.iterdir() if p.is_dir() and read_marker(p) is not None)
        if len(models) != 1:
            found = ", ".join(p.name for p in models) or "none"
            raise ExportError(
                f"{repo} is not a model folder written by `{WRITER}` and holds "
                f"{'several' if models else 'no'} such folders ({found}); give the model's "
                f"folder, e.g. {repo / (models[0].name if models else 'MODEL')}."
            )
        folder = models[0]
    if not published(folder):
        raise ExportError(
            f"The model folder {folder} holds no version that its {MARKER} lists (1/model.onnx, "
            "...); write one with `surgery-edge triton-repo ENGINE --out REPO`."
        )
    return folder

"""What every artefact of a run records about its making, and the rule for replacing one.

An artefact's metadata holds ``provenance`` (content hashes of its inputs and the settings that
shaped it) and ``fingerprint`` (their identity). A stage reuses an artefact whose fingerprint is
the one it would write; it replaces one made with other settings or inputs only when the user
asked for it (``--overwrite``), and says so: never a silent replacement.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgery_edge.errors import ConfigError
from surgery_edge.models.checkpoint import read_metadata
from surgery_edge.run.config import differences


def recorded(path: Path) -> dict[str, Any] | None:
    """The metadata of the artefact at ``path`` (None when it is missing or unreadable)."""
    return read_metadata(path) if path.is_file() else None


def up_to_date(path: Path, fingerprint: str) -> bool:
    meta = recorded(path)
    return meta is not None and meta.get("fingerprint") == fingerprint


def check_replace(
    path: Path,
    what: str,
    new: dict[str, Any],
    overwrite: bool,
    log: Callable[..., None],
    old: Any = ...,
) -> None:
    """Before replacing the existing ``path`` by an artefact made from ``new``: allowed only
    with ``overwrite`` (ConfigError naming the file and what differs otherwise).

    Args:
        new: the provenance (and settings) the new artefact will record.
        old: the existing artefact's record; None when it is unreadable (default: the
            ``provenance`` in its safetensors metadata).
    """
    if old is ...:
        meta = recorded(path)
        old = None if meta is None else meta.get("provenance", "none")
    if old is None:
        why = "is unreadable (damaged, or not a surgery-edge file)"
    elif not isinstance(old, dict):
        why = "records no provenance (made by an earlier version or another tool)"
    else:
        changed = [_short(d) for d in differences(old, new)]
        why = "was made with other settings or inputs: " + "; ".join(changed or ["unknown"])
    if not overwrite:
        raise ConfigError(
            f"The {what} {path} exists but {why}. It was not replaced: pass --overwrite to replace "
            "it, or use another run directory."
        )
    log(f"--overwrite: replacing {path}, which {why}")


def _short(line: str) -> str:
    """Shorten the content hashes in a ``key: old -> new`` line."""
    parts = []
    for word in line.split(" "):
        core = word.strip("'\",")
        parts.append(f"{core[:10]}…" if len(core) >= 40 and core.isalnum() else word)
    return " ".join(parts)

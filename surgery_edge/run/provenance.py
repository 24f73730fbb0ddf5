"""What every artefact of a run records about its making, and the rule for replacing one.

An artefact's metadata holds ``provenance`` (content hashes of its inputs and the settings that
shaped it) and ``fingerprint`` (their identity). A stage reuses an artefact whose fingerprint is
the one it would write; it replaces one made with other settings or inputs only when the user
asked for it (``--overwrite``), and says so: never a silent replacement.

The run also records the content hash of each checkpoint it makes, when it makes it
(:class:`Checksums`, ``RUN/checksums.json``): a stage that consumes a checkpoint checks it
against that record first, so adapters with noise added, a head with its rows rotated or a
merged model edited in place are refused, named, with the command that makes them again,
instead of being evaluated, trained on or exported as if they were the run's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.io import HashCache, write_json_atomic
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
        changed = [_in_words(d) for d in differences(old, new)]
        why = "was made with other settings or inputs: " + "; ".join(changed or ["unknown"])
    if not overwrite:
        raise ConfigError(
            f"The {what} {path} exists but {why}. It was not replaced: pass --overwrite to replace "
            "it, or use another run directory."
        )
    log(f"--overwrite: replacing {path}, which {why}")


# Provenance keys whose values are content hashes, and what changed when they differ.
_INPUTS = {
    "experts": "the expert checkpoints (pretrained, experts or heads) are not those it was "
    "made from",
    "merged": "the merged model is not the one they were trained on",
    "targets": "the experts' representations (the targets) differ",
    "images": "the images differ",
    "pretrained": "the pretrained checkpoint is not the one it was fine-tuned from",
    "train": "the training images differ",
    "sources": "the imported source files differ",
}


def _in_words(line: str) -> str:
    """A ``key: old -> new`` line in words when ``key`` is a content hash (two hash prefixes
    say nothing a user can act on), else with its hashes shortened."""
    key = line.split(":", 1)[0]
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _INPUTS:
        return f"{_INPUTS[leaf]} ({key}: {_short(line.split(': ', 1)[1])})"
    return _short(line)


def _short(line: str) -> str:
    """Shorten the content hashes in a ``key: old -> new`` line."""
    parts = []
    for word in line.split(" "):
        core = word.strip("'\",")
        parts.append(f"{core[:10]}…" if len(core) >= 40 and core.isalnum() else word)
    return " ".join(parts)


class Checksums:
    """The SHA-256 of each checkpoint a run made, recorded when it was made, and the check of
    a consumed checkpoint against it (``RUN/checksums.json``, by path within the run).

    Only the writer of a run records (rank 0 of a distributed job); every stage verifies. A file
    with no record (a run made before records existed, a file the run did not make) is not
    checked, so nothing that worked stops working; the record is read afresh before each change,
    so two commands in one run keep each other's records.

    Args:
        root: the run directory.
        remake: the command that makes a file of the run again, by its path.
    """

    FILE = "checksums.json"

    def __init__(self, root: Path, remake: Callable[[Path], str]):
        self.root, self.remake = Path(root), remake

    @property
    def path(self) -> Path:
        return self.root / self.FILE

    def _read(self) -> dict[str, str]:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                return {k: v for k, v in data.items() if isinstance(v, str)}
        return {}

    def _key(self, path: Path) -> str | None:
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:  # outside the run (train --adapters FILE): not the run's to record
            return None

    def record(self, path: Path, hashes: HashCache) -> None:
        """Remember ``path``'s content hash as the one the run made (after writing it)."""
        key = self._key(path)
        if key is None:
            return
        entries = self._read()
        entries[key] = hashes.digest(path)
        write_json_atomic(self.path, dict(sorted(entries.items())))

    def changed(self, path: Path, hashes: HashCache, fresh: bool = False) -> str | None:
        """None when ``path`` holds what the run made (or nothing is recorded for it); else
        the sentence that says it changed."""
        key = self._key(path)
        made = self._read().get(key) if key is not None else None
        if made is None or not Path(path).is_file():
            return None
        now = hashes.digest(path, fresh=fresh)
        if now == made:
            return None
        return (
            f"{path} is not the file this run made: its content changed since it was written "
            f"(SHA-256 {made[:12]}… recorded then, {now[:12]}… now), by an edit, a copy over "
            "it or damage on disk"
        )

    def reusable(
        self, path: Path, hashes: HashCache, overwrite: bool, log: Callable[..., None]
    ) -> bool:
        """Whether an up-to-date ``path`` may be reused: True when it holds what the run made
        (or nothing is recorded for it). A changed one is made again with ``overwrite`` (False,
        and ``log`` says why); without it, CheckpointError naming the file and the command."""
        why = self.changed(path, hashes)
        if why is None:
            return True
        if not overwrite:
            raise CheckpointError(
                f"{why}. It was not reused. Make it again with `{self.remake(Path(path))}`, or "
                "put back the file the run made."
            )
        log(f"--overwrite: {why}; making it again")
        return False

    def verify(
        self,
        path: Path,
        hashes: HashCache,
        fresh: bool = False,
        explain: Callable[[Path], Any] | None = None,
    ) -> None:
        """Refuse (exit 2) a checkpoint of the run whose content is not what the run made,
        naming the command that makes it again.

        Args:
            fresh: read its bytes again (before publishing what is made from it), not the
                hash cache's stat.
            explain: called on a changed file before it is refused, to raise a more specific
                error when there is one (e.g. a checkpoint of another architecture).
        """
        why = self.changed(path, hashes, fresh)
        if why is not None:
            if explain is not None:
                explain(Path(path))
            raise CheckpointError(
                f"{why}. It was not used. Make it again with `{self.remake(Path(path))}`, or "
                "put back the file the run made."
            )

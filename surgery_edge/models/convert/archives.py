"""Checkpoint files before they are unpickled: archives of plain stored files, and a time budget.

A ``torch.save`` zip may hold only regular files, stored, with safe relative names; a legacy tar
only regular files (a FIFO member would block a reader forever, a link could point anywhere);
the members may not add up to more bytes than the file holds. Every load of a checkpoint runs
under a time budget (:data:`IMPORT_TIMEOUT_S`, ``$SURGERY_EDGE_IMPORT_TIMEOUT``). The importers
(:mod:`~surgery_edge.models.convert.sandbox`'s restricted unpickler, the open_clip and Hugging
Face readers) check a file with these before they read it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

from surgery_edge.errors import CheckpointError

#: Seconds one checkpoint may take to load before it is abandoned (``$SURGERY_EDGE_IMPORT_TIMEOUT``
#: overrides it). Generous for multi-GB files on slow disks; a file that takes longer is hostile or
#: broken (a FIFO, a pathological pickle).
IMPORT_TIMEOUT_S = 900.0


def import_timeout() -> float:
    value = os.environ.get("SURGERY_EDGE_IMPORT_TIMEOUT")
    if value is None:
        return IMPORT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise CheckpointError(
            f"SURGERY_EDGE_IMPORT_TIMEOUT={value!r} is not a positive number of seconds."
        )
    return seconds


@contextlib.contextmanager
def import_budget(path: str | os.PathLike, seconds: float | None = None) -> Iterator[None]:
    """Abandon the block with CheckpointError once it has run ``seconds`` (default:
    :func:`import_timeout`). The alarm interrupts even a blocking read; it needs the main
    thread of a POSIX process, elsewhere the block runs without a deadline."""
    seconds = import_timeout() if seconds is None else seconds
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expired(signum, frame):
        raise CheckpointError(
            f"Reading {path} took more than {seconds:g} s, so it was abandoned (the time budget of "
            "an import; set SURGERY_EDGE_IMPORT_TIMEOUT to allow more for a slow disk). A file "
            "that never finishes loading is broken or hostile."
        )

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_archive(path: Path) -> None:
    """Refuse an archive checkpoint whose members are not plain, stored files.

    A zip (``torch.save``'s format) may hold only regular files, stored uncompressed, with
    relative names; a legacy tar only regular files (a FIFO member would block a reader forever,
    a link could point anywhere). The members may not add up to more than the file.
    """
    size = path.stat().st_size
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                members = z.infolist()
                total = 0
                for m in members:
                    mode = (m.external_attr >> 16) & 0o170000
                    if mode not in (0, stat.S_IFREG) or m.is_dir():
                        raise CheckpointError(
                            f"{path}: archive member {m.filename!r} is not a file."
                        )
                    if m.compress_type != zipfile.ZIP_STORED:
                        raise CheckpointError(
                            f"{path}: archive member {m.filename!r} is compressed; torch.save "
                            "stores its members, so the file did not come from it."
                        )
                    _check_member_name(path, m.filename)
                    total += m.file_size
                if total > size:
                    raise CheckpointError(f"{path}: its members claim more bytes than it holds.")
            return
        if tarfile.is_tarfile(path):
            with tarfile.open(path, mode="r:") as tar:
                total = 0
                for m in tar.getmembers():
                    if not m.isreg():
                        raise CheckpointError(
                            f"{path}: archive member {m.name!r} is not a regular file (a FIFO, "
                            "link or device); a checkpoint holds only files, so it was refused."
                        )
                    _check_member_name(path, m.name)
                    total += m.size
                if total > size:
                    raise CheckpointError(f"{path}: its members claim more bytes than it holds.")
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        raise CheckpointError(f"{path} is a damaged archive ({type(e).__name__}: {e}).") from None


def _check_member_name(path: Path, name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or ".." in parts or "\x00" in name:
        raise CheckpointError(f"{path}: archive member {name!r} has an unsafe name.")


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``), not a pickled checkpoint."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False

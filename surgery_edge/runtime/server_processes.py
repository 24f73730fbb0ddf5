"""What a server started by ``surgery-edge serve`` puts on the machine, and removing all of it.

A server is its owner (the process that runs :class:`~surgery_edge.runtime.serving.Server`),
``tritonserver`` (the owner's child; PyTriton starts it with ``PR_SET_PDEATHSIG``, so it gets
SIGTERM when the owner dies), one Python-backend stub process per model instance
(tritonserver's children), and two kinds of files:

- a work folder ``$TMPDIR/surgery-edge-serve-<owner pid>-XXXXXXXX``: the model repository,
  PyTriton's copy of tritonserver (about 23 MB) and Triton's log;
- shared-memory segments ``/dev/shm/pytrtion<owner pid>-*`` (PyTriton names the Python
  backend's regions after the owner's pid; the spelling is PyTriton's).

tritonserver and every stub have the work folder in their command line, and every stub the
name of its segment, so what belongs to which server can be proven from ``/proc``.

Three things remove it: :func:`sweep` when the owner stops the server (after Triton's own
stop, which leaves stubs behind when its exit timeout expires: a stub waiting on a request
when tritonserver exits hangs for good); a watchdog, this file run as a script (standard
library only), which the owner starts with a pipe as its stdin and which sweeps when it reads
EOF without being told that the owner stopped (the owner was killed: SIGKILL, a crash); and
:func:`sweep_stale` at the next start, for servers whose owner and watchdog died together
(``kill -9`` of the whole process group).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORK_PREFIX = "surgery-edge-serve-"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "pytrtion"  # pytriton.triton.Triton._shm_prefix: f"pytrtion{pid}-{hash}"
STOPPED = b"stopped\n"  # the owner's last words to its watchdog: nothing left to sweep
_WORK_ENV = "SURGERY_EDGE_SERVE_WORK"  # the watchdog's arguments: not in its command line,
_OWNER_ENV = "SURGERY_EDGE_SERVE_OWNER"  # where a sweep would find (and kill) the watchdog
_GRACE_ENV = "SURGERY_EDGE_SERVE_GRACE_S"


def work_folder() -> Path:
    """A new work folder for a server owned by this process (its pid in the name)."""
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-"))


def shm_segments(owner: int) -> list[Path]:
    """The shared-memory segments of the server owned by ``owner``."""
    try:
        return sorted(SHM_DIR.glob(f"{SHM_PREFIX}{owner}-*"))
    except OSError:
        return []


def processes_using(text: str) -> list[int]:
    """Processes (other than this one) whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if text in argv:
            found.append(int(entry.name))
    return found


def sweep(work: Path, owner: int, grace_s: float = 5.0) -> None:
    """Stop every process running from ``work`` (SIGTERM, SIGKILL after ``grace_s``), then
    remove the server's shared-memory segments and ``work`` itself."""
    _end(processes_using(f"{work}{os.sep}"), grace_s)
    for segment in shm_segments(owner):
        _unlink(segment)
    shutil.rmtree(work, ignore_errors=True)


def sweep_stale(tmp: str | os.PathLike | None = None) -> list[str]:
    """Remove what servers whose owner is dead left behind: processes running from their work
    folders, the folders, their shared-memory segments. Returns what was removed.

    A server counts as dead only when the pid in its names belongs to no process (a reused pid
    keeps its files, which is safe); a segment is kept while a process names it.
    """
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"):
        owner = _owner(folder.name, WORK_PREFIX)
        if owner is None or alive(owner) or not folder.is_dir() or folder.is_symlink():
            continue
        _end(processes_using(f"{folder}{os.sep}"), 0.0)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(str(folder))
    try:
        segments = list(SHM_DIR.glob(f"{SHM_PREFIX}*"))
    except OSError:
        segments = []
    for segment in segments:
        owner = _owner(segment.name, SHM_PREFIX)
        if owner is not None and not alive(owner) and not processes_using(segment.name):
            if _unlink(segment):
                removed.append(str(segment))
    return removed


def start_watchdog(work: Path, grace_s: float) -> subprocess.Popen:
    """The watchdog of the server owned by this process: it sweeps ``work`` when the owner
    dies without saying :data:`STOPPED` on its stdin (:func:`stop_watchdog`)."""
    env = {**os.environ, _WORK_ENV: str(work), _OWNER_ENV: str(os.getpid()),
           _GRACE_ENV: str(grace_s)}  # fmt: skip
    # -I -S: this file alone, no site packages; its own session: a terminal's Ctrl-C and a
    # signal to the owner's process group are the owner's to handle
    return subprocess.Popen(
        [sys.executable, "-I", "-S", __file__],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,  # not the owner's: a reader of its output would wait
        stderr=subprocess.DEVNULL,  # for the watchdog too
        env=env,
        start_new_session=True,
    )


def stop_watchdog(watchdog: subprocess.Popen) -> None:
    """Tell the watchdog that the owner stopped the server itself, and wait for it."""
    try:
        watchdog.stdin.write(STOPPED)
        watchdog.stdin.close()
    except OSError:  # it is gone already
        pass
    try:
        watchdog.wait(timeout=10)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _end(pids: list[int], grace_s: float) -> None:
    """SIGTERM ``pids``, then SIGKILL those still alive after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:  # gone, or not ours
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if alive(p)]
            time.sleep(0.05)


def _owner(name: str, prefix: str) -> int | None:
    found = re.match(rf"{re.escape(prefix)}(\d+)-", name)
    return int(found[1]) if found else None


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except OSError:
        return False
    return True


def _watch() -> None:
    """The watchdog's main: wait for the owner's end, then sweep unless it stopped cleanly."""
    work, owner = Path(os.environ[_WORK_ENV]), int(os.environ[_OWNER_ENV])
    grace_s = float(os.environ[_GRACE_ENV])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    said = sys.stdin.buffer.read()  # returns at EOF: the owner closed the pipe or died
    if said != STOPPED:
        sweep(work, owner, grace_s)


if __name__ == "__main__":
    _watch()

"""What a long command shows and records: progress and messages on stderr (stdout holds only
results), metrics logs of the training stages, and which dependency notices are kept quiet.

- Progress: a rich bar when stderr is a terminal; otherwise (CI, ``nohup``, a file) plain lines
  with every column, one every :data:`LINE_INTERVAL_S` seconds or every 10% of the steps,
  whichever comes first. ``SURGERY_EDGE_QUIET=1`` (``surgery-edge -q``) turns both off.
- Messages (:func:`message`): status lines on stderr (``-q`` turns progress off, not these).
- Metrics (:class:`MetricsLog`): one JSON object per line in ``RUN/logs/<stage>.jsonl``, and
  TensorBoard scalars where ``tensorboard`` is installed.

Nothing here imports rich or torch until a bar or a TensorBoard writer is opened: the runtime
imports this module (for :func:`silence_cuda_home_notice`) and needs neither.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LINE_INTERVAL_S = 10.0  # the longest a plain-line bar stays silent
LINE_FRACTION = 0.1  # ... or this share of its steps, whichever comes first


def quiet() -> bool:
    """Whether progress bars and progress lines are off (``-q`` / ``SURGERY_EDGE_QUIET=1``)."""
    return os.environ.get("SURGERY_EDGE_QUIET") == "1"


def message(text: str) -> None:
    """Print a status line on stderr (``reusing ...``, ``note: ...``): never on stdout, which
    holds only results, so that ``--json`` output parses when piped."""
    print(text, file=sys.stderr, flush=True)


def _fields(fields: dict[str, Any]) -> str:
    return "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
    )


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Bar:
    """What a loop holds: ``advance(n, **fields)`` after each step (fields: loss=..., ...)."""

    def advance(self, n: int = 1, **fields) -> None:
        pass


class _RichBar(_Bar):
    def __init__(self, progress, task_id):
        self._progress, self._task = progress, task_id

    def advance(self, n: int = 1, **fields) -> None:
        self._progress.update(self._task, advance=n, info=_fields(fields))


class _LineBar(_Bar):
    """Plain lines on stderr, for logs: ``name  12/40  30%  elapsed 0:00:21  left 0:00:49
    loss 0.412``, every :data:`LINE_INTERVAL_S` seconds (a background thread: a slow step
    cannot keep the log silent) or every :data:`LINE_FRACTION` of the steps, and at the start
    and the end."""

    def __init__(self, total: int, description: str, interval_s: float):
        self.total, self.description, self.done, self.info = total, description, 0, ""
        self._lock = threading.Lock()
        self._start = self._last = time.monotonic()
        self._every = max(1, math.ceil(total * LINE_FRACTION)) if total > 0 else None
        self._next = self._every
        self._stop = threading.Event()
        self._print()  # the log shows when the stage began
        self._ticker = threading.Thread(target=self._tick, args=(interval_s,), daemon=True)
        self._ticker.start()

    def advance(self, n: int = 1, **fields) -> None:
        with self._lock:
            self.done += n
            if fields:
                self.info = _fields(fields)
            if self._next is not None and self.done >= self._next and self.done < self.total:
                self._next = (self.done // self._every + 1) * self._every
                self._print()

    def _tick(self, interval_s: float) -> None:
        while not self._stop.wait(min(interval_s, 1.0)):
            with self._lock:
                if time.monotonic() - self._last >= interval_s:
                    self._print()

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        with self._lock:
            self._print(final=True)

    def _print(self, final: bool = False) -> None:
        now = time.monotonic()
        elapsed, self._last = now - self._start, now
        columns = [self.description]
        if self.total > 0:
            columns += [f"{self.done}/{self.total}", f"{100 * self.done // self.total}%"]
        else:
            columns.append(str(self.done))
        columns.append(f"elapsed {_clock(elapsed)}")
        if final:
            columns.append("done" if self.done >= self.total else "stopped")
        elif 0 < self.done < self.total:
            columns.append(f"left {_clock(elapsed / self.done * (self.total - self.done))}")
        if self.info:
            columns.append(self.info)
        print("  ".join(columns), file=sys.stderr, flush=True)


_ACTIVE = None  # rich allows one live display at a time: nested bars share it


@contextlib.contextmanager
def progress_bar(total: int, description: str, show: bool = True) -> Iterator[_Bar]:
    """A progress display on stderr; call ``bar.advance(loss=...)`` once per step.

    A rich bar on a terminal, plain lines otherwise (see the module). ``show=False`` (e.g. on
    every rank of a distributed job but the first) shows nothing. A bar opened inside another's
    loop (an engine's accuracy inside the export stage) is a row of the same rich display,
    removed when its loop ends.
    """
    if not show or quiet():
        yield _Bar()
        return
    progress_cls = _rich_progress() if sys.stderr.isatty() else None
    if progress_cls is None:
        bar = _LineBar(total, description, LINE_INTERVAL_S)
        try:
            yield bar
        finally:
            bar.close()
        return
    global _ACTIVE
    if _ACTIVE is not None:  # a bar inside another one's loop: a second row of the same display
        task = _ACTIVE.add_task(description, total=total, info="")
        try:
            yield _RichBar(_ACTIVE, task)
        finally:
            _ACTIVE.remove_task(task)
        return
    from rich.console import Console  # deferred with the bar (see _rich_progress)
    from rich.progress import (  # deferred with the bar
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with progress_cls(*columns, console=Console(stderr=True), transient=False) as progress:
        _ACTIVE = progress
        try:
            yield _RichBar(progress, progress.add_task(description, total=total, info=""))
        finally:
            _ACTIVE = None


def _rich_progress():
    """rich's Progress class, or None where rich is not installed (plain lines then)."""
    try:
        from rich.progress import Progress  # deferred: the runtime does not need rich
    except ImportError:
        return None
    return Progress


class MetricsLog:
    """A training stage's metrics: ``RUN/logs/<stage>.jsonl``, one JSON object per line.

    Each :meth:`write` appends one line and flushes it, so a reader (``tail -f``, a plot) sees
    every finished step; a process killed mid-write can leave a torn last line, which a reader
    skips. Every training run of the stage starts with a ``{"event": "start", ...}`` line and
    appends (a resumed run continues the file). Where ``tensorboard`` is installed the numbers
    also go to TensorBoard scalars under ``RUN/logs/tensorboard/<stage>``.

    Args:
        path: the ``.jsonl`` file (its folder is created); None: a log that writes nothing
            (the non-writing ranks of a distributed job).
        start: fields of the start line (the stage's settings).
    """

    def __init__(self, path: str | os.PathLike | None, **start: Any):
        self.path = None if path is None else Path(path)
        self._file = self._board = None
        self._t0 = time.monotonic()
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._line({"event": "start", "time": time.time(), **start})
        self._board = _tensorboard(self.path.parent / "tensorboard" / self.path.stem)

    def write(self, step: int, **values: Any) -> None:
        """One step's row: ``step``, the given values (a dict value becomes ``key/sub``
        scalars in TensorBoard) and ``elapsed_s`` since the log was opened."""
        if self._file is None:
            return
        row = {"step": step, **values, "elapsed_s": round(time.monotonic() - self._t0, 3)}
        self._line(row)
        if self._board is not None:
            for key, value in values.items():
                items = value.items() if isinstance(value, dict) else [(None, value)]
                for sub, v in items:
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._board.add_scalar(key if sub is None else f"{key}/{sub}", v, step)

    def _line(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._board is not None:
            self._board.close()
            self._board = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensorboard(folder: Path):
    """A TensorBoard SummaryWriter into ``folder``, or None where tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # deferred: needs the tensorboard pkg
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics log (a torn last line, from a killed process, is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class _NoCudaHomeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." on machines without a GPU.

    torch.utils.cpp_extension logs it when it is first imported (AOTInductor compiles and
    loads import it) on a machine that has a CUDA toolkit folder but no GPU: it says nothing
    about the user's command, so surgery-edge keeps it out of their terminal.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


_CUDA_NOTICE = _NoCudaHomeNotice()


def silence_cuda_home_notice(enabled: bool = True) -> None:
    """Install (or, with ``enabled=False``, remove) the filter; stdlib only, torch not needed."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if enabled:
        logger.addFilter(_CUDA_NOTICE)  # adding the same filter twice keeps one
    else:
        logger.removeFilter(_CUDA_NOTICE)

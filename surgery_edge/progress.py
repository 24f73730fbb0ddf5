"""What a long command shows: progress bars (rich), silent when ``SURGERY_EDGE_QUIET=1``
(``surgery-edge -q``), and which dependency notices are kept quiet."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress, task_id):
        self._progress, self._task = progress, task_id

    def advance(self, n: int = 1, **fields) -> None:
        if self._progress is not None:
            desc = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
            )
            self._progress.update(self._task, advance=n, info=desc)


_ACTIVE: Progress | None = None  # rich allows one live display at a time: nested bars share it


@contextlib.contextmanager
def progress_bar(total: int, description: str, show: bool = True) -> Iterator[_Bar]:
    """A rich progress bar; call ``bar.advance(loss=...)`` once per step.

    ``show=False`` (e.g. on every rank of a distributed job but the first) draws nothing. A
    bar opened inside another's loop (an engine's accuracy inside the export stage) is a row
    of the same display, removed when its loop ends.
    """
    if not show or quiet():
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    global _ACTIVE
    if _ACTIVE is not None:  # a bar inside another one's loop: a second row of the same display
        task = _ACTIVE.add_task(description, total=total, info="")
        try:
            yield _Bar(_ACTIVE, task)
        finally:
            _ACTIVE.remove_task(task)
        return
    with Progress(*columns, transient=False) as progress:
        _ACTIVE = progress
        try:
            yield _Bar(progress, progress.add_task(description, total=total, info=""))
        finally:
            _ACTIVE = None


def quiet() -> bool:
    """Whether progress bars and progress lines are off (``-q`` / ``SURGERY_EDGE_QUIET=1``)."""
    return os.environ.get("SURGERY_EDGE_QUIET") == "1"


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

"""Progress bars (rich) for every long loop; silent when ``SURGERY_EDGE_QUIET=1``."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def progress_bar(total: int, description: str, show: bool = True) -> Iterator[_Bar]:
    """A rich progress bar; call ``bar.advance(loss=...)`` once per step.

    ``show=False`` (e.g. on every rank of a distributed job but the first) draws nothing.
    """
    if not show or os.environ.get("SURGERY_EDGE_QUIET") == "1":
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
    with Progress(*columns, transient=False) as progress:
        yield _Bar(progress, progress.add_task(description, total=total, info=""))

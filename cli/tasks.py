"""The commands that change a finished run's task set: add-task, drop-task."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from surgery_edge.cli.common import Device, RunDir, note, parse_pairs, say, user_errors

Strategy = enum.Enum("Strategy", {n: n for n in ("frozen", "remerge")}, type=str)
StrategyOption = Annotated[
    Strategy,
    typer.Option(
        help="frozen: the merges and the other tasks' adapters stay bit for bit, only the "
        "task's own adapters change; remerge: the merges are made again and every task's "
        "adapters fine-tuned, warm-started from the previous ones."
    ),
]
Steps = Annotated[
    int | None,
    typer.Option(
        help="Batches per task to train (default: frozen, the run's own; remerge, half of them)."
    ),
]


def _head_beside(name: str, expert: Path) -> Path:
    """A run's layout keeps a task's head at ``../heads/<task>.safetensors`` of its expert."""
    from surgery_edge.errors import ConfigError  # deferred with the library

    head = expert.parent.parent / "heads" / f"{name}.safetensors"
    if not head.is_file():
        raise ConfigError(
            f"No --head given and no head beside the expert {expert} (looked for {head}). Give "
            f"the task's head: --head HEAD.safetensors."
        )
    return head


@user_errors
def add_task(
    run_dir: RunDir,
    expert: Annotated[
        str, typer.Option(metavar="NAME=CHECKPOINT", help="The new task's name and expert.")
    ],
    strategy: StrategyOption,
    head: Annotated[
        Path | None,
        typer.Option(help="The task's head (default: heads/NAME.safetensors beside experts/)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="A recipe run's new task's images: a folder (test/<class>/, train/<class>/ or "
            "adapt/), or a YAML file with its entry as a recipe's data.tasks takes it (any "
            "source). Needed on a recipe run; the built-in suite generates its tasks' images."
        ),
    ] = None,
    steps: Steps = None,
    device: Device = None,
):
    """Add a task to a finished run: its expert joins the merge (remerge) or only its adapters
    train on the merged backbone (frozen). eval and export then work on the new task set;
    RUN/tasks.json records the change."""
    from surgery_edge.run.state import Run  # deferred: imports torch
    from surgery_edge.run.tasks import add_task as add  # deferred with the pipeline

    ((name, checkpoint),) = parse_pairs([expert], "--expert", "shapes=expert.safetensors").items()
    checkpoint = Path(checkpoint)
    head = head if head is not None else _head_beside(name, checkpoint)
    run = Run.open(run_dir, log=note, device=device, write=True)
    change = add(run, name, checkpoint, head, Strategy(strategy).value, steps, data=data)
    _said(change)


@user_errors
def drop_task(
    run_dir: RunDir,
    name: Annotated[str, typer.Argument(help="The task to remove.")],
    strategy: StrategyOption,
    steps: Steps = None,
    device: Device = None,
):
    """Remove a task from a finished run: its adapters and head leave (frozen), or the merges
    are made again without its task vector (remerge). Its expert stays in the run's files."""
    from surgery_edge.run.state import Run  # deferred: imports torch
    from surgery_edge.run.tasks import drop_task as drop  # deferred with the pipeline

    run = Run.open(run_dir, log=note, device=device, write=True)
    _said(drop(run, name, Strategy(strategy).value, steps))


def _said(change) -> None:
    say(f"tasks: {', '.join(change.tasks_after)}")
    for (merge, method), path in change.adapters.items():
        say(f"{merge} {method}: {path}")
    say(f"took {change.seconds['total']:.1f} s")

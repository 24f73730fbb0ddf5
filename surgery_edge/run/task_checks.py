"""The checks of a change of a finished run's task set (``add-task``, ``drop-task``): each
runs before anything is written, and refuses (exit 2) with what was wrong and what to do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from surgery_edge.data.suite import TASK_NAMES, get_task
from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.io import safe_name
from surgery_edge.models import load_encoder
from surgery_edge.models.checkpoint import HeadCheckpoint, load_head
from surgery_edge.run.state import Run
from surgery_edge.run.task_data import ArrivingData

STRATEGIES = ("frozen", "remerge")
# An expert fine-tuned from the run's pretrained model moves it by a task vector of the size
# of the run's own; one from another base is as far from it as two pretrainings are. The
# threshold sits between them: a task vector more than this many times the largest of the
# run's is refused as another base (the recorded hash decides when the expert carries one).
BASE_SCALE_LIMIT = 3.0


def check_strategy(strategy: str) -> str:
    """``strategy`` when it is one of :data:`STRATEGIES` (else ConfigError, exit 2)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"Unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}.")
    return strategy


def task_vector_scale(expert: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """||expert - base|| / ||base|| over the floating-point weights: a fine-tuned expert's task
    vector is small beside its base; a model pretrained elsewhere is as far as the base is big."""
    diff = total = 0.0
    for key, b in base.items():
        if b.is_floating_point() and key in expert:
            diff += float((expert[key].double() - b.double()).pow(2).sum())
            total += float(b.double().pow(2).sum())
    return (diff / max(total, 1e-30)) ** 0.5


def check_task_name(run: Run, name: str) -> None:
    """Refuse (exit 2) a name the run has, or, on the built-in suite, no built-in task's."""
    safe_name(name, "Task name")
    if name in run.tasks:
        raise ConfigError(
            f"Run {run.out} already has a task {name!r} (tasks {run.tasks}), so nothing was "
            f"added. Choose another name, or replace it: `surgery-edge drop-task --run {run.out} "
            f"{name}`, then add it again."
        )
    if run.config.builtin and name not in TASK_NAMES:
        raise ConfigError(
            f"The built-in suite has no task {name!r}, so its data cannot be generated; the "
            f"built-in tasks this run does not have are "
            f"{[t for t in TASK_NAMES if t not in run.tasks]}."
        )


def check_new_task(
    run: Run, name: str, expert: Path, head: Path, arriving: ArrivingData | None = None
) -> None:
    """Refuse (exit 2), before anything is written, a task the run cannot take: a name the run
    has (or no built-in task of that name), an expert or head of another architecture or image
    size, an expert fine-tuned from another pretrained model (its recorded base's hash, else its
    task vector's scale beside the run's), a head of another task or other classes.

    ``run`` has its experts loaded (:meth:`Run.require_experts`); ``arriving``: a recipe run's
    new task's images (whose classes the head must have, in their order)."""
    check_task_name(run, name)
    check_head(run, name, head, check_expert(run, name, expert, head), arriving)


def _where(run: Run, name: str) -> str:
    return f"for the new task {name!r} of run {run.out}"


def check_expert(run: Run, name: str, expert: Path, head: Path) -> HeadCheckpoint:
    """:func:`check_new_task`'s checks of the expert and of the head's file (architecture,
    pretrained base), which need no data; returns the head."""
    where = _where(run, name)
    try:
        new = load_encoder(expert, run.arch)
    except CheckpointError as e:
        raise CheckpointError(f"Expert {expert} {where} does not fit: {e}") from None
    pre = load_encoder(run.experts.pretrained, run.arch)
    base = (new.meta.get("provenance") or {}).get("pretrained")
    ours = run.hashes.digest(run.experts.pretrained)
    if isinstance(base, str) and base != ours:
        raise CheckpointError(
            f"Expert {expert} {where} was fine-tuned from another pretrained model (SHA-256 "
            f"{base[:12]}… recorded in it; the run's {run.experts.pretrained} is {ours[:12]}…): "
            "its task vector would be measured from the wrong base. Fine-tune it from the run's "
            "pretrained checkpoint."
        )
    if base != ours:  # no recorded base: compare the task vector's size with the run's
        scale = task_vector_scale(new.state_dict, pre.state_dict)
        own = max(
            task_vector_scale(load_encoder(p, run.arch).state_dict, pre.state_dict)
            for p in run.experts.experts.values()
        )
        if scale > BASE_SCALE_LIMIT * own:
            raise CheckpointError(
                f"Expert {expert} {where} looks fine-tuned from another pretrained model: its "
                f"task vector is {scale:.3f} of the pretrained weights' norm, {scale / own:.1f}x "
                f"the largest of the run's experts ({own:.3f}); more than {BASE_SCALE_LIMIT:g}x "
                "is another base. Fine-tune it from the run's pretrained checkpoint "
                f"({run.experts.pretrained})."
            )
    try:
        return load_head(head, run.arch)
    except CheckpointError as e:
        raise CheckpointError(f"Head {head} {where} does not fit: {e}") from None


def check_head(
    run: Run, name: str, head: Path, found: HeadCheckpoint, arriving: ArrivingData | None
) -> None:
    """:func:`check_new_task`'s check that the head ``found`` (read from ``head``) is the new
    task's, with its classes: the built-in task's, or those of a recipe's ``arriving`` data."""
    where = _where(run, name)
    have = list(found.class_names)
    if arriving is None:
        classes = list(get_task(name).classes)
        if found.task != name or have != classes:
            raise CheckpointError(
                f"Head {head} {where} is the head of task {found.task!r} with classes "
                f"{have[:6]}, not of {name!r} with classes {classes[:6]}. Give the head saved "
                "with the expert (--head)."
            )
        return
    # A recipe names a task's classes from its data (the head its import writes takes them):
    # the head must have as many, and not the same names in another order (labels would differ).
    classes = list(arriving.data.class_names)
    shuffled = have != classes and sorted(have) == sorted(classes)
    if found.task != name or len(have) != len(classes) or shuffled:
        order = " (the same names in another order)" if shuffled else ""
        raise CheckpointError(
            f"Head {head} {where} is the head of task {found.task!r} with {len(have)} classes "
            f"{have[:6]}, not of {name!r} with the {len(classes)} classes of --data "
            f"{arriving.given} {classes[:6]}{order}. Give the head saved with the expert "
            "(--head), or data whose class folders (or class-name file) are the head's classes."
        )


def check_drop(run: Run, name: str) -> None:
    """Refuse (exit 2) dropping a task the run lacks, or its last task."""
    if name not in run.tasks:
        raise ConfigError(
            f"Run {run.out} has no task {name!r}; its tasks are {run.tasks}. Nothing was dropped."
        )
    if len(run.tasks) == 1:
        raise ConfigError(
            f"{name!r} is the last task of run {run.out}: a run without tasks has nothing to "
            "merge or serve, so nothing was dropped. Add another task first, or delete the run."
        )

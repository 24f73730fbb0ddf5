"""The images of a task that joins (or leaves) a recipe run after the merge: ``add-task --data``.

A recipe run (``surgery-edge run CONFIG``) reads its tasks from disk, so a task added later
brings its images as a task of the recipe would. ``--data PATH`` is either a folder in the
folder source's layout (``test/<class>/``, and ``train/<class>/`` or ``adapt/``), or a YAML
file holding the task's entry as a recipe's ``data.tasks`` takes it (any source: a torchvision
dataset's files, split lists, a class-name file; the YAML file's folder roots its relative paths
as ``data.root`` roots a recipe's). The recipe's own loader reads it
(:func:`~surgery_edge.run.recipe.read_disk_task`: the same checks and messages, the run's input
size, seed and adaptation sample), first into a temporary folder, so a folder it refuses leaves
nothing in the run; publishing the task moves the decoded splits into ``RUN/cache/data``, where
every later command finds them. The task's
head must have the data's classes (their number, and not the same names in another order); the
run's copy of it names them as the data does, as the recipe's import names a head's classes.

The run's recorded config gains the task's entry (``data.tasks``, its paths made absolute;
for experts imported from open_clip or Hugging Face files, ``checkpoints.experts`` names the
expert file the task came with), so ``eval``, ``export``, ``train`` and a later ``drop-task``
read it as any task of the recipe; ``drop-task`` removes both entries.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from surgery_edge.data.suite import TaskData
from surgery_edge.errors import ConfigError
from surgery_edge.io import MAX_YAML_BYTES, atomic_path, load_yaml, not_a_file
from surgery_edge.models.checkpoint import load_tensors, save_tensors
from surgery_edge.run.config import DataTask, RunConfig, config_errors
from surgery_edge.run.recipe import read_disk_task
from surgery_edge.run.state import Run

YAML_SUFFIXES = (".yaml", ".yml", ".json")  # JSON is YAML: a `data.tasks` entry either way
LAYOUT = (
    "a folder holding test/<class>/<images> and train/<class>/<images> or adapt/<images>, or "
    "a YAML file with the task's entry as a recipe's `data.tasks` takes it"
)


@dataclass
class ArrivingData:
    """The images of a task being added to a recipe run, decoded into a staging folder."""

    name: str
    entry: DataTask  # what joins the config's data.tasks
    data: TaskData  # memory-mapped from ``staging`` until published
    staging: Path
    given: Path  # --data, for messages


def check_data_option(run: Run, data: Path | None) -> None:
    """Refuse (exit 2) ``--data`` on a run of the built-in suite, and its absence on a recipe
    run, before anything is read or written."""
    if run.config.builtin and data is not None:
        raise ConfigError(
            f"--data {data}: run {run.out} is a run of the built-in suite, whose tasks' images "
            "are generated from the task's name, so it takes no data; leave --data out. --data "
            "is for runs over data on disk (`surgery-edge run CONFIG`)."
        )
    if not run.config.builtin and data is None:
        raise ConfigError(
            f"Run {run.out} is a recipe run over data on disk, so the new task needs its images: "
            f"give --data PATH, {LAYOUT}. Nothing was added."
        )


def task_entry(name: str, path: Path) -> DataTask:
    """The ``data.tasks`` entry of task ``name``'s data at ``path``: a folder (the folder
    source), or a YAML file holding an entry, whose relative paths (and its default path, a
    folder named ``name``) the file's folder roots as ``data.root`` roots a recipe's; paths
    absolute.

    Raises:
        ConfigError: the YAML file is unreadable or its entry is not one a recipe takes.
    """
    path = Path(path).expanduser().absolute()
    if path.suffix.lower() not in YAML_SUFFIXES or not_a_file(path) is not None:
        return DataTask(path=path)  # the loader says what is wrong with a folder that is not
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"--data {path} holds more than {MAX_YAML_BYTES:,} bytes.")
        fields = load_yaml(path.read_text(), f"--data {path}")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--data {path} is unreadable ({e}).") from None
    if not isinstance(fields, dict):
        raise ConfigError(
            f"--data {path} must hold one task's entry as a recipe's `data.tasks` takes it, e.g. "
            "`{source: torchvision, dataset: MNIST, path: mnist-root}`."
        )
    try:
        entry = DataTask.model_validate(fields)
    except ValidationError as e:
        raise ConfigError(f"--data {path} is invalid: {config_errors(e)}") from None
    here = path.parent
    return entry.model_copy(
        update={
            "path": here / (entry.path if entry.path is not None else Path(name)),
            "class_names": None if entry.class_names is None else here / entry.class_names,
        }
    )


def read_arriving(run: Run, name: str, data: Path, staging: Path) -> ArrivingData:
    """Read the new task ``name``'s images from ``data`` as the recipe reads a task, decoding
    them into ``staging`` (DataError / ConfigError: the data is refused, the run untouched)."""
    entry = task_entry(name, data)
    found = read_disk_task(run, name, entry, entry.path, entry.class_names, staging)
    return ArrivingData(name, entry, found, staging, Path(data))


def recipe_with_tasks(
    config: RunConfig, tasks: list[str], added: dict[str, tuple[DataTask, Path]]
) -> RunConfig:
    """``config`` (a recipe's) with exactly ``tasks``, in that order; ``added``: each new task's
    data entry and expert file. Checked as ``config.json`` will be read back (ConfigError)."""
    entries = {**config.data.tasks, **{t: entry for t, (entry, _) in added.items()}}
    data = config.data.model_copy(update={"tasks": {t: entries[t] for t in tasks}})
    checkpoints = config.checkpoints
    if checkpoints.format != "task_vectors":  # those formats name every task's expert file
        experts = {**checkpoints.experts, **{t: e.absolute() for t, (_, e) in added.items()}}
        experts = {t: p for t, p in experts.items() if t in tasks}
        checkpoints = checkpoints.model_copy(update={"experts": experts})
    changed = config.model_copy(update={"data": data, "checkpoints": checkpoints})
    try:
        return RunConfig.model_validate(changed.model_dump(mode="json"))
    except ValidationError as e:
        raise ConfigError(
            f"The task set {tasks} makes an invalid run config: {config_errors(e)}"
        ) from None


def publish_data(run: Run, arriving: ArrivingData) -> None:
    """Move the staged splits into ``RUN/cache/data`` (each file atomically, its digests last,
    as the loader writes them), read the task from there into ``run.suite``, and name the
    data's classes in the run's copy of the task's head."""
    cache = run.out / "cache" / "data"
    staged = sorted(arriving.staging.iterdir(), key=lambda p: (p.name.endswith(".json"), p.name))
    for path in staged:
        with atomic_path(cache / path.name) as tmp:
            shutil.move(path, tmp)
    entry = arriving.entry
    found = read_disk_task(run, arriving.name, entry, entry.path, entry.class_names)
    run.suite.tasks = [found if t.name == arriving.name else t for t in run.suite.tasks]
    arriving.data = found
    # the run's head names the data's classes, as the recipe's import names them (an imported
    # task_vectors head says class_0, class_1, ...)
    head = run.layout.head(arriving.name)
    tensors, meta = load_tensors(head)
    if meta.get("class_names") != list(found.class_names):
        save_tensors(head, tensors, {**meta, "class_names": list(found.class_names)})
        run.record(head)


def data_record(run: Run, arriving: ArrivingData) -> dict:
    """What ``RUN/tasks.json`` records of the task's data: where it is, and the content hashes
    of the images it learns from and is evaluated on (and of the test labels)."""
    name = arriving.name
    return {
        "path": str(arriving.entry.path),
        "source": arriving.entry.source,
        **{f"{split}_images": run.images_digest(name, split) for split in ("adapt", "test")},
        "test_labels": run.suite.task(name).digest("test_y"),
    }

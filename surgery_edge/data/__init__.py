"""The built-in offline suite, datasets from disk, splits and transforms."""

from surgery_edge.data.disk import DiskTask, load_class_names, load_disk_task
from surgery_edge.data.suite import (
    TASK_NAMES,
    TASKS,
    Suite,
    TaskData,
    generate_suite,
    load_or_generate_suite,
    pretraining_corpus,
)
from surgery_edge.data.transforms import to_model_input

__all__ = [
    "DiskTask",
    "TASKS",
    "TASK_NAMES",
    "Suite",
    "TaskData",
    "generate_suite",
    "load_class_names",
    "load_disk_task",
    "load_or_generate_suite",
    "pretraining_corpus",
    "to_model_input",
]

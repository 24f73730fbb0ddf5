"""The built-in offline suite, splits and transforms."""

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
    "TASKS",
    "TASK_NAMES",
    "Suite",
    "TaskData",
    "generate_suite",
    "load_or_generate_suite",
    "pretraining_corpus",
    "to_model_input",
]

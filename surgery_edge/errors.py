"""User-facing errors.

Everything a user can cause (a bad path, a wrong architecture, an unknown name) raises a
subclass of :class:`SurgeryEdgeError`. The CLI prints its message as one paragraph and exits
with code 2, without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class SurgeryEdgeError(Exception):
    """An error the user can act on; the message says what was wrong and what to do."""

    exit_code = 2


class CheckpointError(SurgeryEdgeError):
    """A checkpoint is missing, unreadable, or does not fit the expected architecture."""


class ConfigError(SurgeryEdgeError):
    """An unknown name (method, task, architecture) or an invalid option value."""


class MergeError(SurgeryEdgeError):
    """Experts that cannot be merged (mismatched keys, shapes or architectures)."""


class AdapterError(SurgeryEdgeError):
    """An adapter file that does not fit the model (rank, tasks, architecture)."""


class TrainingError(SurgeryEdgeError):
    """Training cannot continue (e.g. a non-finite loss)."""


class ExportError(SurgeryEdgeError):
    """An export or runtime problem: missing backend, corrupt engine, bad input."""


class DataError(SurgeryEdgeError):
    """A dataset that cannot be used: no images, unknown layout, class names that do not fit."""

"""User-facing errors.

Everything a user can cause (a bad path, a wrong architecture, an unknown name) raises a
subclass of :class:`SurgeryEdgeError`. The CLI prints its message as one paragraph and exits
with the error's ``exit_code``, without a traceback. Programming errors stay ordinary
exceptions.

Exit codes, one meaning each (README, "Exit codes"):

- 0 (``EXIT_DONE``): done;
- 1 (``EXIT_PARTIAL``): a partial result (some inputs could not be read; the others were
  answered);
- 2 (``EXIT_USAGE``): a usage or input error, the message names the file or value to fix;
- 3 (``EXIT_FAILED``): something the user's input did not cause failed: a worker process of a
  distributed job, a server the command started, or a dependency that is missing or broken;
  running the command again (after installing what the message names) may succeed;
- 130 (``EXIT_INTERRUPTED``): interrupted (SIGINT / SIGTERM).
"""

from __future__ import annotations

EXIT_DONE = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_INTERRUPTED = 130


class SurgeryEdgeError(Exception):
    """An error the user can act on; the message says what was wrong and what to do."""

    exit_code = EXIT_USAGE


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


class FailedError(SurgeryEdgeError):
    """Not the user's input: a worker, a server or a dependency failed (exit code 3)."""

    exit_code = EXIT_FAILED


class DependencyError(FailedError):
    """A package the command needs is missing or broken; the message names the extra to
    install (e.g. ``pip install 'surgery-edge[train]'``)."""


class WorkerError(FailedError):
    """A process the command started (a rank of a distributed job, tritonserver) stopped."""

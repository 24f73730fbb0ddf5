"""``--nproc N``: run a command as N processes of one torchrun job on this machine.

The command is started again, N times, as ``python -m surgery_edge.cli <command> <options>``
(its options as given, ``--nproc`` left out) by torch's elastic launcher, exactly as
``torchrun --standalone --nproc-per-node N -m surgery_edge.cli ...`` starts it; each process
finds its rank in the environment (:mod:`surgery_edge.distributed`). Across machines, start the
command with ``torchrun`` itself (README: "Distributed training").

How a job stops, whichever way it stops, is one paragraph and one exit code:

- The settings are checked before any process starts (the command's own checks, run here).
- Each process runs its command inside :func:`worker`: it dies with the process that started it
  (``prctl(PR_SET_PDEATHSIG)``: a launcher killed with SIGKILL leaves no process that goes on
  and writes), and its own error is handed to the launcher instead of being printed by every
  rank (under plain torchrun, only local rank 0 prints it).
- The launcher prints the cause once: a rank's input error (exit 2, nothing to resume), a rank
  that was killed or crashed (exit 3, "run it again, with --resume"), or SIGTERM / SIGINT to the
  launcher, which stops every process (exit 130).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import typer

from surgery_edge.errors import EXIT_FAILED, EXIT_INTERRUPTED, ConfigError, SurgeryEdgeError

REPORTS = "SURGERY_EDGE_RANK_REPORTS"  # where the ranks of a --nproc job leave their errors
LAUNCHER = "SURGERY_EDGE_LAUNCHER_PID"  # the process that started them
_HANDLED = "TORCHELASTIC_SIGNALS_TO_HANDLE"  # torch's launcher sets it from its config
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Interrupted(SurgeryEdgeError):
    """SIGTERM or SIGINT reached the launcher: every process was stopped (exit code 130)."""

    exit_code = EXIT_INTERRUPTED


def check_nproc(nproc: int | None) -> int:
    """The number of processes to launch (1: run here); refuses nonsense and nesting."""
    if nproc is None:
        return 1
    if nproc < 1 or nproc > 1024:
        raise ConfigError(f"--nproc must be an integer from 1 to 1024, got {nproc}.")
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "--nproc was given to a process that torchrun already started as one rank of a job: "
            "leave --nproc out under torchrun (its --nproc-per-node sets the processes)."
        )
    return nproc


def command_line(ctx: typer.Context, drop: tuple[str, ...] = ("nproc",)) -> list[str]:
    """The command and the options the user gave it (not their defaults), as arguments."""
    args = [ctx.info_name or ""]
    for param in ctx.command.params:
        if param.name in drop or param.name is None:
            continue
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            args.append(_text(value))
            continue
        if getattr(param, "is_flag", False) and not getattr(param, "count", False):
            names = param.opts if value else param.secondary_opts
            if names:
                args.append(names[0])
            continue
        for item in value if getattr(param, "multiple", False) else [value]:
            args += [param.opts[0], _text(item)]
    return args


def _text(value) -> str:
    return str(getattr(value, "value", value))


# --- in each process of a job ----------------------------------------------------------------


@contextlib.contextmanager
def worker() -> Iterator[None]:
    """The body of a command that may run as one rank of a job (nothing changes otherwise).

    A rank dies with the process that started it, even when that one is killed with SIGKILL.
    Its user error, lost peer or interrupt goes to the ``--nproc`` launcher, which prints the
    cause once; under plain torchrun, local rank 0 prints it and the others only exit with its
    code (every rank meets the same error: they read the same run and settings).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    die_with_parent()
    try:
        yield
    except SurgeryEdgeError as e:
        _hand_over(e.exit_code, str(e), type(e).__name__, e)
    except KeyboardInterrupt as e:
        _hand_over(EXIT_INTERRUPTED, "interrupted", "Interrupted", e)


def _hand_over(code: int, message: str, kind: str, error: BaseException) -> None:
    reports = os.environ.get(REPORTS)
    if reports:
        rank = os.environ.get("RANK", "0")
        report = {"code": code, "kind": kind, "message": message}
        with contextlib.suppress(OSError):
            Path(reports, f"{rank}.json").write_text(json.dumps(report))
        raise typer.Exit(code) from None
    if os.environ.get("LOCAL_RANK", "0") != "0":
        raise typer.Exit(code) from None
    raise error


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that started it dies.

    Without it, killing the launcher (``kill -9``, an out-of-memory kill) leaves the ranks
    running on their own, and the writer goes on to write adapters nobody asked for. A rank
    of ``--nproc`` whose launcher is already gone by the time this runs (it imported torch
    first) stops here.
    """
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    launcher = os.environ.get(LAUNCHER, "")
    if launcher.isdigit() and os.getppid() != int(launcher):
        os._exit(EXIT_INTERRUPTED)


# --- the launcher ----------------------------------------------------------------------------


def relaunch(ctx: typer.Context, nproc: int) -> None:
    """Run this command as ``nproc`` processes of one job on this machine; returns when all have
    finished. Otherwise raises the cause, once: a rank's own error (as that rank raised it),
    :class:`~surgery_edge.distributed.DistributedError` naming the rank that stopped first (and
    how), or :class:`Interrupted` when this process got SIGTERM or SIGINT."""
    from torch.distributed.elastic.multiprocessing import SignalException  # deferred: torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # (torch)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch  # deferred: torch

    for name in list(logging.Logger.manager.loggerDict):  # each sets its own level
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # the summary says it once
    received: list[signal.Signals] = []

    def stop(signum: int, frame) -> None:
        # SIGINT as well as SIGTERM stops the ranks with SIGTERM: a rank that is still starting
        # Python dies quietly of it, where SIGINT would print an interpreter traceback there.
        received.append(signal.Signals(signum))
        raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.SIGTERM)

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port on this machine (torchrun --standalone)
        max_restarts=0,
        monitor_interval=0.1,
        signals_to_handle="SIGTERM,SIGHUP,SIGQUIT",  # SIGINT is left to `stop`
    )
    args = ["-m", "surgery_edge.cli", *command_line(ctx)]
    reports = Path(tempfile.mkdtemp(prefix="surgery-edge-ranks-"))
    saved = {k: os.environ.get(k) for k in (REPORTS, LAUNCHER, _HANDLED, "OMP_NUM_THREADS")}
    os.environ.update({REPORTS: str(reports), LAUNCHER: str(os.getpid())})
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N processes share the cores
    handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as e:
        raise _stopped(e.failures, _read_reports(reports), nproc) from None
    except SignalException as e:
        name = (received[-1] if received else e.sigval).name
        raise Interrupted(
            f"Stopped by {name}: the {nproc} processes of the job were stopped too. Nothing "
            "partial was written: finished artefacts and the last training checkpoint are "
            "kept, so the same command (with --resume for train) continues from there."
        ) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(reports, ignore_errors=True)


def _read_reports(folder: Path) -> dict[int, dict]:
    found = {}
    for path in folder.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(path.read_text())
            if path.stem.isdigit() and isinstance(report, dict):
                found[int(path.stem)] = report
    return found


def _stopped(failures: dict, reports: dict[int, dict], nproc: int) -> SurgeryEdgeError:
    """The error that says why the job stopped: the first cause, told apart from what it
    caused (ranks that lost contact with it, ranks the launcher then stopped with SIGTERM)."""
    ordered = sorted(
        failures.items(),
        key=lambda item: (_order(item[1], reports.get(item[0])), item[1].timestamp, item[0]),
    )
    rank, first = ordered[0]
    report = reports.get(rank)
    if report is not None and report.get("kind") != "DistributedError":
        code, message = int(report.get("code", EXIT_FAILED)), str(report.get("message", ""))
        if code == EXIT_INTERRUPTED:
            return Interrupted(
                f"Rank {rank} of the {nproc}-process job was interrupted; the job stopped. "
                "Finished artefacts and the last training checkpoint are kept."
            )
        if code != EXIT_FAILED:  # the input's fault: the message says what to fix
            error = SurgeryEdgeError(
                f"{message} (Rank {rank} of the {nproc}-process job stopped on this; the other "
                "processes were stopped with it, and nothing was written.)"
            )
            error.exit_code = code
            return error
    from surgery_edge.distributed import DistributedError  # deferred: imports torch

    how = _how(first, report)
    others = [f"rank {r} {_how(f, reports.get(r))}" for r, f in ordered[1:]]
    return DistributedError(
        f"The {nproc}-process job stopped: rank {rank} (pid {first.pid}) {how}"
        + (f"; then {', '.join(others)}" if others else "")
        + ". Nothing partial was written: the representation cache, merged models and adapters "
        "hold only complete files, and the last training checkpoint is intact, so the same "
        "command (with --resume for train) continues from there."
    )


def _order(failure, report: dict | None) -> int:
    """0: killed by a signal; 1: its own error; 2: lost contact; 3: stopped by the launcher."""
    code = failure.exitcode
    if code is not None and code < 0:
        return 3 if failure.signal_name() == "SIGTERM" else 0
    if report is not None and report.get("kind") == "DistributedError":
        return 2
    return 1


def _how(failure, report: dict | None) -> str:
    if failure.exitcode is not None and failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    if report is not None and report.get("kind") == "DistributedError":
        return "lost contact with it"
    if report is not None:
        return f"stopped: {report.get('message', '')}"
    return f"exited with code {failure.exitcode} (its own message above says why)"

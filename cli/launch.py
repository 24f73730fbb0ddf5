"""``--nproc N``: run a command as N processes of one torchrun job on this machine.

The command is started again, N times, as ``python -m surgery_edge.cli <command> <options>``
(its options as given, ``--nproc`` left out) by torch's elastic launcher, exactly as
``torchrun --standalone --nproc-per-node N -m surgery_edge.cli ...`` starts it; each process
finds its rank in the environment (:mod:`surgery_edge.distributed`). When a process fails, the
launcher stops the others and the command reports which rank stopped and how, in one paragraph.
Across machines, start the command with ``torchrun`` itself (README: "Distributed training").
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

import typer

from surgery_edge.errors import ConfigError

LOST_CONTACT = 1  # the exit code of a rank that stopped because another one did


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


def relaunch(ctx: typer.Context, nproc: int) -> None:
    """Run this command as ``nproc`` processes of one job on this machine; returns when all have
    finished. DistributedError naming the rank that stopped first (and how) otherwise."""
    from torch.distributed.elastic.multiprocessing.errors import (  # deferred: imports torch
        ChildFailedError,
    )
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch  # deferred: torch

    from surgery_edge.distributed import DistributedError  # deferred: imports torch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the summary below says it once
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N processes share the cores
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port on this machine (torchrun --standalone)
        max_restarts=0,
        monitor_interval=0.1,
    )
    args = ["-m", "surgery_edge.cli", *command_line(ctx)]
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as e:
        raise DistributedError(_summary(e.failures, nproc)) from None


def _summary(failures: dict, nproc: int) -> str:
    """Which rank stopped the job and how, and what the others did. The cause is told apart
    from its consequences: a rank killed by a signal, or exiting with its own error, comes
    before one that exited with code 1 (it lost contact with the others) or that the launcher
    stopped with SIGTERM."""
    ordered = sorted(
        failures.items(), key=lambda item: (_rank(item[1]), item[1].timestamp, item[0])
    )
    rank, first = ordered[0]
    how = _how(first)
    others = [f"rank {r} {_how(f)}" for r, f in ordered[1:]]
    return (
        f"The {nproc}-process job stopped: rank {rank} (pid {first.pid}) {how}"
        + (f"; then {', '.join(others)}" if others else "")
        + ". Each process's own message above says what it was doing. Nothing partial was "
        "written: the representation cache, merged models and adapters hold only complete "
        "files, and the last training checkpoint is intact, so the same command (with --resume "
        "for train) continues from there."
    )


def _rank(failure) -> int:
    code = failure.exitcode
    if code is not None and code < 0:
        return 3 if failure.signal_name() == "SIGTERM" else 0
    return 2 if code == LOST_CONTACT else 1


def _how(failure) -> str:
    if failure.exitcode is not None and failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    return f"exited with code {failure.exitcode}"

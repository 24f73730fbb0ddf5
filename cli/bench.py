"""``surgery-edge bench``: the engines against eight experts (:mod:`surgery_edge.bench.engine`).

``python benchmarks/bench_engine.py`` runs this same command (:func:`script`): one set of
options. Lists are repeated options, as in every command (``--batch 1 --batch 8``). The 0.1
spellings (``--batches 1 8``, ``--archs``, ``--configs``, ``--modes``, ``--paths``,
``--memory-paths``, ``--memory-configs``, ``--merge``, ``--tasks``) still work for one release,
rewritten with a note on stderr.
"""

from __future__ import annotations

import enum
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from surgery_edge.cli.common import Device, Json, say, user_errors
from surgery_edge.cli.launch import command_line
from typer.core import TyperCommand

from surgery_edge.bench.choices import (
    CONFIGS,
    DTYPE_NAMES,
    MEMORY_PATHS,
    MODES,
    PATHS,
    default_help,
)
from surgery_edge.errors import ConfigError
from surgery_edge.progress import silence_cuda_home_notice

ConfigName = enum.Enum("ConfigName", {c: c for c in CONFIGS}, type=str)
BenchMode = enum.Enum("BenchMode", {m: m for m in MODES}, type=str)
PathName = enum.Enum("PathName", {p: p for p in PATHS}, type=str)
MemoryPath = enum.Enum("MemoryPath", {p: p for p in MEMORY_PATHS}, type=str)
DtypeName = enum.Enum("DtypeName", {d: d for d in sorted(DTYPE_NAMES)}, type=str)

# the 0.1 spellings: a list option and its values -> the option repeated; renamed options
OLD_LISTS = {
    "--archs": "--arch",
    "--batches": "--batch",
    "--configs": "--config",
    "--modes": "--mode",
    "--paths": "--path",
    "--memory-paths": "--memory-path",
    "--memory-configs": "--memory-config",
}
OLD_NAMES = {"--merge": "--append", "--tasks": "--num-tasks"}


def new_spellings(args: list[str]) -> list[str]:
    """``args`` with the 0.1 spellings rewritten (``--batches 1 8`` -> ``--batch 1 --batch
    8``; ``--memory-paths`` with no value -> ``--no-memory``), a note on stderr for each."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg, i = args[i], i + 1
        if arg == "--":
            return out + args[i - 1 :]
        name, eq, inline = arg.partition("=")
        if name in OLD_NAMES:
            out.append(OLD_NAMES[name] + eq + inline)
            _note(name, OLD_NAMES[name])
            continue
        if name not in OLD_LISTS:
            out.append(arg)
            continue
        values = [inline] if eq else []
        while not eq and i < len(args) and not args[i].startswith("-"):
            values, i = [*values, args[i]], i + 1
        new = OLD_LISTS[name]
        if values:
            added = [word for v in values for word in (new, v)]
        else:  # --memory-paths alone meant none; otherwise click says the value is missing
            added = ["--no-memory" if name == "--memory-paths" else new]
        out += added
        _note(" ".join([name, *values]), " ".join(added))
    return out


def _note(old: str, new: str) -> None:
    typer.echo(f"note: {old} is now {new}; the old spelling goes in the next release.", err=True)


class BenchCommand(TyperCommand):
    """The bench command, reading the 0.1 spellings of its options too."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, new_spellings(list(args)))


def _values(items: list[Any] | None) -> tuple[Any, ...] | None:
    """A repeated option's values (enum members as their names), or None when not given."""
    return tuple(getattr(v, "value", v) for v in items) if items else None


def _recorded(ctx: typer.Context) -> str:
    """The command as it was given, in its current spelling, for the record."""
    names, parent = [], ctx.parent
    while parent is not None:
        names.insert(0, parent.info_name or "")
        parent = parent.parent
    words = command_line(ctx, drop=())
    return " ".join([*names, words[0], shlex.join(words[1:])]).strip()


@user_errors
def bench(
    ctx: typer.Context,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Smoke run: micro-vit-16, batches 1 and 4, eager and ONNX Runtime, 3 short "
            "rounds, no memory processes, JSON and Markdown but no plots (the README says how "
            "long it takes); the options given still apply.",
        ),
    ] = False,
    device: Device = None,
    arch: Annotated[
        list[str] | None,
        typer.Option(
            help="Architecture (repeatable): a tiny config or an open_clip ViT name. "
            + default_help("archs")
        ),
    ] = None,
    batch: Annotated[
        list[int] | None,
        typer.Option(min=1, help="Images per call (repeatable). " + default_help("batches")),
    ] = None,
    config: Annotated[
        list[ConfigName] | None,
        typer.Option(help="Configuration (repeatable). Default: all."),
    ] = None,
    mode: Annotated[
        list[BenchMode] | None, typer.Option(help="Mode (repeatable). Default: both.")
    ] = None,
    path: Annotated[
        list[PathName] | None,
        typer.Option(help="Path (repeatable). " + default_help("paths")),
    ] = None,
    dtype: Annotated[
        DtypeName | None, typer.Option(help="Default: fp16 on CUDA, fp32 on the CPU.")
    ] = None,
    num_tasks: Annotated[int, typer.Option(min=1, help="Tasks per engine.")] = 8,
    rank: Annotated[int, typer.Option(min=1, help="Adapter rank.")] = 16,
    rank_v2: Annotated[
        int | None,
        typer.Option(min=1, help="SurgeryV2 rank. Default: 4 for ViT-L (the paper), else --rank."),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(
            min=1, help="Interleaved rounds per group (ABCABC...). " + default_help("rounds")
        ),
    ] = None,
    block_seconds: Annotated[
        float | None,
        typer.Option(help="Length of one timed block of calls. " + default_help("block_seconds")),
    ] = None,
    budget_s: Annotated[
        float | None,
        typer.Option(
            help="Stop starting new groups after this many seconds (the rest is "
            "recorded as skipped). Default: no limit."
        ),
    ] = None,
    memory_path: Annotated[
        list[MemoryPath] | None,
        typer.Option(
            help="Path whose peak memory is measured, one process per configuration "
            "(repeatable). " + default_help("memory_paths")
        ),
    ] = None,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="Measure no peak memory.")] = False,
    memory_config: Annotated[
        list[ConfigName] | None,
        typer.Option(
            help="Configuration whose peak memory is measured (repeatable). "
            "Default: every --config."
        ),
    ] = None,
    memory_jobs: Annotated[int, typer.Option(min=1, help="Memory processes at once.")] = 1,
    time_interpreter: Annotated[
        bool,
        typer.Option(
            "--time-interpreter",
            help="Run the fused path under TRITON_INTERPRET=1 on the CPU (checks the "
            "benchmark; the timings mean nothing).",
        ),
    ] = False,
    compile_backend: Annotated[
        str,
        typer.Option(
            help="torch.compile's backend (eager: dynamo tracing only, to check the "
            "compile path quickly)."
        ),
    ] = "inductor",
    peak_tflops: Annotated[
        float | None,
        typer.Option(
            help="Dense fp16 peak of the GPU, for the % of peak column. Default: the datasheet's "
            "for the GPU's name (989 for an H100 SXM or H200), measured for a GPU not listed."
        ),
    ] = None,
    overhead_batch: Annotated[
        int, typer.Option(min=1, help="Batch of the routed-overhead comparison.")
    ] = 64,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Torch CPU threads. Default: torch's.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the JSON, Markdown and plots.")] = Path(
        "benchmarks/results/engine"
    ),
    append: Annotated[
        bool,
        typer.Option(
            "--append",
            help="Keep the rows of an earlier engine-<arch>.json in --out that this run "
            "does not measure (split a sweep over several commands).",
        ),
    ] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Write no plots.")] = False,
    json_out: Json = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Print tracebacks of failed paths.")
    ] = False,
):
    """Benchmark the engines against eight experts on the same paths: latency, throughput, ratios
    beside their ceilings, peak memory. Writes engine-<arch>.json, .md and plots under --out.

    Example: surgery-edge bench --quick --out /tmp/bench (a smoke run); surgery-edge bench
    --arch ViT-B-32 --batch 1 --batch 8 --batch 64 --out benchmarks/results/h200
    """
    from surgery_edge.bench.engine import run_and_write  # deferred: imports torch
    from surgery_edge.bench.engine_config import resolve_config  # deferred: imports torch

    if no_memory and memory_path:
        raise ConfigError("--no-memory and --memory-path exclude each other: give one.")
    settings = resolve_config(
        quick,
        device=device,
        archs=_values(arch),
        batches=_values(batch),
        configs=_values(config),
        modes=_values(mode),
        paths=_values(path),
        dtype=getattr(dtype, "value", None),
        num_tasks=num_tasks,
        rank=rank,
        rank_v2=rank_v2,
        rounds=rounds,
        block_seconds=block_seconds,
        budget_s=budget_s,
        memory_paths=() if no_memory else _values(memory_path),
        memory_configs=_values(memory_config),
        memory_jobs=memory_jobs,
        time_interpreter=time_interpreter,
        compile_backend=compile_backend,
        peak_tflops=peak_tflops,
        overhead_batch=overhead_batch,
        threads=threads,
    )
    written = run_and_write(
        settings,
        out,
        _recorded(ctx),
        append=append,
        plots=not (no_plots or quick),
        quiet=json_out,
        verbose=verbose,
    )
    if json_out:
        records = [json.loads(p.read_text()) for p in written if p.suffix == ".json"]
        typer.echo(json.dumps({"written": [str(p) for p in written], "records": records}, indent=2))
    else:
        say("written: " + ", ".join(str(p) for p in written))


def script(argv: list[str] | None = None) -> None:
    """``python benchmarks/bench_engine.py``: this command on its own, the same options."""
    silence_cuda_home_notice()  # as the surgery-edge command does
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(cls=BenchCommand, context_settings={"help_option_names": ["-h", "--help"]})(bench)
    app(args=argv, prog_name=f"python {sys.argv[0]}")

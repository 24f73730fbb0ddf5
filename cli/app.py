"""The ``surgery-edge`` command line: every command, registered in one place.

The commands are thin (parse, validate, call one library function, print where the results
went) and live by theme: :mod:`~surgery_edge.cli.pipeline` (experts, merge, train, eval, demo,
run), :mod:`~surgery_edge.cli.engine` (export, predict), :mod:`~surgery_edge.cli.evaluate`
(eval-engine), :mod:`~surgery_edge.cli.imports` (import ...). Torch and the library are
imported inside the commands, so ``surgery-edge --help`` stays fast and never imports Triton
or initialises CUDA.
"""

from __future__ import annotations

import sys

import typer
from surgery_edge.cli import engine, evaluate, imports, pipeline
from surgery_edge.cli.common import user_errors

app = typer.Typer(
    name="surgery-edge",
    help="Merge fine-tuned ViT experts, repair them with Representation Surgery, ship one engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command()(pipeline.experts)
app.command(cls=pipeline.MERGE_HELP)(pipeline.merge)
app.command()(pipeline.train)
app.command("eval")(pipeline.evaluate)
app.command()(pipeline.demo)
app.command("run")(pipeline.run_recipe)
app.command()(engine.export)
app.command()(engine.predict)
app.command("eval-engine")(evaluate.eval_engine)

import_app = typer.Typer(
    help="Convert checkpoints from other tools into surgery-edge's format.", no_args_is_help=True
)
import_app.command("task-vectors")(imports.import_task_vectors)
import_app.command("open-clip")(imports.import_open_clip)
import_app.command("hf")(imports.import_hf)
app.add_typer(import_app, name="import")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,  # -h/--help go to the benchmark's parser, which knows its options
)
@user_errors
def bench(ctx: typer.Context):
    """Benchmark the engine against eight separate experts (`bench --help` lists the options).

    Example: surgery-edge bench --quick --out /tmp/bench (a smoke run, ~30 s on a CPU);
    surgery-edge bench --archs ViT-B-32 --batches 1 8 32 --out benchmarks/results/h100
    """
    from surgery_edge.bench.engine import main as run_bench  # deferred: imports torch

    run_bench(list(ctx.args), prog="surgery-edge bench")


def main() -> None:
    app(prog_name="surgery-edge")


if __name__ == "__main__":
    sys.exit(main())

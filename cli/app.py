"""The ``surgery-edge`` command line: every command, registered in one place.

The commands are thin (parse, validate, call one library function, print where the results
went) and live by theme: :mod:`~surgery_edge.cli.pipeline` (experts, merge, train, eval, demo,
run), :mod:`~surgery_edge.cli.engine` (export, predict), :mod:`~surgery_edge.cli.evaluate`
(eval-engine), :mod:`~surgery_edge.cli.serve` (serve, triton-repo), :mod:`~surgery_edge.cli.info`
(info, env, --version), :mod:`~surgery_edge.cli.imports` (import ...). Torch and the library are
imported inside the commands, so ``surgery-edge --help`` stays fast and never imports Triton or
initialises CUDA.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from surgery_edge.cli import bench, engine, evaluate, imports, info, pipeline, serve

from surgery_edge.progress import silence_cuda_home_notice

EXIT_CODES = (
    "Exit codes: 0 done; 1 a partial result (e.g. some images could not be read: the others "
    "were answered); 2 a usage or input error (the message names the file or value to fix); "
    "3 a worker, a server or a dependency failed (not the input: run again, or install what "
    "the message names); 130 interrupted."
)
CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="surgery-edge",
    help="Merge fine-tuned ViT experts, repair them with Representation Surgery, ship one engine.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
)


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=info.version_callback,
            is_eager=True,
            help="Print surgery-edge's version and exit.",
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="No progress bars or progress lines; the same as SURGERY_EDGE_QUIET=1. Results "
            "always go to stdout, progress and messages to stderr.",
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also show the dependencies' notices that are kept quiet."
        ),
    ] = False,
) -> None:
    if quiet and verbose:
        raise typer.BadParameter("-q/--quiet and -v/--verbose exclude each other.")
    if quiet:
        os.environ["SURGERY_EDGE_QUIET"] = "1"  # inherited by the processes a command starts
    silence_cuda_home_notice(not verbose)


app.command()(pipeline.experts)
app.command(cls=pipeline.MERGE_HELP)(pipeline.merge)
app.command()(pipeline.train)
app.command("eval")(pipeline.evaluate)
app.command()(pipeline.demo)
app.command("run")(pipeline.run_recipe)
app.command()(engine.export)
app.command()(engine.predict)
app.command("eval-engine")(evaluate.eval_engine)
app.command()(serve.serve)
app.command("serve-stats")(serve.serve_stats)
app.command("triton-repo")(serve.triton_repo)
app.command()(info.info)
app.command()(info.env)

import_app = typer.Typer(
    help="Convert checkpoints from other tools into surgery-edge's format.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
import_app.command("task-vectors")(imports.import_task_vectors)
import_app.command("open-clip")(imports.import_open_clip)
import_app.command("hf")(imports.import_hf)
app.add_typer(import_app, name="import")


app.command(cls=bench.BenchCommand)(bench.bench)


def main() -> None:
    app(prog_name="surgery-edge")


if __name__ == "__main__":
    sys.exit(main())

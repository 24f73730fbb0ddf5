"""The ``surgery-edge`` command line: thin commands over :mod:`surgery_edge.pipeline`.

Imports of torch and the library happen inside the commands, so ``surgery-edge --help`` stays
fast and never imports Triton or initialises CUDA.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="surgery-edge",
    help="Merge fine-tuned ViT experts, repair them with Representation Surgery, ship one engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RunDir = Annotated[Path, typer.Option("--run", help="Run directory (made by `experts`/`demo`).")]
Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N.")]


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def user_errors(fn):
    """Turn SurgeryEdgeError into a one-paragraph message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from surgery_edge.errors import SurgeryEdgeError

        try:
            return fn(*args, **kwargs)
        except SurgeryEdgeError as e:
            _err(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted; finished artefacts are kept, unfinished ones were not written.")
            raise typer.Exit(130) from None

    return wrapper


def _config(config: Path | None, device: str | None):
    from surgery_edge.config import RunConfig, load_config

    cfg = load_config(config) if config else RunConfig()
    return cfg.model_copy(update={"device": device}) if device else cfg


@app.command()
@user_errors
def experts(
    out: Annotated[Path, typer.Option(help="Run directory to create or continue.")] = Path(
        "runs/demo"
    ),
    config: Annotated[Path | None, typer.Option(help="YAML run config.")] = None,
    device: Device = None,
):
    """Generate the suite, pretrain the backbone and fine-tune one expert per task."""
    from surgery_edge.pipeline import Run, prepare_experts, prepare_suite

    run = Run.create(out, _config(config, device))
    prepare_suite(run)
    es = prepare_experts(run)
    typer.echo(f"pretrained: {es.pretrained}\nexperts:    {es.pretrained.parent / 'experts'}")


@app.command()
@user_errors
def merge(
    run_dir: RunDir,
    method: Annotated[list[str], typer.Option(help="Merge method (repeatable).")],
    lam: Annotated[
        float | None, typer.Option(help="Scaling for task arithmetic / Ties.")
    ] = None,
    k: Annotated[
        float | None, typer.Option(help="Ties: fraction of each task vector kept.")
    ] = None,
    device: Device = None,
):
    """Merge the run's experts with one or more methods into RUN/merged/<method>.safetensors."""
    from surgery_edge.pipeline import Run, run_merges

    run = Run.open(run_dir, device=device)
    run.require_experts()
    overrides = {key: v for key, v in (("lam", lam), ("k", k)) if v is not None}
    for name, path in run_merges(run, method, overrides).items():
        typer.echo(f"{name}: {path}")


@app.command()
@user_errors
def train(
    run_dir: RunDir,
    merge_name: Annotated[str, typer.Option("--merge", help="Merged model to repair.")] = (
        "task_arithmetic"
    ),
    method: Annotated[str, typer.Option(help="surgery | surgeryv2.")] = "surgeryv2",
    rank: int = 16,
    steps: Annotated[int, typer.Option(help="Steps; each draws one batch of every task.")] = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_every: int = 100,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    transductive: Annotated[
        bool, typer.Option(help="Train on the unlabelled test images (the paper's protocol).")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Adapter file to write.")] = None,
    device: Device = None,
):
    """Train surgery adapters (unsupervised) on a merged model of the run."""
    from surgery_edge.errors import ConfigError
    from surgery_edge.pipeline import Run, train_one
    from surgery_edge.surgery.trainer import SurgeryConfig

    if method not in ("surgery", "surgeryv2"):
        raise ConfigError(f"Unknown surgery method {method!r}; use surgery or surgeryv2.")
    for name, value in (("--rank", rank), ("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}.")
    run = Run.open(run_dir, device=device)
    run.require_experts()
    run.find_merges()
    cfg = SurgeryConfig(
        method=method,
        rank=rank,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    path = train_one(run, merge_name, cfg, out, transductive=transductive, resume=resume)
    typer.echo(f"adapters: {path}")


@app.command("eval")
@user_errors
def evaluate(
    run_dir: RunDir,
    device: Device = None,
):
    """Evaluate everything in the run (experts, merges, surgeries) into report.json/.md."""
    from surgery_edge.evaluation.report import write_report
    from surgery_edge.pipeline import Run, evaluate, report_dict

    run = Run.open(run_dir, device=device)
    run.require_experts()
    run.find_merges()
    run.find_adapters()
    paths = write_report(run.out, report_dict(run, evaluate(run)))
    typer.echo(f"report: {paths['md']}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    config: Annotated[
        Path | None, typer.Option(help="YAML run config (default: the demo's).")
    ] = None,
    device: Device = "auto",
):
    """The whole pipeline on the built-in suite: experts, merges, surgery, evaluation."""
    from surgery_edge.pipeline import run_demo

    report = run_demo(out, _config(config, device))
    typer.echo(f"report: {report}")


def main() -> None:
    app(prog_name="surgery-edge")


if __name__ == "__main__":
    sys.exit(main())

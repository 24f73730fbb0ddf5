"""The pipeline's commands: experts, merge, train, eval, demo, run (each over a run directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from surgery_edge.cli import launch
from surgery_edge.cli.common import (
    Device,
    Json,
    NewRunDir,
    NProc,
    OldRunDir,
    Overwrite,
    RunDir,
    Schedule,
    SurgeryName,
    complete_merge_method,
    lazy_epilog,
    merge_method,
    merge_methods_help,
    note,
    parse_values,
    renamed,
    run_folder,
    say,
    user_errors,
)

RUN_DEFAULT = "(default: the run's config)"


def _config(config: Path | None, device: str | None, run_dir: Path | None = None):
    """The run config of ``--config``, else the one ``run_dir`` recorded (a run continued or
    remade with its own settings), else the demo's; ``--device`` overrides the file's only
    when it is given."""
    from surgery_edge.run.config import RunConfig, load_config  # deferred: imports torch
    from surgery_edge.run.layout import RunLayout

    if config:
        cfg = load_config(config)
    elif run_dir is not None and RunLayout(run_dir).config_file.is_file():
        cfg = RunLayout(run_dir).read_config()
    else:
        cfg = RunConfig()
    return cfg.model_copy(update={"device": device}) if device is not None else cfg


@user_errors
def experts(
    run_dir: NewRunDir = None,
    config: Annotated[Path | None, typer.Option(help="YAML run config.")] = None,
    device: Device = None,
    overwrite: Overwrite = False,
    out: OldRunDir = None,
):
    """Generate the suite, pretrain the backbone and fine-tune one expert per task."""
    from surgery_edge.run.state import (  # deferred: imports torch
        Run,
        prepare_experts,
        prepare_suite,
        unused_run_removed,
    )

    run_dir = run_folder(run_dir, out, Path("runs/demo"))
    with unused_run_removed(run_dir):
        run = Run.create(run_dir, _config(config, device, run_dir), log=note, overwrite=overwrite)
        prepare_suite(run)
        es = prepare_experts(run)
    say(f"pretrained: {es.pretrained}")
    say(f"experts:    {es.pretrained.parent / 'experts'}")


MERGE_HELP = lazy_epilog(merge_methods_help)


@user_errors
def merge(
    ctx: typer.Context,
    run_dir: RunDir,
    method: Annotated[
        list[str],
        typer.Option(
            metavar="METHOD",
            parser=merge_method,
            autocompletion=complete_merge_method,
            help="Merge method (repeatable); the methods are listed below.",
        ),
    ],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="KEY=VALUE for every chosen method that takes KEY, e.g. --param lam=0.5 "
            "(repeatable; the methods' parameters are listed below).",
        ),
    ] = None,
    lam: Annotated[float | None, typer.Option(hidden=True)] = None,  # before --param: lam=
    k: Annotated[float | None, typer.Option(hidden=True)] = None,  # before --param: k=
    device: Device = None,
    overwrite: Overwrite = False,
    nproc: NProc = None,
):
    """Merge the run's experts with one or more methods into RUN/merged/<method>.safetensors.

    A merge made with other parameters is replaced only with --overwrite (the adapters trained
    on it are then refused until re-trained). AdaMerging learns on several processes with
    --nproc N, or under torchrun.
    """
    with launch.worker():  # one rank of a job: dies with its launcher, reports errors once
        overrides = parse_values(param, "--param", "lam=0.5")
        for name, value in (("lam", lam), ("k", k)):
            if value is not None:
                overrides.setdefault(name, value)
        from surgery_edge.distributed import joined  # deferred: imports torch
        from surgery_edge.run.merge import check_merges, run_merges  # deferred: torch
        from surgery_edge.run.state import Run  # deferred: torch

        run = Run.open(run_dir, log=note, device=device, write=True, overwrite=overwrite)
        if launch.check_nproc(nproc) > 1:
            check_merges(run, method, overrides, processes=nproc)  # before any process starts
            return launch.relaunch(ctx, nproc)
        with joined(run.device) as world:
            run.join(world)
            run.require_experts()
            merged = run_merges(run, method, overrides)
        if run.writer:
            for name, path in merged.items():
                say(f"{name}: {path}")


@user_errors
def train(
    ctx: typer.Context,
    run_dir: RunDir,
    merge_name: Annotated[str, typer.Option("--merge", help="Merged model to repair.")] = (
        "task_arithmetic"
    ),
    surgery: Annotated[
        SurgeryName, typer.Option("--surgery", help="Surgery method.")
    ] = SurgeryName.surgeryv2,
    method: Annotated[SurgeryName | None, typer.Option("--method", hidden=True)] = None,
    rank: Annotated[int | None, typer.Option(help=f"Adapter rank {RUN_DEFAULT}.")] = None,
    steps: Annotated[
        int | None, typer.Option(help=f"Batches of each task to train on {RUN_DEFAULT}.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=f"Images per task in a batch {RUN_DEFAULT}.")
    ] = None,
    lr: Annotated[float | None, typer.Option(help=f"Adam's learning rate {RUN_DEFAULT}.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seeds the adapters and batches (default: the run's).")
    ] = None,
    checkpoint_every: int = 100,
    schedule: Annotated[
        Schedule | None,
        typer.Option(
            help="joint: one Adam step per batch of every task; reference: the authors' loop "
            f"(per task two batches, a step each, torch 1.10's zero_grad) {RUN_DEFAULT}."
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    transductive: Annotated[
        bool | None,
        typer.Option(
            help=f"Train on the unlabelled test images (the paper's protocol) {RUN_DEFAULT}."
        ),
    ] = None,
    adapters: Annotated[
        Path | None,
        typer.Option("--adapters", help="Adapter file to write (default: in the run)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", hidden=True)] = None,
    device: Device = None,
    overwrite: Overwrite = False,
    nproc: NProc = None,
):
    """Train surgery adapters (unsupervised) on a merged model of the run.

    Every setting not given is the run's (its config's surgery settings for the method), so
    re-running the run's own training reuses its adapters. Adapters trained with other settings
    or on another merge are replaced only with --overwrite; --adapters FILE writes them
    elsewhere. --nproc N (or torchrun) splits the expert targets and every step's batch
    (--batch-size per task, the global batch) over N processes.
    """
    with launch.worker():  # one rank of a job: dies with its launcher, reports errors once
        from surgery_edge.distributed import check_gpus, check_rows, joined  # deferred: torch
        from surgery_edge.run.layout import RunLayout  # deferred with the pipeline
        from surgery_edge.run.state import Run  # deferred: imports torch
        from surgery_edge.run.surgery import (  # deferred: imports torch
            check_training,
            surgery_settings,
            train_one,
        )

        method = SurgeryName(renamed("--method", "--surgery", method, surgery)).value
        out = renamed("--out", "--adapters", out, adapters)
        recorded = RunLayout.open(run_dir).read_config()  # the run's settings are the defaults
        cfg = surgery_settings(  # every number checked (ConfigError) before any process starts
            recorded,
            method,
            rank=rank,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            checkpoint_every=checkpoint_every,
            schedule=None if schedule is None else Schedule(schedule).value,
        )
        if transductive is None:
            transductive = recorded.surgery.transductive
        processes = launch.check_nproc(nproc)
        check_rows(cfg.batch_size, processes, "The batch size per task (--batch-size)")
        run = Run.open(run_dir, log=note, device=device, write=out is None, overwrite=overwrite)
        run.find_merges()
        if processes > 1:  # everything that can be checked before the processes start
            check_gpus(run.device, processes)
            check_training(run, merge_name, cfg, out, transductive)
            return launch.relaunch(ctx, processes)
        with joined(run.device) as world:
            run.join(world)
            run.require_experts()
            path = train_one(run, merge_name, cfg, out, transductive=transductive, resume=resume)
        if run.writer:
            say(f"adapters: {path}")


@user_errors
def evaluate(
    run_dir: RunDir,
    device: Device = None,
    json_out: Json = False,
):
    """Evaluate everything in the run (experts, merges, surgeries) into report.json/.md.

    The exported engines' table is kept when the run's engines are up to date (made from its
    current merge, adapters and experts); --json prints report.json's content.
    """
    from surgery_edge.evaluation.report import write_report  # deferred: matplotlib
    from surgery_edge.run.engines import cached_engines  # deferred: torch
    from surgery_edge.run.evaluate import evaluate, report_dict  # deferred: torch
    from surgery_edge.run.state import Run  # deferred: torch

    run = Run.open(run_dir, log=note, device=device, write=True)
    run.require_experts()
    run.find_merges()
    run.find_adapters()
    report = report_dict(run, evaluate(run))
    engines = cached_engines(run)
    report["engines"] = engines or {"skipped": "no up-to-date exported engines in the run"}
    paths = write_report(run.out, report)
    if json_out:
        typer.echo(paths["json"].read_text())
    else:
        say(f"report: {paths['md']}")


@user_errors
def demo(
    run_dir: NewRunDir = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML run config (default: the demo's).")
    ] = None,
    device: Device = None,
    overwrite: Overwrite = False,
    out: OldRunDir = None,
):
    """The whole pipeline on the built-in suite: experts, merges, surgery, evaluation."""
    from surgery_edge.run.pipeline import run_pipeline  # deferred: imports torch

    run_dir = run_folder(run_dir, out, Path("runs/demo"))
    report = run_pipeline(run_dir, _config(config, device), log=note, overwrite=overwrite)
    say(f"report: {report}")


@user_errors
def run_recipe(
    config: Annotated[
        Path,
        typer.Argument(
            help="A YAML run config, or a shipped recipe's name: paper_vit_b32, paper_vit_l14."
        ),
    ],
    run_dir: NewRunDir = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Overrides data.root (where the task folders are).")
    ] = None,
    checkpoint_root: Annotated[
        Path | None, typer.Option(help="Overrides checkpoints.root.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a setting: --set surgery.params.surgeryv2.steps=200 (repeatable).",
        ),
    ] = None,
    device: Device = None,
    overwrite: Overwrite = False,
    out: OldRunDir = None,
):
    """Run a config end to end: data, experts, merges, surgery, evaluation, engines, report."""
    from surgery_edge.run.config import find_config, load_config  # deferred: imports torch
    from surgery_edge.run.pipeline import run_pipeline  # deferred with the config

    overrides = parse_values(set_, "--set", "surgery.params.surgeryv2.steps=200")
    if data_root is not None:
        overrides["data.root"] = str(data_root)
    if checkpoint_root is not None:
        overrides["checkpoints.root"] = str(checkpoint_root)
    if device is not None:
        overrides["device"] = device
    run_dir = run_folder(run_dir, out, Path("runs") / config.stem)
    cfg = load_config(find_config(config), overrides)
    report = run_pipeline(run_dir, cfg, log=note, overwrite=overwrite)
    say(f"report: {report}")

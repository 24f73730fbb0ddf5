"""The ``surgery-edge`` command line: thin commands over :mod:`surgery_edge.run`.

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
    from rich.markup import escape

    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
    )


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
    from surgery_edge.run.config import RunConfig, load_config

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
    from surgery_edge.run.pipeline import Run, prepare_experts, prepare_suite

    run = Run.create(out, _config(config, device))
    prepare_suite(run)
    es = prepare_experts(run)
    typer.echo(f"pretrained: {es.pretrained}\nexperts:    {es.pretrained.parent / 'experts'}")


@app.command()
@user_errors
def merge(
    run_dir: RunDir,
    method: Annotated[list[str], typer.Option(help="Merge method (repeatable).")],
    lam: Annotated[float | None, typer.Option(help="Scaling for task arithmetic / Ties.")] = None,
    k: Annotated[
        float | None, typer.Option(help="Ties: fraction of each task vector kept.")
    ] = None,
    device: Device = None,
):
    """Merge the run's experts with one or more methods into RUN/merged/<method>.safetensors."""
    from surgery_edge.run.pipeline import Run, run_merges

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
    from surgery_edge.run.pipeline import Run, train_one
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
    from surgery_edge.run.pipeline import Run, evaluate, report_dict

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
    from surgery_edge.run.pipeline import run_pipeline

    report = run_pipeline(out, _config(config, device))
    typer.echo(f"report: {report}")


@app.command("run")
@user_errors
def run_recipe(
    config: Annotated[
        Path, typer.Argument(help="YAML run config, e.g. configs/paper_vit_b32.yaml.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default: runs/<config file name>).")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Overrides data.root (where the task folders are).")
    ] = None,
    checkpoint_root: Annotated[
        Path | None, typer.Option(help="Overrides checkpoints.root.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: --set surgery.steps_v2=200 (repeatable)."),
    ] = None,
    device: Device = None,
):
    """Run a config end to end: data, experts, merges, surgery, evaluation, engines, report."""
    import yaml

    from surgery_edge.errors import ConfigError
    from surgery_edge.run.config import load_config
    from surgery_edge.run.pipeline import run_pipeline

    overrides = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. surgery.steps_v2=200.")
        overrides[key] = yaml.safe_load(value)
    if data_root is not None:
        overrides["data.root"] = str(data_root)
    if checkpoint_root is not None:
        overrides["checkpoints.root"] = str(checkpoint_root)
    if device is not None:
        overrides["device"] = device
    cfg = load_config(config, overrides)
    report = run_pipeline(out or Path("runs") / config.stem, cfg)
    typer.echo(f"report: {report}")


@app.command()
@user_errors
def export(
    run_dir: RunDir,
    merge_name: Annotated[str, typer.Option("--merge", help="Merged model to export.")] = (
        "task_arithmetic"
    ),
    surgery: Annotated[str, typer.Option(help="none | surgery | surgeryv2.")] = "surgeryv2",
    mode: Annotated[
        str, typer.Option(help="routed (images + task ids) | all-tasks (every task per image).")
    ] = "routed",
    onnx: Annotated[
        Path | None,
        typer.Option(help="ONNX file (default: RUN/engines/<merge>-<surgery>-<mode>.onnx)."),
    ] = None,
    fp16: Annotated[bool, typer.Option(help="Half weights and compute; float32 I/O.")] = False,
    aoti: Annotated[Path | None, typer.Option(help="AOTInductor package (.pt2).")] = None,
    trt: Annotated[
        Path | None, typer.Option(help="TensorRT engine, built from the exported ONNX.")
    ] = None,
    min_batch: Annotated[int, typer.Option(help="TensorRT profile: smallest batch.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: tuned batch.")] = 8,
    max_batch: Annotated[int, typer.Option(help="TensorRT profile: largest batch.")] = 32,
    workspace_gb: Annotated[float, typer.Option(help="TensorRT workspace pool (GiB).")] = 4.0,
    timing_cache: Annotated[
        Path | None, typer.Option(help="TensorRT timing cache file (read and updated).")
    ] = None,
    device: Device = None,
):
    """Export one multi-task engine (ONNX, AOTInductor .pt2, TensorRT) from a run."""
    from surgery_edge.run.export import TrtOptions, export_run

    written = export_run(
        run_dir,
        merge_name,
        surgery,
        mode,
        onnx=onnx,
        fp16=fp16,
        aoti=aoti,
        trt=trt,
        trt_options=TrtOptions(min_batch, opt_batch, max_batch, workspace_gb, timing_cache),
        device=device,
    )
    for kind, path in written.items():
        typer.echo(f"{kind}: {path}")


@app.command()
@user_errors
def predict(
    engine: Annotated[Path, typer.Argument(help="Engine: .onnx, .pt2 or TensorRT .engine.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    task: Annotated[str | None, typer.Option(help="Task name or id to answer.")] = None,
    all_tasks: Annotated[bool, typer.Option("--all-tasks", help="Answer every task.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
):
    """Classify images with an exported engine; unreadable images are reported (exit code 2)."""
    import json

    from surgery_edge.errors import ExportError
    from surgery_edge.runtime import load

    results = load(engine, device=device).predict(images, task=task, all_tasks=all_tasks)
    if json_out:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            for p in r.predictions:
                typer.echo(f"{r.source}\t{p.task}\t{p.label}\t(class {p.index}, p={p.score:.3f})")
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise ExportError(
            f"Could not answer {len(failed)} of {len(results)} images: {' '.join(failed)}"
        )


import_app = typer.Typer(
    help="Convert checkpoints from other tools into surgery-edge's format.", no_args_is_help=True
)
app.add_typer(import_app, name="import")


@import_app.command("task-vectors")
@user_errors
def import_task_vectors(
    root: Annotated[Path, typer.Argument(help="Folder holding <model>/zeroshot.pt etc.")],
    model: Annotated[str, typer.Option(help="open_clip config name, e.g. ViT-B-32.")],
    out: Annotated[Path, typer.Option(help="Folder for the converted checkpoints.")],
    trust_pickle: Annotated[
        bool,
        typer.Option(
            help="Allow unpickling (restricted to the known classes). Only for trusted files."
        ),
    ] = False,
    task: Annotated[list[str] | None, typer.Option(help="Import only these tasks.")] = None,
    overwrite: bool = False,
):
    """Convert the task_vectors / AdaMerging layout (pickled ImageEncoder / heads)."""
    from surgery_edge.models.convert import import_task_vectors as run_import

    summary = run_import(
        root, model, out, trust_pickle, tasks=task, overwrite=overwrite, log=typer.echo
    )
    for note in summary.to_dict().get("notes", []):
        typer.echo(f"note: {note}")
    typer.echo(f"checkpoints: {out}")


def _pairs(values: list[str] | None, option: str) -> dict[str, Path]:
    from surgery_edge.errors import ConfigError

    pairs = {}
    for item in values or []:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise ConfigError(f"{option} {item!r}: expected TASK=PATH, e.g. {option} MNIST=a.pt.")
        pairs[task] = Path(path)
    return pairs


def _import_weights(
    fmt: str, model, pretrained, expert, out, clip_weights, classes, trust_pickle, overwrite
):
    from surgery_edge.data.disk import load_class_names
    from surgery_edge.errors import ConfigError
    from surgery_edge.io import write_json_atomic
    from surgery_edge.models import get_arch
    from surgery_edge.models.convert import check_out_dir, import_weights

    experts = _pairs(expert, "--expert")
    if not experts:
        raise ConfigError("Give at least one --expert TASK=PATH.")
    class_files = _pairs(classes, "--classes")
    missing = sorted(set(experts) - set(class_files))
    if missing:
        raise ConfigError(
            f"No --classes for tasks {missing}: these experts carry no heads, so each task's "
            "zero-shot head is built from its class names (--classes TASK=names.json, a JSON list)."
        )
    names = {}
    for task, path in class_files.items():
        loaded = load_class_names(path)
        if not isinstance(loaded, list):
            raise ConfigError(f"{path} must hold a JSON list of class names, in label order.")
        names[task] = loaded
    check_out_dir(out, overwrite)
    arch = import_weights(
        fmt,
        get_arch(model),
        pretrained,
        experts,
        out,
        trust_pickle=trust_pickle,
        clip_weights=clip_weights,
        class_names={t: names[t] for t in experts},
        log=typer.echo,
    )
    write_json_atomic(
        out / "import.json",
        {
            "format": fmt,
            "pretrained": str(pretrained),
            "experts": {t: str(p) for t, p in experts.items()},
            "heads": f"zero-shot from {clip_weights}",
            "arch": arch.to_dict(),
        },
    )
    typer.echo(f"checkpoints: {out} ({arch.name})")


Experts = Annotated[
    list[str], typer.Option("--expert", help="TASK=PATH of one fine-tuned expert (repeatable).")
]
ClipWeights = Annotated[
    Path,
    typer.Option(help="open_clip CLIP weights with the text tower, for the zero-shot heads."),
]
Classes = Annotated[
    list[str] | None,
    typer.Option("--classes", help="TASK=names.json: the task's class names (repeatable)."),
]


@import_app.command("open-clip")
@user_errors
def import_open_clip(
    model: Annotated[
        str, typer.Option(help="open_clip config, e.g. ViT-B-32-quickgelu for OpenAI weights.")
    ],
    pretrained: Annotated[Path, typer.Option(help="Pretrained open_clip state dict.")],
    expert: Experts,
    out: Annotated[Path, typer.Option(help="Folder for the converted checkpoints.")],
    clip_weights: ClipWeights,
    classes: Classes = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
):
    """Convert open_clip state dicts (.pt / .safetensors) and build zero-shot heads."""
    _import_weights(
        "open_clip", model, pretrained, expert, out, clip_weights, classes, trust_pickle, overwrite
    )


@import_app.command("hf")
@user_errors
def import_hf(
    model: Annotated[str, typer.Option(help="open_clip config name the towers must fit.")],
    pretrained: Annotated[Path, typer.Option(help="Pretrained HF CLIP(Vision) folder or file.")],
    expert: Experts,
    out: Annotated[Path, typer.Option(help="Folder for the converted checkpoints.")],
    clip_weights: ClipWeights,
    classes: Classes = None,
    overwrite: bool = False,
):
    """Convert Hugging Face CLIP vision experts (e.g. FusionBench's) and build zero-shot heads."""
    _import_weights("hf", model, pretrained, expert, out, clip_weights, classes, False, overwrite)


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
    from surgery_edge.bench.engine import main as run_bench

    run_bench(list(ctx.args), prog="surgery-edge bench")


def main() -> None:
    app(prog_name="surgery-edge")


if __name__ == "__main__":
    sys.exit(main())

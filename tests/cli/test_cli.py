"""The command line: help, a tiny end-to-end run, caching, and bad input (exit 2, no traceback)."""

import json
import shutil
import subprocess
import sys

import pytest
from cli_checks import user_error
from surgery_edge.cli.app import app
from surgery_edge.cli.common import MERGE_METHOD_NAMES
from typer.testing import CliRunner

runner = CliRunner()
COMMANDS = [
    "experts",
    "merge",
    "train",
    "eval",
    "demo",
    "run",
    "add-task",
    "drop-task",
    "export",
    "predict",
    "eval-engine",
    "import task-vectors",
    "import open-clip",
    "import hf",
]
MERGES = [
    "weight_averaging",
    "task_arithmetic",
    "ties_merging",
    "adamerging_taskwise",
    "adamerging_layerwise",
]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command):
    result = runner.invoke(app, [*command.split(), "--help"] if command else ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_help_is_lean():
    code = (
        "import sys; from typer.testing import CliRunner; from surgery_edge.cli.app import app;"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0;"
        "bad = [m for m in ('triton', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_report_shape(tiny_run):
    out, report_md = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert report["suite"] == "builtin-8" and report["arch"] == "micro-vit-16"
    assert report["tasks"] == ["digits", "shapes", "colours"]
    rows = {(r["method"], r["surgery"]): r for r in report["results"]}
    assert ("individual", "none") in rows and ("pretrained", "none") in rows
    for m in MERGES:
        for s in ("none", "surgery", "surgeryv2"):
            row = rows[(m, s)]
            assert set(row["per_task"]) == set(report["tasks"])
            assert row["avg"] == pytest.approx(sum(row["per_task"].values()) / 3)
    bias = report["representation_bias"]["task_arithmetic"]
    assert set(bias) == {"none", "surgery", "surgeryv2"}
    assert list(bias["none"]) == ["block.0", "block.1", "final"]
    assert {"suite", "experts", "evaluation", "total"} <= set(report["timings_s"])
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "bias.png").exists()
    assert "| task_arithmetic w/ SurgeryV2 |" in report_md.read_text()


def test_second_run_reuses_everything(tiny_run, tiny_config_path):
    out, _ = tiny_run
    watched = [
        out / "checkpoints/experts/digits.safetensors",
        out / "merged/adamerging_layerwise.safetensors",
        out / "adapters/ties_merging/surgeryv2.safetensors",
    ]
    before = [p.stat().st_mtime_ns for p in watched]
    result = runner.invoke(app, ["demo", "--out", str(out), "--config", str(tiny_config_path)])
    assert result.exit_code == 0, result.output
    assert "--out is now --run" in result.stderr  # 0.1's spelling of the run folder, for now
    assert [p.stat().st_mtime_ns for p in watched] == before
    timings = json.loads((out / "report.json").read_text())["timings_s"]
    assert not any(k.startswith(("merge:", "surgery:surgery")) for k in timings)


def test_merge_train_eval_commands(tiny_run, tmp_path):
    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    from surgery_edge.models.checkpoint import read_metadata

    merged = run / "merged/task_arithmetic.safetensors"
    before = merged.read_bytes()
    # Another lambda would replace the merge the adapters were trained on: refused, unchanged.
    text = user_error(["merge", "--run", str(run), "--method", "task_arithmetic", "--lam", "0.5"])
    assert "params.lam: 0.3 -> 0.5" in text and "--overwrite" in text
    assert merged.read_bytes() == before
    args = ["merge", "--run", str(run), "--method", "task_arithmetic"]
    r = runner.invoke(app, [*args, "--param", "lam=0.5", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert "no longer fits" in r.output  # the adapters trained on lambda 0.3 are now stale
    assert read_metadata(merged)["recipe"]["lam"] == 0.5
    # --lam: the hidden old spelling; the same merge. Messages go to stderr, results to stdout.
    r = runner.invoke(app, [*args, "--lam", "0.5"], env={"SURGERY_EDGE_QUIET": "0"})
    assert r.exit_code == 0 and "reusing merge task_arithmetic" in r.stderr, r.output
    assert r.stdout == f"task_arithmetic: {merged}\n"
    r = runner.invoke(app, ["-q", *args, "--lam", "0.5"])
    assert r.exit_code == 0 and "reusing" in r.stderr and "reusing" not in r.stdout
    # Eval refuses the stale pair, naming both files and the command that fixes it.
    text = user_error(["eval", "--run", str(run)])
    assert "adapters/task_arithmetic/surgery" in text and "merged/task_arithmetic" in text
    assert "surgery-edge train --run" in text and "--merge task_arithmetic" in text
    adapters = tmp_path / "v1.safetensors"
    train = ["train", "--run", str(run), "--steps", "3", "--rank", "2"]
    r = runner.invoke(app, [*train, "--method", "surgery", "--out", str(adapters)])  # old names
    assert r.exit_code == 0, r.output
    assert adapters.exists()
    assert "--method is now --surgery" in r.stderr and "--out is now --adapters" in r.stderr
    for method in ("surgery", "surgeryv2"):
        r = runner.invoke(app, [*train, "--surgery", method, "--overwrite"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", "--run", str(run)])
    assert r.exit_code == 0, r.output
    assert (run / "report.md").exists()


def test_help_lists_the_registries():
    """Choices and parameters in help come from the registries, not from the CLI's code."""
    from surgery_edge import merging

    def help_of(command: str) -> str:  # wide, so that no choice list is wrapped
        return runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"}).output

    assert MERGE_METHOD_NAMES == tuple(merging.available())  # --method's torch-free list
    text = help_of("merge")
    for name in merging.available():
        assert merging.get(name).describe().split(":")[0] in text
    assert "k=0.2" in text and "lam=0.3" in text and "steps=500" in text
    assert "surgery|surgeryv2" in help_of("train") and "(default: the run's config)" in help_of(
        "train"
    )
    export_help = help_of("export")
    assert "routed|all-tasks" in export_help and "none|surgery|" in export_help


def test_unknown_method_and_task(tiny_run, tmp_path):
    out, _ = tiny_run
    msg = user_error(["merge", "--run", str(out), "--method", "nope"])
    assert "nope" in msg and "task_arithmetic" in msg
    msg = user_error(["merge", "--run", str(out), "--method", "ties_merging", "--param", "lamda=1"])
    assert "lamda" in msg and "k=0.2" in msg  # says which parameters the method takes
    msg = user_error(["merge", "--run", str(out), "--method", "ties_merging", "--param", "k=7"])
    assert "'k'" in msg and "(0, 1]" in msg
    msg = user_error(["train", "--run", str(out), "--surgery", "surgeryv3"])
    assert "surgeryv3" in msg
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("suite: {tasks: [digits, sudoku]}\n")
    msg = user_error(["experts", "--run", str(tmp_path / "x"), "--config", str(cfg)])
    assert "sudoku" in msg and "digits" in msg
    msg = user_error(["train", "--run", str(out), "--merge", "nope"])
    assert "nope" in msg
    msg = user_error(["eval", "--run", str(tmp_path / "empty")])
    assert "not a surgery-edge run directory" in msg


def _copy_without_merges(out, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("merged", "adapters"))
    return run


def test_missing_checkpoint(tiny_run, tmp_path):
    run = _copy_without_merges(tiny_run[0], tmp_path)
    (run / "checkpoints/experts/shapes.safetensors").unlink()
    msg = user_error(["merge", "--run", str(run), "--method", "task_arithmetic"])
    assert "shapes.safetensors" in msg and "does not exist" in msg
    assert not (run / "merged").exists() or not any((run / "merged").iterdir())


def test_corrupt_checkpoint_leaves_no_partial_output(tiny_run, tmp_path):
    run = _copy_without_merges(tiny_run[0], tmp_path)
    path = run / "checkpoints/experts/digits.safetensors"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    msg = user_error(["merge", "--run", str(run), "--method", "ties_merging"])
    assert "digits.safetensors" in msg and "corrupt" in msg
    assert not list(run.rglob("*.tmp")) and not (run / "merged/ties_merging.safetensors").exists()


def test_expert_of_another_architecture(tiny_run, tmp_path):
    from surgery_edge.models import build_encoder, get_arch, save_encoder

    run = _copy_without_merges(tiny_run[0], tmp_path)
    other = get_arch("tiny-vit-32")
    save_encoder(
        run / "checkpoints/experts/colours.safetensors",
        other,
        build_encoder(other).state_dict(),
        task="colours",
    )
    msg = user_error(["merge", "--run", str(run), "--method", "weight_averaging"])
    assert "colours.safetensors" in msg and "tiny-vit-32" in msg and "micro-vit-16" in msg


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "surgery_edge.cli.app", "eval", "--run", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not a surgery-edge run directory" in proc.stderr


def test_bench_command_runs_the_engine_benchmark(tmp_path):
    r = runner.invoke(
        app,
        [
            "bench",
            "--device",
            "cpu",
            "--archs",
            "micro-vit-16",
            "--batches",
            "1",
            "--paths",
            "eager",
            "--configs",
            "experts",
            "merged",
            "--rounds",
            "2",
            "--block-seconds",
            "0.001",
            "--memory-paths",
            "--no-plots",
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    assert list(tmp_path.glob("*.json"))


def test_import_task_vectors_refuses_pickles_without_trust(tmp_path):
    root = tmp_path / "tv" / "ViT-B-32"
    root.mkdir(parents=True)
    for rel in ("zeroshot.pt", "MNIST/finetuned.pt", "head_MNIST.pt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"a pickle would be here")
    msg = user_error(
        [
            "import",
            "task-vectors",
            str(tmp_path / "tv"),
            "--model",
            "ViT-B-32",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert "--trust-pickle" in msg
    assert not (tmp_path / "out").exists()


def _readme_lines(command: str, run) -> list[list[str]]:
    """The README pipeline block's `surgery-edge COMMAND` lines, on ``run`` for runs/x."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("Each step is a command that works on a run directory:")[1]
    block = block.split("```bash\n")[1].split("```")[0]
    lines = [line.split("#")[0] for line in block.splitlines()]
    return [
        shlex.split(line.replace("runs/x", str(run)))[1:]
        for line in lines
        if line.startswith(f"surgery-edge {command} ")
    ]


def test_readme_merge_and_train_use_the_runs_settings(tiny_run, tmp_path):
    """The README's merge and train lines, as written, re-use what the run made (its config is
    every option's default); a value given that differs is refused, or obeyed with --overwrite."""
    from surgery_edge.progress import read_metrics

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run, ignore=shutil.ignore_patterns("engines"))
    env = {"SURGERY_EDGE_QUIET": "0"}
    (train,) = _readme_lines("train", run)
    for args in [*_readme_lines("merge", run), train]:
        r = runner.invoke(app, args, env=env)
        assert r.exit_code == 0, r.output
        assert "reusing" in r.stderr and "reusing" not in r.stdout, r.output
    text = user_error([*train, "--lr", "0.5"])
    assert "settings.lr: 0.003 -> 0.5" in text and "--overwrite" in text
    adapters = run / "adapters/task_arithmetic/surgeryv2.safetensors"
    r = runner.invoke(app, [*train, "--steps", "2", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"adapters: {adapters}\n"
    rows = read_metrics(run / "logs/train-task_arithmetic-surgeryv2.jsonl")
    assert rows[-3]["event"] == "start" and rows[-3]["settings"]["steps"] == 2
    assert rows[-3]["settings"]["lr"] == 0.003  # the run's, not a CLI default
    assert [r["step"] for r in rows[-2:]] == [0, 1]


def test_every_training_stage_leaves_its_metrics_log(tiny_run):
    from surgery_edge.progress import read_metrics

    logs = tiny_run[0] / "logs"
    steps = {"pretrain": 1, "expert-digits": 2, "merge-adamerging_taskwise": 3}
    steps |= {f"train-{m}-surgeryv2": 3 for m in MERGES} | {f"train-{m}-surgery": 6 for m in MERGES}
    for stage, n in steps.items():
        start, *rows = read_metrics(logs / f"{stage}.jsonl")
        assert start["event"] == "start", stage
        assert [r["step"] for r in rows] == list(range(n)), stage
        assert all(r["loss"] > 0 and r["lr"] > 0 and r["elapsed_s"] >= 0 for r in rows), stage
    (row, *_) = read_metrics(logs / "merge-adamerging_layerwise.jsonl")[1:]
    assert list(row["loss_per_task"]) == ["digits", "shapes", "colours"]
    assert sum(row["loss_per_task"].values()) == pytest.approx(row["loss"], rel=1e-5)


def test_a_run_that_fails_on_its_data_leaves_no_folder(tmp_path):
    run = tmp_path / "b32"
    args = ["run", "paper_vit_b32", "--data-root", str(tmp_path / "none"), "--run", str(run)]
    msg = user_error([*args, "--checkpoint-root", str(tmp_path)])
    assert "does not exist" in msg and not run.exists()  # not even its config.json

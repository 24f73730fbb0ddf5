"""A run directory cannot be silently inconsistent, and bad input never ends in a traceback.

Grouped as the reliability issues are (issue 20's numbered cases first, then issue 14's kinds).
Every case runs on a copy of the session's tiny run, with small files the test writes; each bad
input must give exit code 2 with one message and no traceback (``cli_checks.user_error``), and
must leave the run as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_checks import user_error
from safetensors import safe_open
from surgery_edge.cli.app import app
from typer.testing import CliRunner

import surgery_edge.io
from surgery_edge.models.checkpoint import load_tensors, read_metadata, save_tensors

runner = CliRunner()


@pytest.fixture
def copy(tiny_run, tmp_path):
    """A private copy of the tiny demo run (6 MB)."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_run[0], dest)
    return dest


def ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def rewrite(path: Path, change_tensors=None, change_meta=None) -> None:
    """Rewrite a checkpoint with its tensors and/or metadata changed (as a hand edit would)."""
    tensors, meta = load_tensors(path, finite=False)
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_tensors(path, tensors, meta)


# =============================================================================================
# Issue 20: data loss and writes outside the output folder
# =============================================================================================


def test_20_1_the_nan_stop_keeps_the_trained_adapters_and_is_never_reused(copy):
    path = copy / "adapters/task_arithmetic/surgeryv2.safetensors"
    before = path.read_bytes()
    train = ["train", "--run", str(copy), "--merge", "task_arithmetic", "--surgery", "surgeryv2"]
    args = [*train, "--steps", "20", "--lr", "1e30", "--overwrite"]
    for _ in range(2):  # a second try is not "reusing" anything: it fails the same way
        text = user_error(args)
        assert "loss became" in text and "was not written" in text and "Lower the learning" in text
        assert path.read_bytes() == before  # bit for bit
    last = path.with_name("surgeryv2.last-good.safetensors")
    assert read_metadata(last)["complete"] is False
    out = ok(["eval", "--run", str(copy)])  # the run still evaluates, with the trained adapters
    assert "report" in out


def test_20_2_task_names_never_escape_the_output_folder(tmp_path):
    from checkpoint_formats import micro_clip

    root = tmp_path / "root"  # everything this test makes lies under root
    deep = root / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    clip = micro_clip(quick_gelu=False, seed=0)
    torch.save(clip.state_dict(), deep / "clip.pt")
    (deep / "names.json").write_text(json.dumps(["zero", "one"]))
    before = files_under(root)
    text = user_error(
        [
            "import", "open-clip", "--model", "micro-vit-16",
            "--pretrained", str(deep / "clip.pt"),
            "--expert", f"../../../X={deep / 'clip.pt'}",
            "--classes", f"../../../X={deep / 'names.json'}",
            "--clip-weights", str(deep / "clip.pt"),
            "--out", str(deep / "out"),
        ]
    )  # fmt: skip
    assert "'../../../X' cannot be used" in text
    assert files_under(root) == before  # nothing written anywhere, X.safetensors least of all
    # A run config with such a task name is refused before any work, too.
    config = tmp_path / "evil.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "arch": "micro-vit-16",
                "data": {"root": str(deep), "tasks": {"../../../../X": {"path": "."}}},
                "checkpoints": {"root": str(deep), "trust_pickle": True},
            }
        )
    )
    text = user_error(["run", str(config), "--out", str(deep / "run")])
    assert "'../../../../X' cannot be used" in text
    assert files_under(root) == before


def test_20_2_names_that_become_paths_are_checked_everywhere(copy, tmp_path):
    from surgery_edge.errors import ConfigError
    from surgery_edge.models.convert import find_task_vectors_layout
    from surgery_edge.run.layout import RunLayout

    layout = RunLayout(copy)
    for call in (
        lambda: layout.expert("../x"),
        lambda: layout.head("a/b"),
        lambda: layout.merged("../../merged"),
        lambda: layout.adapters("task_arithmetic", "../surgery"),
        lambda: find_task_vectors_layout(tmp_path, "micro-vit-16", tasks=["../x"]),
    ):
        with pytest.raises(ConfigError, match="cannot be used"):
            call()
    text = user_error(["export", "--run", str(copy), "--merge", "../../../x", "--surgery", "none"])
    assert "x" in text
    cfg = tmp_path / "t.yaml"
    cfg.write_text("suite: {tasks: ['../digits']}\n")
    assert "unknown tasks" in user_error(
        ["experts", "--out", str(tmp_path / "e"), "--config", str(cfg)]
    )


def _interrupt_training_after(monkeypatch, steps: int) -> None:
    """Make the next training stop (as by Ctrl-C) after ``steps`` optimiser steps."""
    calls = {"n": 0}
    real = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)


@pytest.mark.parametrize("change", ["re-merged with --lam 0.6", "--transductive"])
def test_20_3_resume_never_continues_from_other_inputs(copy, tmp_path, monkeypatch, change):
    train = ["train", "--run", str(copy), "--merge", "task_arithmetic", "--surgery", "surgeryv2"]
    train += ["--steps", "30", "--checkpoint-every", "7", "--rank", "4", "--overwrite"]
    _interrupt_training_after(monkeypatch, 14)
    assert runner.invoke(app, train).exit_code == 130  # "killed" at step 14
    monkeypatch.undo()
    state = copy / "adapters/task_arithmetic/surgeryv2.safetensors.state.pt"
    assert state.is_file()
    extra = []
    if change == "--transductive":
        extra = ["--transductive"]
    else:
        merge = ["merge", "--run", str(copy), "--method", "task_arithmetic", "--lam", "0.6"]
        ok([*merge, "--overwrite"])
    out = ok([*train, "--resume", *extra])
    assert "not resuming" in out and "from step 0" in out
    fresh = tmp_path / "fresh.safetensors"
    ok([*train[:-1], *extra, "--adapters", str(fresh)])  # a fresh run on the new inputs
    resumed = tensors_of(copy / "adapters/task_arithmetic/surgeryv2.safetensors")
    assert all(torch.equal(t, resumed[k]) for k, t in tensors_of(fresh).items())


def _with_config(tmp_path, tiny_config_path, **changes) -> Path:
    config = yaml.safe_load(tiny_config_path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_20_4_a_changed_setting_is_seen(copy, tmp_path, tiny_config_path):
    seed1 = _with_config(tmp_path, tiny_config_path, suite__seed=1)
    expert = copy / "checkpoints/experts/digits.safetensors"
    before = expert.read_bytes()
    text = user_error(["demo", "--out", str(copy), "--config", str(seed1)])
    assert "suite.seed: 0 -> 1" in text and "--overwrite" in text
    assert expert.read_bytes() == before and json.loads((copy / "config.json").read_text())[
        "suite"
    ]["seed"] == 0  # fmt: skip
    # With --overwrite the suite and the experts are re-made from seed 1 ...
    ok(["experts", "--out", str(copy), "--config", str(seed1), "--overwrite"])
    assert expert.read_bytes() != before
    # ... and a merge of the old experts is no longer taken for up to date.
    text = user_error(["merge", "--run", str(copy), "--method", "task_arithmetic"])
    assert "provenance" not in text and "experts" in text


def test_20_4_deleted_or_changed_engines_are_exported_again(copy, monkeypatch):
    from surgery_edge.run import engines
    from surgery_edge.run.state import Run

    onnx = copy / "engines/surgeryv2-routed.onnx"
    data = onnx.read_bytes()
    exports = []

    def export(run_, folder, aoti=True):  # stands in for the slow export; rewrites the engine
        exports.append(folder)
        onnx.write_bytes(data)
        summary = json.loads((folder / "summary.json").read_text())
        return {k: v for k, v in summary.items() if k not in ("fingerprint", "sha256")}

    monkeypatch.setattr(engines, "export_and_check", export)
    run = Run.open(copy, log=lambda *a: None)
    run.require_experts()
    run.find_merges()
    run.find_adapters()
    engines.export_engines(run)
    assert exports == []  # intact: reused
    onnx.unlink()
    engines.export_engines(run)
    assert len(exports) == 1  # a deleted engine is exported again, not "reused"
    onnx.write_bytes(data[:-10])
    engines.export_engines(run)
    assert len(exports) == 2  # so is a changed one
    engines.export_engines(run)
    assert len(exports) == 2


def test_20_4_a_moved_run_reuses_everything(tiny_run, tmp_path, tiny_config_path):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(tiny_run[0], moved)  # new path, new inodes and modification times
    watched = [
        moved / "checkpoints/experts/digits.safetensors",
        moved / "merged/adamerging_layerwise.safetensors",
        moved / "adapters/ties_merging/surgeryv2.safetensors",
        moved / "engines/surgeryv2-routed.onnx",
    ]
    before = [p.read_bytes() for p in watched]
    out = ok(["demo", "--out", str(moved), "--config", str(tiny_config_path)])
    assert "reusing exported engines" in out
    assert [p.read_bytes() for p in watched] == before
    # The YAML's device is kept: the CLI overrides the file only where --device is given.
    assert json.loads((moved / "config.json").read_text())["device"] == "cpu"
    timings = json.loads((moved / "report.json").read_text())["timings_s"]
    assert not any(k.startswith(("merge:", "surgery:surgery", "export")) for k in timings)


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"merge__methods": ["bogus"]}, "Unknown merge method 'bogus'"),
        ({"surgery__lr": float("nan")}, "surgery.lr"),
        ({"experts__finetune_epochs": -1}, "experts.finetune_epochs"),
        ({"experts__pretrain_lr": 0}, "experts.pretrain_lr"),
        ({"seed": -3}, "seed"),
        ({"device": "gpu0"}, "device"),
        ({"surgery__params__surgeryv2__rank": 10**9}, "rank"),
    ],
)
def test_20_5_the_whole_config_is_checked_before_any_work(
    tmp_path, tiny_config_path, change, pattern
):
    config = _with_config(tmp_path, tiny_config_path, **change)
    out = tmp_path / "never"
    assert pattern in user_error(["demo", "--out", str(out), "--config", str(config)])
    assert not out.exists()


def test_20_5_a_bad_device_is_refused_before_any_work(tmp_path):
    for command in ("demo", "experts"):
        out = tmp_path / command
        assert "not a device" in user_error([command, "--out", str(out), "--device", "bogus"])
        assert not out.exists()


def test_20_6_outputs_are_checked_before_the_work(copy, tmp_path, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes")
    for command in ("experts", "demo"):
        assert "is a file, not a run directory" in user_error([command, "--out", str(a_file)])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("x")
    assert "not a surgery-edge run directory" in user_error(
        ["experts", "--out", str(tmp_path / "docs")]
    )
    train = ["train", "--run", str(copy), "--surgery", "surgery", "--steps", "2"]
    assert "is a folder" in user_error([*train, "--adapters", str(tmp_path)])
    assert "is not an artefact of this kind" in user_error([*train, "--out", str(a_file)])
    export = ["export", "--run", str(copy), "--surgery", "none"]
    assert "is a folder" in user_error([*export, "--onnx", str(tmp_path)])
    assert "is not an artefact of this kind" in user_error([*export, "--onnx", str(a_file)])
    assert a_file.read_text() == "my notes"
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.safetensors"))
    # A folder that may not be written (tests run as root: the permission check is simulated).
    monkeypatch.setattr(surgery_edge.io, "_may_write", lambda folder: False)
    assert "permission denied" in user_error(
        ["merge", "--run", str(copy), "--method", "task_arithmetic"]
    )
    monkeypatch.undo()
    # A write that fails with a permission error midway is a user error too.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    text = user_error(["merge", "--run", str(copy), "--method", "ties_merging", "--param", "k=0.5",
                       "--overwrite"])  # fmt: skip
    assert "Permission denied" in text and "unfinished artefacts were not written" in text


# =============================================================================================
# Issue 14: nothing silently wrong, nothing half-read
# =============================================================================================

# --- 1. silent wrong results -------------------------------------------------------------


def test_14_1_short_training_never_replaces_trained_adapters_silently(copy):
    path = copy / "adapters/task_arithmetic/surgeryv2.safetensors"
    before = path.read_bytes()
    text = user_error(["train", "--run", str(copy), "--steps", "20"])
    assert "surgeryv2.safetensors exists but was made with other settings" in text
    assert "steps: 3 -> 20" in text
    assert path.read_bytes() == before


def test_14_1_the_reuse_check_compares_the_split_training_learns_from(run):
    """``train --no-transductive`` on a transductive run trains on the adaptation split: its
    check before any work compares that split (it took the config's, and refused the run's
    own adapters)."""
    from types import SimpleNamespace

    from surgery_edge.errors import ConfigError
    from surgery_edge.run.surgery import check_training, surgery_config

    run.find_merges()
    surgery = run.config.surgery.model_copy(update={"transductive": True})
    transductive_run = SimpleNamespace(
        merged=run.merged,
        out=run.out,
        layout=run.layout,
        overwrite=False,
        log=lambda *a: None,
        config=run.config.model_copy(update={"surgery": surgery}),
    )
    cfg = surgery_config(run, "surgeryv2")  # the tiny run's adapters: the adaptation split
    path = run.layout.adapters("task_arithmetic", "surgeryv2")
    assert check_training(transductive_run, "task_arithmetic", cfg, transductive=False) == path
    with pytest.raises(ConfigError, match="made with other settings"):
        check_training(transductive_run, "task_arithmetic", cfg, transductive=True)


def test_14_1_export_replaces_an_engine_made_otherwise_only_with_overwrite(engines, tmp_path):
    """An engine at the output path made from other checkpoints or in another mode is refused
    (the file kept); the same engine, or any with ``overwrite``, goes ahead."""
    import shutil

    from surgery_edge.engine_format import EngineMode, Precision, read_onnx_metadata
    from surgery_edge.errors import ConfigError
    from surgery_edge.run.export import EngineChoice, EngineFiles, _Plan, _refuse_other_engines

    path = tmp_path / "e.onnx"
    shutil.copy(engines["dir"] / "surgeryv2-routed.onnx", path)
    extra = {"source": read_onnx_metadata(path).get("source")}
    choice = EngineChoice(surgery="surgeryv2")
    target = ((path, "ONNX engine", None),)

    def plan(mode: EngineMode) -> _Plan:
        return _Plan(mode, Precision.FP32, None, None, path, EngineFiles(onnx=path), target)

    _refuse_other_engines(plan(EngineMode.ROUTED), choice, extra, overwrite=False)
    before = path.read_bytes()
    for other, source in ((EngineMode.ALL_TASKS, extra), (EngineMode.ROUTED, {"source": "x"})):
        with pytest.raises(ConfigError, match="exists and was exported from other checkpoints"):
            _refuse_other_engines(plan(other), choice, source, overwrite=False)
        _refuse_other_engines(plan(other), choice, source, overwrite=True)
    assert path.read_bytes() == before


@pytest.mark.parametrize("swap", ["another task, other class count", "another task, same count"])
def test_14_1_a_head_of_another_task_is_refused(copy, swap):
    from surgery_edge.models import get_arch, load_head, save_head

    heads = copy / "checkpoints/heads"
    if swap.endswith("other class count"):
        shutil.copy(heads / "digits.safetensors", heads / "shapes.safetensors")
        wrong = "digits"
    else:
        head = load_head(heads / "shapes.safetensors")
        names = [f"other_{i}" for i in range(len(head.class_names))]
        save_head(heads / "shapes.safetensors", get_arch("micro-vit-16"), "kites", names, head.head)
        wrong = "kites"
    export = ["export", "--run", str(copy), "--surgery", "none", "--onnx", str(copy / "x.onnx")]
    for args in (export, ["eval", "--run", str(copy)]):
        text = user_error(args)
        assert f"saved for task '{wrong}', not 'shapes'" in text
    assert not (copy / "x.onnx").exists()


def test_14_1_adapters_holding_nan_are_refused_at_export_and_load(copy):
    path = copy / "adapters/task_arithmetic/surgeryv2.safetensors"

    def poison(tensors):
        tensors["digits/final/up"][0, 0] = float("nan")

    rewrite(path, change_tensors=poison)
    onnx = copy / "nan.onnx"
    text = user_error(["export", "--run", str(copy), "--onnx", str(onnx)])
    assert "digits/final/up" in text and "non-finite" in text
    assert not onnx.exists()
    assert "non-finite" in user_error(["eval", "--run", str(copy)])


def test_14_1_v1_adapters_where_v2_belong_are_refused(copy):
    adapters = copy / "adapters/task_arithmetic"
    shutil.copy(adapters / "surgery.safetensors", adapters / "surgeryv2.safetensors")
    text = user_error(["export", "--run", str(copy), "--onnx", str(copy / "x.onnx")])
    assert "'surgery' adapters, not 'surgeryv2' ones" in text


@pytest.mark.parametrize(
    "damage", ["truncated", "zero bytes", "random bytes", "NaN values", "no record"]
)
def test_14_1_a_damaged_representation_cache_is_rebuilt_never_trusted(run, tmp_path, damage):
    from surgery_edge.run.state import Run
    from surgery_edge.run.surgery import expert_representations

    copy = tmp_path / "run"
    shutil.copytree(run.out, copy)
    said = []
    r = Run.open(copy, log=said.append)
    r.require_experts()
    good = expert_representations(r, "shapes", "adapt")
    final = np.array(good.final)
    path = Path(good.final.filename)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "zero bytes":  # numpy's EOFError ended `train` in a bare "Aborted."
        path.write_bytes(b"")
    elif damage == "random bytes":
        data = path.read_bytes()
        header = len(data) - final.nbytes
        rng = np.random.default_rng(0)
        path.write_bytes(data[:header] + rng.integers(0, 256, final.nbytes, np.uint8).tobytes())
    elif damage == "NaN values":
        bad = np.array(final)
        bad[3] = np.nan
        np.save(path, bad)
    else:
        path.with_suffix("").with_suffix(".json").unlink()
    said.clear()
    again = expert_representations(r, "shapes", "adapt")
    assert any("rebuilt" in line for line in said), said
    assert np.array_equal(np.array(again.final), final) and again.digest == good.digest


def test_14_1_predict_validates_the_device_and_escapes_names(engines, tmp_path):
    import onnx
    from PIL import Image

    from surgery_edge.export.onnx import write_engine

    source = engines["dir"] / "surgeryv2-routed.onnx"
    model = onnx.load(str(source))
    prop = next(p for p in model.metadata_props if p.key == "surgery_edge")
    meta = json.loads(prop.value)
    meta["class_names"] = [[f"\x1b[2J\x1b]0;pwned\x07class{i}" for i in range(len(c))]
                           for c in meta["class_names"]]  # fmt: skip
    prop.value = json.dumps(meta)
    hostile = tmp_path / "hostile.onnx"
    write_engine(model, hostile)  # sealed: the digest is a checksum, anyone can recompute it
    image = tmp_path / "x.png"
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(image)
    assert "not a device" in user_error(["predict", str(hostile), str(image), "--device", "bogus"])
    out = ok(["predict", str(hostile), str(image), "--task", "digits"])
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[2J" in out
    from surgery_edge.errors import ExportError
    from surgery_edge.runtime import load

    with pytest.raises(ExportError, match="Unknown device 'bogus'"):
        load(hostile, device="bogus")


def test_14_1_an_engine_with_nan_weights_is_refused_at_load(engines, tmp_path):
    import onnx
    from onnx import numpy_helper

    from surgery_edge.errors import ExportError
    from surgery_edge.export.onnx import write_engine
    from surgery_edge.runtime import load

    model = onnx.load(str(engines["dir"] / "surgeryv2-routed.onnx"))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    array = numpy_helper.to_array(init).copy()
    array.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    path = tmp_path / "nan.onnx"
    write_engine(model, path)  # sealed, so that the check behind the digest is the one seen
    with pytest.raises(ExportError, match="non-finite logits"):
        load(path)


# --- 2. tracebacks instead of a clear error ----------------------------------------------


@pytest.mark.parametrize("damage", ["zero bytes", "truncated", "garbage", "edited array"])
def test_14_2_a_damaged_suite_file_is_an_error_or_regenerated(run, tmp_path, damage):
    from surgery_edge.data.suite import load_suite
    from surgery_edge.errors import DataError
    from surgery_edge.run.state import Run, prepare_suite

    copy = tmp_path / "run"
    shutil.copytree(run.out, copy)
    suite = copy / "suite.npz"
    original = load_suite(suite)
    data = suite.read_bytes()
    if damage == "zero bytes":
        suite.write_bytes(b"")
    elif damage == "truncated":
        suite.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        suite.write_bytes(os.urandom(4096))
    else:
        with np.load(suite) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["shapes/test_y"] = (arrays["shapes/test_y"] + 1) % 6  # relabelled by hand
        np.savez(suite, **arrays)
    with pytest.raises(DataError, match="suite.npz is unreadable or damaged"):
        load_suite(suite)
    said = []
    r = Run.open(copy, log=said.append)
    regenerated = prepare_suite(r)  # a cache of the seed: regenerated, with a warning
    assert any("Regenerating" in line for line in said)
    assert np.array_equal(regenerated.task("shapes").test_y, original.task("shapes").test_y)


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b'{"arch": 7}', b"\xff\xfe"])
def test_14_2_a_damaged_config_json_is_a_clear_error(copy, content):
    (copy / "config.json").write_bytes(content)
    assert "config.json is unreadable or invalid" in user_error(["eval", "--run", str(copy)])


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda m: m.pop("arch"), "arch: Field required"),
        (lambda m: m.pop("tasks"), "tasks: Field required"),
        (lambda m: m.update(rank="four"), "rank: Input should be a valid integer"),
        (lambda m: m.update(rank=4.5), "rank: Input should be a valid integer"),
        (lambda m: m.update(tasks="digits"), "tasks: Input should be a valid list"),
        (lambda m: m["arch"].update(width="32"), "arch.width: Input should be a valid integer"),
        (lambda m: m["arch"].update(layers=10**9), "arch.layers: Input should be less than"),
        (lambda m: m.update(sites=["final"]), "record sites"),
    ],
)
def test_14_2_malformed_adapter_metadata_names_the_field(copy, change, pattern):
    from surgery_edge.errors import AdapterError
    from surgery_edge.surgery.adapters import AdapterBank

    path = copy / "adapters/task_arithmetic/surgeryv2.safetensors"
    rewrite(path, change_meta=change)
    with pytest.raises(AdapterError, match=re.escape(str(path))) as e:
        AdapterBank.load(path)
    assert re.search(pattern, str(e.value))
    assert pattern.split(":")[0] in user_error(["eval", "--run", str(copy)])


@pytest.mark.parametrize(
    "option",
    [
        ["--lr", "nan"],
        ["--lr", "-0.001"],
        ["--lr", "inf"],
        ["--rank", "100000000"],
        ["--rank", "0"],
        ["--batch-size", "1000000000000"],
        ["--seed", "1" + "0" * 30],
        ["--steps", "-1"],
        ["--checkpoint-every", "-5"],
    ],
)
def test_14_2_cli_numbers_out_of_range_are_refused_before_any_work(copy, option):
    before = files_under(copy)
    text = user_error(["train", "--run", str(copy), "--out", str(copy / "x.safetensors"), *option])
    assert "Surgery setting" in text
    assert files_under(copy) == before


@pytest.mark.parametrize(
    "args, pattern",
    [
        (
            ["merge", "--method", "task_arithmetic", "--param", "lam=.nan"],
            "must be a finite number",
        ),
        (["merge", "--method", "ties_merging", "--param", "k=2.5"], r"must be in \(0, 1\]"),
        (["merge", "--method", "adamerging_taskwise", "--param", "steps=-1"], "must be in"),
        (
            ["export", "--trt", "e.plan", "--workspace-gb", "inf"],
            "--workspace-gb must be a positive",
        ),
        (["export", "--trt", "e.plan", "--max-batch", "0"], "--max-batch must be at least 1"),
    ],
)
def test_14_2_other_numbers_out_of_range_are_refused(copy, args, pattern):
    command, *rest = args
    assert re.search(pattern, user_error([command, "--run", str(copy), *rest]))


# =============================================================================================
# Issue 41: inputs that lie to a run; issue 33: stale trust, distributed stops
# =============================================================================================


def _noise(tensors):  # finite noise, the metadata kept: what a hand edit or a bad copy does
    g = torch.Generator().manual_seed(0)
    for key, t in tensors.items():
        tensors[key] = t + 1e-2 * torch.randn(t.shape, generator=g)


def _rotate(tensors):  # a head whose classes are rotated: its rows shifted by one
    tensors["weight"], tensors["bias"] = tensors["weight"].roll(1, 0), tensors["bias"].roll(1, 0)


AS_MADE = [
    "--merge",
    "task_arithmetic",
    "--surgery",
    "surgeryv2",
    "--rank",
    "4",
    "--steps",
    "3",
    "--batch-size",
    "4",
    "--lr",
    "0.003",
]  # fmt: skip (the tiny run's own settings)
ADAPTERS = "adapters/task_arithmetic/surgeryv2.safetensors"
HEAD, MERGED = "checkpoints/heads/shapes.safetensors", "merged/task_arithmetic.safetensors"
EXPERT = "checkpoints/experts/digits.safetensors"
RETRAIN = "train --run {run} --merge task_arithmetic --surgery surgeryv2 --overwrite"
REMERGE = "merge --run {run} --method task_arithmetic --overwrite"
REMAKE_EXPERTS = "experts --run {run} --overwrite"
EXPORT = ["export", "--surgery", "none", "--onnx", "{run}/x.onnx"]


@pytest.mark.parametrize(
    "file, change, command, remake",
    [  # noisy adapters: train said "reusing", eval gave 81.7 for 88.9, export exported them
        (ADAPTERS, _noise, ["train", *AS_MADE], RETRAIN),
        (ADAPTERS, _noise, ["eval"], RETRAIN),
        (ADAPTERS, _noise, ["export", "--onnx", "{run}/x.onnx"], RETRAIN),
        (HEAD, _rotate, ["eval"], REMAKE_EXPERTS),  # rotated classes: 78.9, and exported
        (HEAD, _rotate, EXPORT, REMAKE_EXPERTS),
        (MERGED, _noise, ["train", *AS_MADE], REMERGE),
        (EXPERT, _noise, ["merge", "--method", "ties_merging"], REMAKE_EXPERTS),  # was 2 hashes
    ],
)
def test_41_3_a_checkpoint_that_changed_since_the_run_made_it_is_refused(
    copy, file, change, command, remake
):
    rewrite(copy / file, change_tensors=change)
    before = files_under(copy)
    name, *rest = (arg.format(run=copy) for arg in command)
    text = " ".join(user_error([name, "--run", str(copy), *rest]).split())  # one paragraph
    assert f"{file} is not the file this run made: its content changed" in text
    assert f"surgery-edge {remake.format(run=copy)}" in text
    assert files_under(copy) - before <= {"cache/hashes.json"}  # nothing made from it


def test_41_3_the_remake_command_for_an_expert_keeps_the_runs_settings(copy):
    """The command a refusal names must work as printed: ``experts --run R`` without --config
    continues with the settings R recorded (it used the demo's, refused as other settings, and
    with --overwrite would have remade the run at the demo's size)."""
    text = ok(["experts", "--run", str(copy)])
    assert "experts:" in text and "other settings" not in text
    assert json.loads((copy / "config.json").read_text())["arch"] == "micro-vit-16"


def _edit_in_place(path: Path) -> None:
    """Change the last float32 of ``path`` in place, keeping its size, inode and mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        value = np.frombuffer(f.read(4), np.float32)[0]
        f.seek(-4, os.SEEK_END)
        f.write(np.float32(value + 0.5).tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_ino == st.st_ino and path.stat().st_size == st.st_size


def test_33_7_what_an_engine_or_adapters_are_made_from_is_hashed_from_its_bytes(copy, tmp_path):
    """A file changed in place with its mtime restored kept its hash in the stat cache: adapters
    trained on the old merge were exported with the new one, a changed cache was trained on."""
    from surgery_edge.io import HashCache

    hashes = HashCache(copy / "cache" / "hashes.json")
    merged = copy / "merged/task_arithmetic.safetensors"
    entry = next((copy / "cache").glob("shapes-adapt-*.final.npy"))
    old = {p: hashes.digest(p) for p in (merged, entry)}  # the run has hashed them before
    for path in old:
        _edit_in_place(path)
    assert {p: HashCache(hashes.store).digest(p) for p in old} == old  # the stat cache trusts
    text = user_error(["export", "--run", str(copy), "--onnx", str(tmp_path / "x.onnx")])
    assert "merged/task_arithmetic.safetensors is not the file this run made" in text
    assert not (tmp_path / "x.onnx").exists()  # refused before the export, not after it
    out = ok(["train", "--run", str(copy), "--merge", "weight_averaging", "--surgery", "surgery",
              "--steps", "2", "--adapters", str(tmp_path / "a.safetensors")])  # fmt: skip
    assert re.search(r"warning: Representation cache .*shapes-adapt-.* changed .*; rebuilt", out)
    assert HashCache(hashes.store).digest(entry) == old[entry]  # rebuilt as it was made


@pytest.mark.parametrize("damage", ["64 flipped bytes", "finitely perturbed"])
def test_41_4_a_resume_state_that_changed_is_not_resumed(copy, tmp_path, monkeypatch, damage):
    """It resumed, then stopped on a NaN loss advising a lower learning rate (flipped bytes),
    or resumed silently (perturbed): every tensor then differed from the uninterrupted run."""
    import zipfile

    out = tmp_path / "a.safetensors"
    train = ["train", "--run", str(copy), "--merge", "task_arithmetic", "--surgery", "surgery"]
    train += ["--rank", "4", "--steps", "8", "--checkpoint-every", "2", "--adapters", str(out)]
    _interrupt_training_after(monkeypatch, 5)
    assert runner.invoke(app, train).exit_code == 130
    monkeypatch.undo()
    state = out.with_name(out.name + ".state.pt")
    if damage == "64 flipped bytes":  # in the largest tensor's bytes: torch.load still reads it
        tensors = [i for i in zipfile.ZipFile(state).infolist() if "/data/" in i.filename]
        info = max(tensors, key=lambda i: i.file_size)
        data = bytearray(state.read_bytes())
        head = info.header_offset  # a zip entry's data follows its 30-byte header, name, extra
        at = head + 30 + int.from_bytes(data[head + 26 : head + 28], "little")
        at += int.from_bytes(data[head + 28 : head + 30], "little")
        data[at : at + 64] = bytes(b ^ 0xFF for b in data[at : at + 64])
        state.write_bytes(data)
    else:
        saved = torch.load(state, weights_only=True)
        saved["bank"] = {k: v + 1e-3 for k, v in saved["bank"].items()}
        torch.save(saved, state)
    torch.load(state, weights_only=True)  # readable: only its digest tells
    said = ok([*train, "--resume"])
    assert "not resuming from" in said and "does not match the digest it was saved with" in said
    assert "from step 0" in said


def test_41_5_messages_name_the_problem_before_any_work(copy, tmp_path, monkeypatch, engines):
    import surgery_edge.run.engine_eval

    def never(*args, **kwargs):
        raise AssertionError("evaluated before the output was checked")

    monkeypatch.setattr(surgery_edge.run.engine_eval, "evaluate_engine", never)
    engine = str(engines["dir"] / "surgeryv2-routed.onnx")
    text = user_error(["eval-engine", engine, "--run", str(copy), "--out", str(tmp_path)])
    assert "is a folder" in text  # was an IsADirectoryError after 18 s of evaluation
    os.mkfifo(tmp_path / "engine.onnx")  # was "does not exist"; never opened (it would block)
    text = user_error(["eval-engine", str(tmp_path / "engine.onnx"), "--run", str(copy)])
    assert "engine.onnx is a FIFO (named pipe), not a file" in text
    text = user_error(["train", "--run", str(copy), "--device", "cuda"])
    assert "[gpu]" not in text and "GPU" in text  # no extra of that name exists
    (copy / "checksums.json").unlink()  # a run made before records: the merge's provenance
    rewrite(copy / "checkpoints/experts/digits.safetensors", change_tensors=_noise)
    text = " ".join(user_error(["merge", "--run", str(copy), "--method", "ties_merging"]).split())
    assert (
        "the expert checkpoints (pretrained, experts or heads) are not those it was made from"
        in text
    )


# --- a task that arrives or leaves after the merge (add-task, drop-task) ----------------------


def _one_merge(root: Path) -> None:
    """Keep only the task_arithmetic merge and its adapters (a third of the training)."""
    for path in (root / "merged").glob("*.safetensors"):
        if path.stem != "task_arithmetic":
            path.unlink()
            shutil.rmtree(root / "adapters" / path.stem)


def _answers(root: Path, method: str, tasks: list[str]) -> dict[str, torch.Tensor]:
    """The logits of ``tasks``' test images through task_arithmetic + ``method``."""
    from surgery_edge.data.suite import load_suite
    from surgery_edge.data.transforms import to_model_input
    from surgery_edge.run.layout import RunLayout

    layout = RunLayout(root)
    model = layout.model(
        layout.merged("task_arithmetic"), layout.adapters("task_arithmetic", method)
    )
    suite = load_suite(layout.suite_file)
    out = {}
    with torch.no_grad():
        for task in tasks:
            x = to_model_input(suite.task(task).test_x, model.encoder.arch, "cpu")
            out[task] = model(x, torch.full((len(x),), model.tasks.index(task)))
    return out


def _quiet_run(root: Path):
    from surgery_edge.run.state import Run

    return Run.open(root, log=lambda *a, **k: None)


def test_39_frozen_drop_and_add_keep_every_other_answer_bit_for_bit(copy, tiny_run):
    from surgery_edge.run.tasks import add_task, drop_task, recorded_history

    _one_merge(copy)
    tasks = ["digits", "shapes", "colours"]
    before = {m: _answers(tiny_run[0], m, tasks) for m in ("surgery", "surgeryv2")}
    merged = (copy / "merged/task_arithmetic.safetensors").read_bytes()
    drop_task(_quiet_run(copy), "colours", "frozen")
    for method, answers in before.items():
        after = _answers(copy, method, ["digits", "shapes"])
        assert all(torch.equal(after[t], answers[t]) for t in after)
    source = tiny_run[0] / "checkpoints"
    change = add_task(
        _quiet_run(copy),
        "colours",
        source / "experts/colours.safetensors",
        source / "heads/colours.safetensors",
        "frozen",
    )
    assert change.tasks_after == tasks and change.steps == {
        "task_arithmetic/surgery": 6,  # the run's own settings
        "task_arithmetic/surgeryv2": 3,
    }
    for method, answers in before.items():
        after = _answers(copy, method, tasks)
        assert torch.equal(after["digits"], answers["digits"])
        assert torch.equal(after["shapes"], answers["shapes"])
        bank = tensors_of(copy / f"adapters/task_arithmetic/{method}.safetensors")
        assert bank["colours/final/up"].abs().sum() > 0  # trained, not the identity
    assert (copy / "merged/task_arithmetic.safetensors").read_bytes() == merged
    history = recorded_history(copy)
    assert [(h["change"], h["strategy"], h["task"]) for h in history] == [
        ("drop", "frozen", "colours"),
        ("add", "frozen", "colours"),
    ]
    assert json.loads((copy / "config.json").read_text())["suite"]["tasks"] == tasks
    ok(["eval", "--run", str(copy)])  # eval and export work on it as on any run
    assert json.loads((copy / "report.json").read_text())["tasks"] == tasks
    from surgery_edge.run.layout import RunLayout

    model, meta = RunLayout(copy).export_model("task_arithmetic", "surgeryv2")
    assert model.tasks == tasks and meta["merge"] == "task_arithmetic"


def test_39_remerge_drop_and_add_make_the_merge_again_and_warm_start(copy, tiny_run):
    from surgery_edge.run.tasks import add_task, drop_task

    _one_merge(copy)
    merged = copy / "merged/task_arithmetic.safetensors"
    original = tensors_of(merged)
    old = tensors_of(copy / "adapters/task_arithmetic/surgeryv2.safetensors")
    change = drop_task(_quiet_run(copy), "colours", "remerge", steps=1)
    assert change.steps == {"task_arithmetic/surgery": 1, "task_arithmetic/surgeryv2": 1}
    now = tensors_of(merged)  # two task vectors, not three
    assert not all(torch.equal(now[k], original[k]) for k in original)
    assert (
        read_metadata(merged)["provenance"]["experts"]
        != read_metadata(tiny_run[0] / "merged/task_arithmetic.safetensors")["provenance"][
            "experts"
        ]
    )
    warm = tensors_of(copy / "adapters/task_arithmetic/surgeryv2.safetensors")
    assert "colours/final/up" not in warm
    # one Adam step (lr 3e-3) from the previous adapters: beside them, and further from the
    # identity (up = 0) than one step from it goes
    assert (warm["digits/final/up"] - old["digits/final/up"]).abs().max() <= 3.1e-3
    assert warm["digits/final/up"].abs().max() > 3.1e-3
    source = tiny_run[0] / "checkpoints"
    add_task(
        _quiet_run(copy),
        "colours",
        source / "experts/colours.safetensors",
        source / "heads/colours.safetensors",
        "remerge",
        steps=1,
    )
    back = tensors_of(merged)  # the same three experts again: the run's own merge
    assert all(torch.equal(back[k], original[k]) for k in original)
    meta = read_metadata(copy / "adapters/task_arithmetic/surgeryv2.safetensors")
    assert meta["tasks"] == ["digits", "shapes", "colours"]
    assert meta["provenance"]["task_change"]["strategy"] == "remerge"
    ok(["eval", "--run", str(copy)])


def _encoder_file(path: Path, arch, state=None, **meta) -> Path:
    from surgery_edge.models import build_encoder, save_encoder

    torch.manual_seed(7)
    return save_encoder(path, arch, state or build_encoder(arch).state_dict(), "textures", **meta)


def test_39_tasks_that_do_not_fit_are_refused_naming_why(run, tmp_path):
    import dataclasses

    from surgery_edge.errors import CheckpointError, ConfigError
    from surgery_edge.models import get_arch, load_encoder
    from surgery_edge.run.task_checks import check_drop, check_new_task
    from surgery_edge.run.tasks import _with_tasks

    ckpt = run.out / "checkpoints"
    expert, head = ckpt / "experts/digits.safetensors", ckpt / "heads/digits.safetensors"

    def refused(error, match, name, expert, head=head):
        with pytest.raises(error, match=match):
            check_new_task(run, name, expert, head)

    refused(ConfigError, "already has a task 'digits'", "digits", expert)
    refused(ConfigError, "no task 'cars'", "cars", expert)
    other = _encoder_file(tmp_path / "arch.safetensors", get_arch("tiny-vit-32"))
    refused(CheckpointError, "saved for architecture 'tiny-vit-32'", "textures", other)
    size = dataclasses.replace(run.arch, image_size=32)
    refused(CheckpointError, "'image_size': \\(32, 16\\)", "textures",
            _encoder_file(tmp_path / "size.safetensors", size))  # fmt: skip
    random_base = _encoder_file(tmp_path / "base.safetensors", run.arch)
    refused(CheckpointError, "looks fine-tuned from another pretrained model", "textures",
            random_base)  # fmt: skip
    pre = load_encoder(ckpt / "pretrained.safetensors").state_dict
    near = {k: v + 1e-4 if v.is_floating_point() else v for k, v in pre.items()}
    hashed = _encoder_file(
        tmp_path / "hash.safetensors", run.arch, near, provenance={"pretrained": "0" * 64}
    )
    refused(CheckpointError, "another pretrained model \\(SHA-256 000000", "textures", hashed)
    refused(CheckpointError, "head of task 'digits'", "textures", expert)
    with pytest.raises(ConfigError, match="has no task 'cars'"):
        check_drop(run, "cars")
    alone = dataclasses.replace(run, config=_with_tasks(run.config, ["digits"]))
    with pytest.raises(ConfigError, match="'digits' is the last task"):
        check_drop(alone, "digits")


def test_39_a_refused_task_change_exits_2_and_writes_nothing(copy, tmp_path):
    def contents() -> dict[str, bytes]:  # (the hash cache remembers the copy's new inodes)
        files = [p for p in sorted(copy.rglob("*")) if p.is_file() and p.name != "hashes.json"]
        return {str(p): p.read_bytes() for p in files}

    before = contents()
    base = _encoder_file(tmp_path / "base.safetensors", _quiet_run(copy).arch)
    head = copy / "checkpoints/heads/digits.safetensors"
    add = ["add-task", "--run", str(copy), "--expert", f"textures={base}", "--head", str(head)]
    text = " ".join(user_error([*add, "--strategy", "frozen"]).split())
    assert "looks fine-tuned from another pretrained model" in text
    assert "has no task 'cars'" in user_error(
        ["drop-task", "--run", str(copy), "cars", "--strategy", "remerge"]
    )
    text = " ".join(user_error([*add, "--strategy", "frozen", "--data", str(tmp_path)]).split())
    assert f"--data {tmp_path}: run {copy} is a run of the built-in suite" in text
    assert contents() == before

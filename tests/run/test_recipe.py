"""``surgery-edge run CONFIG`` over the user's own files, end to end, and its bad inputs.

Everything on disk is written here in the real formats: a task_vectors tree of pickled
``src.modeling`` objects (micro CLIP), Hugging Face CLIP vision folders, a full open_clip CLIP
state dict with its text tower, and per-task image folders with a class-name JSON file. The
tasks are named MNIST and EuroSAT so the published ViT-B/32 table has cells to print beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from checkpoint_formats import task_vectors_classes, write_task_vectors_tree
from cli_checks import user_error
from PIL import Image
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.errors import ConfigError
from surgery_edge.evaluation.published import published_table
from surgery_edge.run.config import find_config, load_config

runner = CliRunner()
TASKS = {"MNIST": 3, "EuroSAT": 4}  # task -> classes
EUROSAT_NAMES = ["annual crop land", "forest", "highway or road", "river"]


def write_images(folder: Path, n: int, seed: int, label: int) -> None:
    """``n`` small images of various sizes whose mean colour depends on ``label``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(12, 30, 2)
        base = np.array([40 + 60 * label, 200 - 50 * label, 90], np.float64)
        pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")


def write_folder_task(root: Path, classes: int, seed: int) -> None:
    for c in range(classes):
        write_images(root / "test" / f"class_{c}", 5, seed + c, c)
        write_images(root / "train" / f"class_{c}", 3, seed + 50 + c, c)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    write_task_vectors_tree(root / "checkpoints", "micro-vit-16", TASKS)
    write_folder_task(root / "data" / "mnist", TASKS["MNIST"], 0)
    write_folder_task(root / "data" / "eurosat", TASKS["EuroSAT"], 10)
    (root / "data" / "eurosat_classes.json").write_text(json.dumps(EUROSAT_NAMES))
    return root


def recipe(files: Path, **changes) -> dict:
    config = {
        "name": "tiny-recipe",
        "arch": "micro-vit-16",
        "device": "cpu",
        "reference": "paper_vit_b32",
        "checkpoints": {
            "format": "task_vectors",
            "root": str(files / "checkpoints"),
            "trust_pickle": True,
        },
        "data": {
            "root": str(files / "data"),
            "tasks": {
                "MNIST": {"path": "mnist"},
                "EuroSAT": {"path": "eurosat", "class_names": "eurosat_classes.json"},
            },
        },
        "merge": {
            "methods": ["task_arithmetic", "adamerging_layerwise"],
            "adamerging_steps": 3,
            "adamerging_batch_size": 4,
        },
        "surgery": {"rank": 4, "steps_v1": 4, "steps_v2": 4, "batch_size": 4, "transductive": True},
        "export": False,
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def recipe_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    config = write_config(out.parent / "tiny.yaml", recipe(files, export=True))
    result = runner.invoke(app, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, config, result.output


def clip_accuracy(files: Path, task: str, out: Path) -> float:
    """The original pickled expert + head on the task's test folder, preprocessed by PIL and
    open_clip's own eval transform: an independent check of the import, data and evaluation."""
    from open_clip.transform import image_transform

    model_dir = files / "checkpoints" / "micro-vit-16"
    with task_vectors_classes():
        encoder = torch.load(model_dir / task / "finetuned.pt", weights_only=False).eval()
        head = torch.load(model_dir / f"head_{task}.pt", weights_only=False).eval()
    preprocess = image_transform(16, is_train=False)
    test = files / "data" / task.lower() / "test"
    correct = total = 0
    for label, folder in enumerate(sorted(p for p in test.iterdir() if p.is_dir())):
        for image in sorted(folder.iterdir()):
            x = preprocess(Image.open(image)).unsqueeze(0)
            with torch.no_grad():
                correct += int(head(encoder(x)).argmax(-1).item() == label)
            total += 1
    return 100.0 * correct / total


def test_run_imports_merges_trains_evaluates_and_exports(recipe_run, files):
    out, _, output = recipe_run
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == list(TASKS)
    rows = {(r["method"], r["surgery"]): r for r in report["results"]}
    for merge in ("task_arithmetic", "adamerging_layerwise"):
        for surgery in ("none", "surgery", "surgeryv2"):
            assert (merge, surgery) in rows
    # The imported experts, evaluated by the pipeline on images it decoded itself, score what
    # the original pickled objects score through open_clip's own preprocessing.
    for task in TASKS:
        assert rows[("individual", "none")]["per_task"][task] == pytest.approx(
            clip_accuracy(files, task, out), abs=1e-6
        )
    # OpenAI-style checkpoints use QuickGELU: read off the pickles, recorded, used everywhere.
    imported = json.loads((out / "checkpoints" / "import.json").read_text())
    assert imported["arch"]["quick_gelu"] is True and "QuickGELU" in " ".join(imported["notes"])
    heads = {t: out / "checkpoints" / "heads" / f"{t}.safetensors" for t in TASKS}
    from surgery_edge.models import load_head

    assert load_head(heads["EuroSAT"]).class_names == EUROSAT_NAMES
    assert load_head(heads["MNIST"]).class_names == ["class 0", "class 1", "class 2"]
    # Published figures beside the measured ones, matched by task name.
    published = {(r["method"], r["surgery"]): r for r in published_table("paper_vit_b32")["rows"]}
    ref = {(r["method"], r["surgery"]): r for r in report["reference"]["rows"]}
    ta = ref[("task_arithmetic", "none")]
    assert ta["per_task"]["MNIST"]["published"] == 97.3
    assert ta["per_task"]["EuroSAT"]["published"] == 78.9
    assert (
        ta["per_task"]["MNIST"]["measured"]
        == rows[("task_arithmetic", "none")]["per_task"]["MNIST"]
    )
    assert ref[("traditional_mtl", "none")]["measured_avg"] is None
    assert ref[("individual", "none")]["published_avg"] == published[("individual", "none")]["avg"]
    md = (out / "report.md").read_text()
    assert "Published figures beside this run's" in md and "| Task Arithmetic [" in md
    # Engines: exported from the imported experts, parity measured on the decoded test images.
    summary = json.loads((out / "engines" / "summary.json").read_text())
    v2 = summary["engines"]["surgeryv2-routed"]["onnx"]["parity"]
    assert v2["argmax_agreement"] == 100.0 and v2["max_abs_diff"] < 1e-3
    assert summary["test_images"] == 5 * sum(TASKS.values())


def test_second_run_reuses_the_import_and_the_decoded_images(recipe_run):
    out, config, _ = recipe_run
    stamp = (out / "checkpoints" / "import.json").stat().st_mtime_ns
    cached = sorted((out / "cache" / "data").iterdir())
    result = runner.invoke(app, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "reusing imported checkpoints" in result.output
    assert "reusing merge task_arithmetic" in result.output
    assert (out / "checkpoints" / "import.json").stat().st_mtime_ns == stamp
    assert sorted((out / "cache" / "data").iterdir()) == cached


def test_stage_commands_work_on_a_recipe_run(recipe_run, tmp_path):
    out, _, _ = recipe_run
    result = runner.invoke(app, ["eval", "--run", str(out)])
    assert result.exit_code == 0, result.output
    onnx = tmp_path / "v2.onnx"
    result = runner.invoke(
        app, ["export", "--run", str(out), "--surgery", "surgeryv2", "--onnx", str(onnx)]
    )
    assert result.exit_code == 0, result.output
    assert onnx.is_file()


MICRO_CLIP = "Test-Recipe-ViT-16"


@pytest.fixture(scope="module")
def clip_family(tmp_path_factory):
    """A registered micro open_clip config with a text tower; its full CLIP weights; each
    expert both as an open_clip state dict and as a Hugging Face CLIP vision folder."""
    import open_clip
    from safetensors.torch import save_file

    from surgery_edge.models import get_arch
    from surgery_edge.models.convert.hf import hf_vision_config, open_clip_to_hf

    root = tmp_path_factory.mktemp("clip")
    vision = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    config = {"embed_dim": 24, "vision_cfg": {**vision, "mlp_ratio": 2.0}, "text_cfg": text}
    (root / f"{MICRO_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{MICRO_CLIP}.json")
    arch = get_arch(MICRO_CLIP)
    torch.manual_seed(0)
    clip = open_clip.create_model(MICRO_CLIP, pretrained=None).eval()
    state = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(root / "clip.safetensors"))
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}

    def hf_folder(folder: Path, tower: dict) -> Path:
        folder.mkdir()
        save_file(open_clip_to_hf(tower, arch), str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(hf_vision_config(arch)))
        return folder

    files = {
        "open_clip": {"pretrained": root / "clip.safetensors", "experts": {}},
        "hf": {"pretrained": hf_folder(root / "hf-pretrained", visual), "experts": {}},
    }
    for i, task in enumerate(TASKS):
        gen = torch.Generator().manual_seed(i)
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in visual.items()}
        torch.save({"state_dict": tuned}, root / f"{task}.pt")  # open_clip training layout
        files["open_clip"]["experts"][task] = root / f"{task}.pt"
        files["hf"]["experts"][task] = hf_folder(root / f"clip-vit-micro_{task}", tuned)
    return root, arch, visual, files


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_experts_without_heads_get_zero_shot_heads(fmt, tmp_path, files, clip_family):
    from surgery_edge.models import load_encoder, load_head
    from surgery_edge.models.zeroshot import build_zeroshot_heads

    root, arch, visual, sources = clip_family
    config = recipe(files, arch=MICRO_CLIP, reference=None)
    config["checkpoints"] = {
        "format": fmt,
        "pretrained": str(sources[fmt]["pretrained"]),
        "experts": {t: str(p) for t, p in sources[fmt]["experts"].items()},
        "heads": "zeroshot",
        "clip_weights": str(root / "clip.safetensors"),
    }
    config["merge"]["methods"] = ["task_arithmetic"]
    config["surgery"]["methods"] = ["surgeryv2"]
    out = tmp_path / "run"
    path = write_config(tmp_path / f"{fmt}.yaml", config)
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ckpt = out / "checkpoints"
    loaded = load_encoder(ckpt / "pretrained.safetensors", arch).state_dict
    assert all(torch.equal(loaded[k], v) for k, v in visual.items())
    names = {"MNIST": ["class 0", "class 1", "class 2"], "EuroSAT": EUROSAT_NAMES}
    clip_weights = root / "clip.safetensors"
    expected = build_zeroshot_heads(MICRO_CLIP, clip_weights, names, log=lambda *a: 0)
    for task in TASKS:
        head = load_head(ckpt / "heads" / f"{task}.safetensors")
        assert head.class_names == names[task]
        assert torch.allclose(head.head.weight, expected[task].weight, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert ("task_arithmetic", "surgeryv2") in {
        (r["method"], r["surgery"]) for r in report["results"]
    }


@pytest.mark.parametrize("fmt", ["open-clip", "hf"])
def test_import_commands(fmt, tmp_path, clip_family):
    from surgery_edge.models import load_encoder, load_head

    root, arch, _, sources = clip_family
    src = sources[fmt.replace("-", "_")]
    (tmp_path / "mnist.json").write_text(json.dumps(["zero", "one", "two"]))
    (tmp_path / "eurosat.json").write_text(json.dumps(EUROSAT_NAMES))
    out = tmp_path / "imported"
    args = ["import", fmt, "--model", MICRO_CLIP, "--pretrained", str(src["pretrained"])]
    args += [f"--expert={t}={p}" for t, p in src["experts"].items()]
    args += ["--out", str(out), "--clip-weights", str(root / "clip.safetensors")]
    classes = ["--classes", f"MNIST={tmp_path / 'mnist.json'}"]
    result = runner.invoke(app, [*args, *classes])
    assert result.exit_code == 2 and "No --classes for tasks ['EuroSAT']" in result.output
    assert not out.exists()
    classes += ["--classes", f"EuroSAT={tmp_path / 'eurosat.json'}"]
    result = runner.invoke(app, [*args, *classes, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # progress lines go to stderr: stdout is the JSON
    assert summary["checkpoints"] == str(out) and set(summary["experts"]) == set(src["experts"])
    assert summary == {"checkpoints": str(out), **json.loads((out / "import.json").read_text())}
    for task, path in src["experts"].items():
        expert = load_encoder(out / "experts" / f"{task}.safetensors", arch)
        assert expert.meta["source"]["file"] == str(path)
    assert load_head(out / "heads" / "MNIST.safetensors").class_names == ["zero", "one", "two"]
    result = runner.invoke(app, [*args, *classes])  # an existing output needs --overwrite
    assert result.exit_code == 2 and "--overwrite" in result.output
    # An expert of another architecture is refused, and the output is left as it was.
    other = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(48, 24)}, other)
    result = runner.invoke(
        app, [*args, *classes, "--overwrite", f"--expert=MNIST={other}"]
    )  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert load_head(out / "heads" / "MNIST.safetensors").class_names == ["zero", "one", "two"]


def _bad_run(tmp_path: Path, config: dict, *extra: str, expect: str) -> Path:
    out = tmp_path / "run"
    path = write_config(tmp_path / "bad.yaml", config)
    output = user_error(["run", str(path), "--out", str(out), *extra])
    assert expect in " ".join(output.split()), output
    if out.exists():  # nothing half-written: no temporary files or folders left anywhere
        assert not [p for p in out.rglob("*") if p.name.startswith(".")]
        assert not (out / "checkpoints" / "pretrained.safetensors").exists()
    return out


def test_pickles_need_trust(tmp_path, files):
    _bad_run(
        tmp_path, recipe(files, **{"checkpoints.trust_pickle": False}), expect="--trust-pickle"
    )


def test_pickle_with_an_unexpected_class(tmp_path, files):
    import shutil

    root = tmp_path / "checkpoints"
    shutil.copytree(files / "checkpoints", root)
    torch.save(torch.nn.Bilinear(2, 2, 2), root / "micro-vit-16" / "head_MNIST.pt")
    config = recipe(files, **{"checkpoints.root": str(root)})
    _bad_run(tmp_path, config, expect="torch.nn.modules.linear.Bilinear")


def test_checkpoint_of_another_architecture(tmp_path, files):
    import shutil

    root = tmp_path / "checkpoints"
    shutil.copytree(files / "checkpoints" / "micro-vit-16", root / "tiny-vit-32")
    config = recipe(files, arch="tiny-vit-32", **{"checkpoints.root": str(root)})
    _bad_run(tmp_path, config, expect="does not match")


def test_dataset_folder_with_no_images(tmp_path, files):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(files / "data", data)
    for image in (data / "mnist" / "test").rglob("*.png"):
        image.unlink()
    (data / "mnist" / "test" / "README.txt").write_text("images go here")
    _bad_run(tmp_path, recipe(files, **{"data.root": str(data)}), expect="no images")


def test_class_name_file_that_does_not_match_the_folders(tmp_path, files):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(EUROSAT_NAMES + ["sea or lake"]))
    config = recipe(files, **{"data.tasks.EuroSAT.class_names": str(names)})
    _bad_run(tmp_path, config, expect=str(names))


def test_classes_that_do_not_match_the_head(tmp_path, files):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(files / "data", data)
    write_images(data / "mnist" / "test" / "class_3", 2, 99, 3)
    write_images(data / "mnist" / "train" / "class_3", 2, 98, 3)
    out = _bad_run(
        tmp_path, recipe(files, **{"data.root": str(data)}), expect="head_MNIST.pt has 3 classes"
    )
    assert not (out / "checkpoints").exists()


def test_unset_variable_in_a_path(tmp_path, files, monkeypatch):
    monkeypatch.delenv("SURGERY_EDGE_TEST_UNSET", raising=False)
    config = recipe(files, **{"data.root": "$SURGERY_EDGE_TEST_UNSET/data"})
    _bad_run(tmp_path, config, expect="not set")
    # ...and an override on the command line replaces it.
    config = recipe(files, **{"data.root": "$SURGERY_EDGE_TEST_UNSET/data"})
    path = write_config(tmp_path / "ok.yaml", config)
    assert load_config(path, {"data.root": str(files / "data")}).data.root == files / "data"


@pytest.mark.parametrize("name", ["paper_vit_b32", "paper_vit_l14"])
def test_paper_configs_encode_the_protocol(name, tmp_path):
    path = find_config(name)  # shipped with the package, found by name
    assert path == Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    assert find_config(f"{name}.yaml") == path
    cfg = load_config(path, {"data.root": str(tmp_path), "checkpoints.root": str(tmp_path)})
    assert list(cfg.data.tasks) == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB",
                                    "MNIST", "DTD"]  # fmt: skip
    assert cfg.arch == ("ViT-B-32" if name.endswith("b32") else "ViT-L-14")
    m, s = cfg.merge, cfg.surgery
    assert m.params_for("task_arithmetic") == {"lam": 0.3}
    assert m.params_for("ties_merging") == {"k": 0.2, "lam": 0.3}
    assert "adamerging_layerwise" in m.methods
    assert m.params_for("adamerging_layerwise") == {
        "steps": 500, "batch_size": 16, "lr": 1e-3, "init": 0.3
    }  # fmt: skip
    v2_rank = 16 if name.endswith("b32") else 4
    assert (s.params["surgery"].rank, s.params["surgeryv2"].rank) == (16, v2_rank)
    assert (s.params["surgery"].steps, s.params["surgeryv2"].steps) == (1000, 1000)
    assert (s.batch_size, s.lr) == (16, 1e-3)
    assert s.transductive and cfg.checkpoints.trust_pickle
    assert cfg.data.tasks["RESISC45"].split_lists["test"] == Path("resisc45-test.txt")
    assert published_table(cfg.reference)["rows"]
    with pytest.raises(Exception, match="not set"):
        load_config(path, {"checkpoints.root": str(tmp_path)})  # $SURGERY_EDGE_DATA unset


def test_unknown_config_names_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="shipped ones are: .*paper_vit_b32.*paper_vit_l14"):
        find_config("paper_vit_b99")
    with pytest.raises(ConfigError, match="neither a file"):
        find_config(tmp_path / "paper_vit_b32.yaml")  # a path is never swapped for a recipe
    mine = tmp_path / "paper_vit_b32.yaml"
    mine.write_text("arch: micro-vit-16\n")
    assert find_config(mine) == mine


@pytest.mark.slow
def test_vit_b32_task_vectors_recipe(tmp_path):
    """The same recipe at real width: pickled ViT-B/32 objects (random weights, OpenAI's
    QuickGELU), images decoded to 224 px, merge, both surgeries, evaluation (RUN_SLOW=1)."""
    import open_clip

    def make_clip(seed):
        torch.manual_seed(seed)
        return open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()

    write_task_vectors_tree(
        tmp_path / "checkpoints", "ViT-B-32", TASKS, make_clip=make_clip, delta=1e-3
    )
    write_folder_task(tmp_path / "data" / "mnist", TASKS["MNIST"], 0)
    write_folder_task(tmp_path / "data" / "eurosat", TASKS["EuroSAT"], 10)
    (tmp_path / "data" / "eurosat_classes.json").write_text(json.dumps(EUROSAT_NAMES))
    config = recipe(tmp_path, arch="ViT-B-32")
    config["merge"]["methods"] = ["task_arithmetic"]
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["run", str(write_config(tmp_path / "b32.yaml", config)), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    imported = json.loads((out / "checkpoints" / "import.json").read_text())
    assert imported["arch"]["name"] == "ViT-B-32-quickgelu" and imported["arch"]["width"] == 768
    report = json.loads((out / "report.json").read_text())
    rows = {(r["method"], r["surgery"]) for r in report["results"]}
    assert {("task_arithmetic", "surgery"), ("task_arithmetic", "surgeryv2")} <= rows
    cached = next((out / "cache" / "data").glob("MNIST-test-*.x.npy"))
    assert np.load(cached, mmap_mode="r").shape == (15, 224, 224, 3)


# --- a task that arrives later with its images on disk (add-task --data) ---------------------

NEW = "Sketches"  # a third task: 3 classes, no published cell, no paper class names


@pytest.fixture(scope="module")
def arriving(tmp_path_factory):
    """The new task's images (a folder with an adapt/ folder) and its expert and head, imported
    from a task_vectors tree of the run's pretrained model as a user would import them."""
    from surgery_edge.models.convert.task_vectors import import_task_vectors

    root = tmp_path_factory.mktemp("arriving")
    write_folder_task(root / "sketches", 3, 20)
    write_images(root / "sketches" / "adapt", 4, 30, 1)
    write_task_vectors_tree(root / "tree", "micro-vit-16", {**TASKS, NEW: 3})
    # its head names its classes class_0, class_1, class_2 (task_vectors heads carry no names)
    import_task_vectors(root / "tree", "micro-vit-16", root / "imported", True, tasks=[NEW],
                        log=lambda *a: None)  # fmt: skip
    return root


def _copy_of(recipe_run, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(recipe_run[0], dest)
    return dest


def _answers(root: Path, tasks: list[str]) -> dict[tuple[str, str, str], torch.Tensor]:
    """Each task's test logits through every merge and surgery of the run at ``root``."""
    from surgery_edge.data.transforms import to_model_input
    from surgery_edge.run.state import Run

    run = Run.open(root, log=lambda *a, **k: None)
    run.require_experts()
    run.find_merges()
    out = {}
    with torch.no_grad():
        for (merge, method), path in run.find_adapters().items():
            model = run.model(run.merged[merge], path)
            for task in tasks:
                x = to_model_input(run.suite.task(task).test_x, model.encoder.arch, "cpu")
                out[merge, method, task] = model(x, torch.full((len(x),), run.tasks.index(task)))
    return out


def _add_args(run: Path, arriving: Path, *extra: str) -> list[str]:
    expert = arriving / "imported" / "experts" / f"{NEW}.safetensors"
    return ["add-task", "--run", str(run), "--expert", f"{NEW}={expert}", *extra]


def test_add_task_with_data_on_disk_then_drop_it(recipe_run, arriving, tmp_path):
    from safetensors import safe_open

    from surgery_edge.run.state import Run
    from surgery_edge.run.tasks import recorded_history

    run_dir = _copy_of(recipe_run, tmp_path)
    before = _answers(run_dir, list(TASKS))
    merged = {p.name: p.read_bytes() for p in (run_dir / "merged").glob("*.safetensors")}
    data = arriving / "sketches"
    args = _add_args(run_dir, arriving, "--data", str(data), "--strategy", "frozen")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((run_dir / "config.json").read_text())
    assert list(config["data"]["tasks"]) == [*TASKS, NEW]
    assert config["data"]["tasks"][NEW]["path"] == str(data)
    assert not (run_dir / "suite.npz").exists()  # a recipe's tasks stay on disk
    # frozen: the merges and the other tasks' answers bit for bit, through every adapter file
    after = _answers(run_dir, [*TASKS, NEW])
    assert {k: v for k, v in after.items() if k[2] != NEW}.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {p.name: p.read_bytes() for p in (run_dir / "merged").glob("*.safetensors")} == merged
    # read as any task of the recipe: its adapt/ folder is its adaptation split, the decoded
    # splits in the run's cache, their digests in the history
    run = Run.open(run_dir, log=lambda *a, **k: None)
    run.require_experts()
    task, names = run.suite.task(NEW), ["class 0", "class 1", "class 2"]
    assert (len(task.adapt_x), len(task.test_x), task.class_names) == (4, 15, names)
    for images in (task.adapt_x, task.test_x):
        assert Path(images.filename).parent == run_dir / "cache" / "data"
    (entry,) = recorded_history(run_dir)
    assert entry["files"]["data"] == {
        "path": str(data),
        "source": "folder",
        "adapt_images": run.images_digest(NEW, "adapt"),
        "test_images": run.images_digest(NEW, "test"),
        "test_labels": task.digest("test_y"),
    }
    with safe_open(str(run_dir / "adapters/task_arithmetic/surgeryv2.safetensors"), "pt") as f:
        assert f.get_tensor(f"{NEW}/final/up").abs().sum() > 0  # trained, not the identity
    # eval and export work on it as on any run
    result = runner.invoke(app, ["eval", "--run", str(run_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["tasks"] == [*TASKS, NEW]
    rows = {(r["method"], r["surgery"]): r for r in report["results"]}
    assert set(rows[("task_arithmetic", "surgeryv2")]["per_task"]) == {*TASKS, NEW}
    model, _ = run.layout.export_model("task_arithmetic", "surgeryv2")
    assert model.tasks == [*TASKS, NEW] and model.class_names[2] == names  # the data's names
    # drop-task takes it out of the recorded config the same way; the others stay bit for bit
    result = runner.invoke(app, ["drop-task", "--run", str(run_dir), NEW, "--strategy", "frozen"])
    assert result.exit_code == 0, result.output
    assert list(json.loads((run_dir / "config.json").read_text())["data"]["tasks"]) == list(TASKS)
    dropped = _answers(run_dir, list(TASKS))
    assert all(torch.equal(dropped[k], before[k]) for k in before)


def test_add_task_remerge_with_data_on_disk(recipe_run, arriving, tmp_path):
    from surgery_edge.models.checkpoint import read_metadata

    run_dir = _copy_of(recipe_run, tmp_path)
    merged = run_dir / "merged" / "task_arithmetic.safetensors"
    before = merged.read_bytes()
    args = ["--data", str(arriving / "sketches"), "--strategy", "remerge", "--steps", "1"]
    result = runner.invoke(app, _add_args(run_dir, arriving, *args))
    assert result.exit_code == 0, result.output
    assert list(json.loads((run_dir / "config.json").read_text())["data"]["tasks"]) == [*TASKS, NEW]
    assert merged.read_bytes() != before  # made again with the new task vector
    meta = read_metadata(run_dir / "adapters" / "task_arithmetic" / "surgeryv2.safetensors")
    assert meta["tasks"] == [*TASKS, NEW] and meta["provenance"]["task_change"]["task"] == NEW
    assert _answers(run_dir, [NEW])  # every merge and adapter file fits the new task set


def test_add_task_refusals_on_a_recipe_run_write_nothing(recipe_run, arriving, tmp_path):
    import shutil

    run_dir = _copy_of(recipe_run, tmp_path)

    def contents() -> dict[str, bytes]:  # (the hash cache remembers the copy's new inodes)
        files = [p for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "hashes.json"]
        return {str(p): p.read_bytes() for p in files}

    snapshot = contents()
    refuse = _add_args(run_dir, arriving, "--strategy", "frozen")
    assert "give --data PATH" in " ".join(user_error(refuse).split())
    # a bad folder: the recipe loader's own message, before anything is decoded into the run
    empty = tmp_path / "empty"
    shutil.copytree(arriving / "sketches", empty)
    for image in (empty / "test").rglob("*.png"):
        image.unlink()
    text = " ".join(user_error([*refuse, "--data", str(empty)]).split())
    assert f"Task '{NEW}': {empty / 'test'} holds no images in class folders" in text
    # images that decode, but of another class count than the head's: checked before training
    more = tmp_path / "more"
    shutil.copytree(arriving / "sketches", more)
    write_images(more / "test" / "class_3", 2, 40, 3)
    write_images(more / "train" / "class_3", 2, 41, 3)
    text = " ".join(user_error([*refuse, "--data", str(more)]).split())
    assert "with 3 classes" in text and "the 4 classes of --data" in text
    # a YAML entry a recipe would refuse
    entry = tmp_path / "entry.yaml"
    entry.write_text("source: torchvision\npath: here\n")
    assert "needs `dataset`" in " ".join(user_error([*refuse, "--data", str(entry)]).split())
    assert contents() == snapshot


def test_add_task_data_as_a_recipe_entry_reads_any_source(recipe_run, tmp_path):
    """--data as a YAML entry: a torchvision dataset's files, paths from the YAML's folder."""
    from dataset_formats import CIFAR10_NAMES, write_cifar

    from surgery_edge.run.state import Run
    from surgery_edge.run.task_data import read_arriving

    write_cifar(tmp_path / "cifar", "CIFAR10", seed=0)
    entry = tmp_path / "cifar.yaml"
    entry.write_text("source: torchvision\ndataset: CIFAR10\npath: cifar\n")
    run = Run.open(recipe_run[0], log=lambda *a, **k: None)
    run.require_experts()
    found = read_arriving(run, "Photos", entry, tmp_path / "staging")
    assert found.entry.path == tmp_path / "cifar" and found.entry.dataset == "CIFAR10"
    assert found.data.test_x.shape == (4, 16, 16, 3)
    assert found.data.class_names == list(CIFAR10_NAMES)
    assert list((tmp_path / "staging").glob("Photos-test-*.x.npy"))  # decoded there...
    assert not list((recipe_run[0] / "cache" / "data").glob("Photos-*"))  # ...not in the run

"""The 14- and 20-task recipes (configs/paper_vit_*_tall{14,20}.yaml).

Every recipe holds its suite's tasks in the papers' order and validates; the TALL20 recipe
runs end to end (``surgery-edge run``) on a micro CLIP task_vectors tree and data written here
for all twenty tasks in the real formats at the places the recipe names: torchvision's own files
for the twelve added tasks (tests/dataset_formats.py writes CIFAR, STL10, Flowers102, FER2013 and
PCAM), image folders for the eight paper tasks; only the architecture and the step counts are
made small.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from checkpoint_formats import write_task_vectors_tree
from dataset_formats import write_cifar, write_fer2013, write_flowers102, write_pcam, write_stl10
from PIL import Image
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.evaluation.published import published_table
from surgery_edge.models.templates import PAPER_TASKS, TALL14_TASKS, TALL20_TASKS, templates_for
from surgery_edge.run.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = {
    "paper_vit_b32_tall14.yaml": TALL14_TASKS,
    "paper_vit_b32_tall20.yaml": TALL20_TASKS,
    "paper_vit_l14_tall14.yaml": TALL14_TASKS,
    "paper_vit_l14_tall20.yaml": TALL20_TASKS,
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_lists_its_suite_and_validates(name, monkeypatch, tmp_path):
    monkeypatch.setenv("SURGERY_EDGE_DATA", str(tmp_path))
    monkeypatch.setenv("SURGERY_EDGE_CHECKPOINTS", str(tmp_path))
    config = load_config(CONFIGS / name)
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert tuple(raw["data"]["tasks"]) == RECIPES[name]
    base = yaml.safe_load((CONFIGS / name.replace(f"_tall{len(RECIPES[name])}", "")).read_text())
    # The eight paper tasks are read exactly as the eight-task recipe reads them.
    assert {t: raw["data"]["tasks"][t] for t in PAPER_TASKS} == base["data"]["tasks"]
    assert raw["arch"] == base["arch"]
    # the reference column: published figures for exactly these tasks, each with its source
    table = published_table(config.reference)
    assert config.reference == name.removesuffix(".yaml")
    assert table["tasks"] == list(RECIPES[name]) and "FusionBench" in table["source"]
    rows = {r["label"]: r for r in table["rows"]}
    assert "tall_masks" in rows["Individual (TALL-masks checkpoints)"]["source"]
    # the published Surgery and expert averages on this suite, with their source
    surgery = rows["Surgery w/ AdaMerging"]
    assert (surgery["method"], surgery["surgery"]) == ("adamerging_layerwise", "surgery")
    assert surgery["per_task"] is None and 80 < surgery["avg"] < 95
    assert "SyMerge" in surgery["source"] and "030586f" in surgery["source"]
    assert rows["Individual (SyMerge's table)"]["avg"] > surgery["avg"]
    assert config.name.endswith(f"tall{len(RECIPES[name])}")
    for task in RECIPES[name]:
        assert templates_for(task) != templates_for("no such task"), task


def pixels(rng, label: int, size: int = 18, gray: bool = False) -> np.ndarray:
    base = np.array([40 + 80 * (label % 3), 200 - 60 * (label % 3), 90], np.float64)
    image = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return image[..., 0] if gray else image


def write_task(root: Path, classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(pixels(rng, c)).save(folder / f"img{i}.png")


def write_idx(path: Path, data: np.ndarray) -> None:
    magic = 0x0801 if data.ndim == 1 else 0x0803
    path.write_bytes(struct.pack(">" + "i" * (1 + data.ndim), magic, *data.shape) + data.tobytes())


def write_mnist_like(
    root: Path, name: str, seed: int, prefixes: tuple[str, str] = ("train", "t10k")
) -> None:
    """torchvision's raw idx files (``<name>/raw/<prefix>-...``), labels 0..9 in both splits."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix in prefixes:
        labels = np.arange(10, dtype=np.uint8)
        images = np.stack([pixels(rng, int(c), 28, gray=True) for c in labels])
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def write_food101(root: Path, seed: int) -> None:
    """food-101/images/<class>/<id>.jpg and meta/{train,test}.json."""
    rng, base = np.random.default_rng(seed), root / "food-101"
    for split in ("train", "test"):
        meta = {}
        for c, name in enumerate(("apple_pie", "baby_back_ribs")):
            (base / "images" / name).mkdir(parents=True, exist_ok=True)
            meta[name] = [f"{name}/{split}{i}" for i in range(2)]
            for item in meta[name]:
                Image.fromarray(pixels(rng, c)).save(base / "images" / f"{item}.jpg")
        (base / "meta").mkdir(exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))


def write_pets(root: Path, seed: int) -> None:
    """oxford-iiit-pet/images/<Breed>_<n>.jpg and annotations/{trainval,test}.txt."""
    rng, base = np.random.default_rng(seed), root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    n = 0
    for split in ("trainval", "test"):
        lines = []
        for c, breed in enumerate(("Abyssinian", "american_bulldog")):
            for _ in range(2):
                n += 1
                Image.fromarray(pixels(rng, c)).save(base / "images" / f"{breed}_{n}.jpg")
                lines.append(f"{breed}_{n} {c + 1} {c + 1} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def write_sst2(root: Path, seed: int) -> None:
    """rendered-sst2/{train,test}/{negative,positive}/*.png."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c, label in enumerate(("negative", "positive")):
            folder = root / "rendered-sst2" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(pixels(rng, c)).save(folder / f"{i}.png")


# torchvision sources of the recipe: (writer, classes of the expert's head)
TORCHVISION = {
    "OxfordIIITPet": (write_pets, 2),
    "FashionMNIST": (lambda root, seed: write_mnist_like(root, "FashionMNIST", seed), 10),
    "KMNIST": (lambda root, seed: write_mnist_like(root, "KMNIST", seed), 10),
    "Food101": (write_food101, 2),
    "RenderedSST2": (write_sst2, 2),
    "EMNIST": (
        lambda root, seed: write_mnist_like(
            root, "EMNIST", seed, ("emnist-digits-train", "emnist-digits-test")
        ),
        10,
    ),
    "CIFAR10": (lambda root, seed: write_cifar(root, "CIFAR10", seed), 10),
    "CIFAR100": (lambda root, seed: write_cifar(root, "CIFAR100", seed), 100),
    "STL10": (write_stl10, 10),
    "Flowers102": (write_flowers102, 102),
    "FER2013": (write_fer2013, 7),
    "PCAM": (write_pcam, 2),
}


def test_the_20_task_recipe_runs_end_to_end(tmp_path):
    config = yaml.safe_load((CONFIGS / "paper_vit_b32_tall20.yaml").read_text())
    tasks = list(config["data"]["tasks"])
    classes = {t: TORCHVISION[t][1] if t in TORCHVISION else 2 + i % 2 for i, t in enumerate(tasks)}
    write_task_vectors_tree(tmp_path / "checkpoints", "micro-vit-16", classes)
    entries, data = config["data"]["tasks"], tmp_path / "data"
    for i, task in enumerate(tasks):
        if task in TORCHVISION:
            assert entries[task] == {"source": "torchvision", "dataset": task, "path": "."}
            TORCHVISION[task][0](data, i)
            continue
        if task in PAPER_TASKS:  # torchvision / split-list sources in the eight-task recipe
            entries[task] = {"source": "folder", "path": task.lower()}
        assert entries[task]["source"] == "folder"
        write_task(data / entries[task]["path"], classes[task], i)
    config.update(arch="micro-vit-16", device="cpu", export=False)
    config["checkpoints"]["model"] = "micro-vit-16"
    config["merge"] = {"methods": ["task_arithmetic"], "params": {"task_arithmetic": {"lam": 0.3}}}
    config["surgery"].update(
        params={"surgery": {"rank": 2, "steps": 2}, "surgeryv2": {"rank": 2, "steps": 2}},
        batch_size=2,
    )
    path = tmp_path / "tall20.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "run"
    args = ["run", str(path), "--out", str(out), "--data-root", str(tmp_path / "data")]
    args += ["--checkpoint-root", str(tmp_path / "checkpoints")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == list(TALL20_TASKS)
    rows = {(r["method"], r["surgery"]): r for r in report["results"]}
    for surgery in ("none", "surgery", "surgeryv2"):
        assert set(rows[("task_arithmetic", surgery)]["per_task"]) == set(TALL20_TASKS)
    assert set(rows[("individual", "none")]["per_task"]) == set(TALL20_TASKS)
    # FusionBench's published figures beside the measured ones, for all twenty tasks
    ref = {r["label"]: r for r in report["reference"]["rows"]}
    measured = rows[("individual", "none")]["per_task"]["PCAM"]
    assert ref["Individual (FusionBench's experts)"]["per_task"]["PCAM"] == {
        "measured": measured,
        "published": 87.96,
    }
    assert ref["Individual (TALL-masks checkpoints)"]["per_task"]["PCAM"]["published"] == 87.88
    assert ref["Pre-trained (zero-shot)"]["per_task"]["KMNIST"]["published"] == 9.95
    md = (out / "report.md").read_text()
    assert "FusionBench" in md and "SyMerge project page" in md
    # an average-only row: a dash in every task column, the published average in the last
    line = next(ln for ln in md.splitlines() if ln.startswith("| Surgery w/ AdaMerging ["))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert all(c.endswith("/ –") for c in cells[1:-1]) and cells[-1].endswith("/ 84.5")


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_the_added_torchvision_sources_read_labels_names_and_splits(name, tmp_path):
    from surgery_edge.data.disk import DiskTask, load_disk_task

    TORCHVISION[name][0](tmp_path / "tv", 0)
    task = DiskTask(name, source="torchvision", path=tmp_path / "tv", dataset=name)
    data = load_disk_task(
        task, 8, tmp_path / "cache", n_adapt=2, need_train=True, log=lambda line: None, workers=1
    )
    expected = {
        "OxfordIIITPet": ["Abyssinian", "American Bulldog"],
        "Food101": ["apple_pie", "baby_back_ribs"],
        "RenderedSST2": ["negative", "positive"],
    }
    if name in expected:
        assert data.class_names == expected[name]
    if "MNIST" not in name:  # two images of each of classes 0 and 1 per split
        assert data.num_classes == TORCHVISION[name][1]
        assert sorted(data.test_y.tolist()) == [0, 0, 1, 1]
        assert sorted(data.train_y.tolist()) == [0, 0, 1, 1]
    else:  # FashionMNIST / KMNIST / EMNIST digits: ten names, one image per class and split
        assert data.num_classes == 10 and data.test_y.tolist() == list(range(10))
        assert data.train_y.tolist() == list(range(10))
    assert data.test_x.shape[1:] == (8, 8, 3) and data.adapt_x.shape == (2, 8, 8, 3)

"""The 14- and 20-task recipes (configs/paper_vit_*_tall{14,20}.yaml).

Every recipe holds its suite's tasks in the papers' order and validates; the TALL20 recipe
runs end to end (``surgery-edge run``) on a micro CLIP task_vectors tree and image folders
written here for all twenty tasks, at the paths the recipe names, with only the architecture
and the step counts made small.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from checkpoint_formats import write_task_vectors_tree
from PIL import Image
from surgery_edge.cli.app import app
from typer.testing import CliRunner

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
    assert raw["arch"] == base["arch"] and "reference" not in raw  # no unverified figures
    assert config.name.endswith(f"tall{len(RECIPES[name])}")
    for task in RECIPES[name]:
        assert templates_for(task) != templates_for("no such task"), task


def write_task(root: Path, classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 2), ("test", 2)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array([40 + 80 * c, 200 - 60 * c, 90 + 7 * (seed % 9)], np.float64)
                pixels = np.clip(base + rng.normal(0, 20, (18, 18, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")


def test_the_20_task_recipe_runs_end_to_end(tmp_path):
    config = yaml.safe_load((CONFIGS / "paper_vit_b32_tall20.yaml").read_text())
    tasks = list(config["data"]["tasks"])
    classes = {t: 2 + i % 2 for i, t in enumerate(tasks)}
    write_task_vectors_tree(tmp_path / "checkpoints", "micro-vit-16", classes)
    entries = config["data"]["tasks"]
    for i, task in enumerate(tasks):
        if task in PAPER_TASKS:  # torchvision / split-list sources in the real recipe
            entries[task] = {"source": "folder", "path": task.lower()}
        write_task(tmp_path / "data" / entries[task]["path"], classes[task], i)
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

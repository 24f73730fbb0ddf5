"""The surgery sweep and the adaptation-size measurement (surgery_edge.bench) on the tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from surgery_edge.bench import sweep
from surgery_edge.models import get_arch


def test_matched_rank_is_the_surgeryv2_papers_v1_rank():
    # SurgeryV2 reruns V1 at V2's parameter count: rank 304 on ViT-B (V2 rank 16), 132 on
    # ViT-L (V2 rank 4)
    assert sweep.matched_rank(get_arch("ViT-B-32"), 16) == 304
    assert sweep.matched_rank(get_arch("ViT-L-14"), 4) == 132


def _point(method, schedule, lr, steps, agreement, rank=4):
    return {
        "method": method,
        "schedule": schedule,
        "lr": lr,
        "rank": rank,
        "steps": steps,
        "heldout_agreement": agreement,
    }


def test_the_choice_is_the_best_held_out_score_and_prefers_the_cheaper_tie():
    points = [
        _point("surgery", "joint", 1e-3, 6, 50.0),
        _point("surgery", "joint", 1e-2, 6, 60.0),
        _point("surgery", "joint", 1e-2, 12, 60.0),  # a tie: fewer steps win
        _point("surgery", "reference", 1e-3, 6, 55.0),
        _point("surgeryv2", "joint", 1e-3, 3, 70.0),
        _point("surgeryv2", "joint", 3e-3, 6, 80.0),  # beyond the step budget below
        _point("surgeryv2", "reference", 1e-3, 3, 75.0),
    ]
    current = {
        "surgery": {"lr": 1e-3, "rank": 4, "steps": 6},
        "surgeryv2": {"lr": 1e-3, "rank": 4, "steps": 3},
    }
    choice = sweep.choose(points, current, max_v2_steps=3)
    v1, v2 = choice["surgery"], choice["surgeryv2"]
    assert (v1["settings"]["retuned"]["lr"], v1["settings"]["retuned"]["steps"]) == (1e-2, 6)
    assert v1["settings"]["current"]["heldout_agreement"] == 50.0
    assert v1["best_heldout"] == "retuned"
    assert v2["settings"]["retuned"]["steps"] == 3  # the 6-step point is over budget
    assert v2["best_heldout"] == "reference"


def test_sweep_tunes_on_held_out_images_and_compares_every_merge(tiny_run, tmp_path):
    out, _ = tiny_run
    argv = [
        "--run",
        str(out),
        "--v1-lrs",
        "3e-3,1e-2",
        "--v1-steps",
        "2,6",
        "--v1-ranks",
        "4",
        "--v2-lrs",
        "3e-3,1e-2",
        "--v2-steps",
        "3",
        "--reference-steps",
        "1",
        "--compare",
        "task_arithmetic,ties_merging",
        "--out",
        str(tmp_path),
    ]
    record = sweep.main(argv, prog="sweep_surgery")
    saved = json.loads((tmp_path / "surgery-sweep-micro-vit-16.json").read_text())
    assert saved["choice"] == record["choice"]
    # 16 adaptation images per task: 4 held out, 12 trained on
    assert set(record["heldout_images_per_task"].values()) == {4}
    points = record["tune"]
    v1 = [p for p in points if p["method"] == "surgery"]
    v2 = [p for p in points if p["method"] == "surgeryv2"]
    assert sorted((p["schedule"], p["lr"], p["steps"]) for p in v1) == [
        ("joint", 3e-3, 2),
        ("joint", 3e-3, 6),
        ("joint", 1e-2, 2),
        ("joint", 1e-2, 6),
        ("reference", 1e-3, 2),
        ("reference", 1e-3, 6),
    ]
    assert sorted((p["schedule"], p["lr"], p["steps"]) for p in v2) == [
        ("joint", 3e-3, 3),
        ("joint", 1e-2, 3),
        ("reference", 1e-3, 1),
        ("reference", 1e-3, 3),
    ]
    for p in points:
        assert 0.0 <= p["heldout_agreement"] <= 100.0 and p["heldout_l1"] > 0
    # the current settings (the tiny config's: the demo's lr 3e-3) are found in the grid, and
    # the reference schedule runs at the authors' lr 1e-3
    assert record["choice"]["surgeryv2"]["settings"]["current"]["lr"] == 3e-3
    assert record["choice"]["surgeryv2"]["settings"]["reference"]["lr"] == 1e-3
    cmp = record["compare"]
    assert {(r["merge"], r["method"], r["setting"]) for r in cmp["rows"]} == {
        (m, meth, s)
        for m in ("task_arithmetic", "ties_merging")
        for meth in ("surgery", "surgeryv2")
        for s in ("current", "retuned", "reference")
    }
    for r in cmp["rows"]:
        gap = cmp["experts"] - cmp["merged"][r["merge"]]
        assert r["gap_closed"] == pytest.approx((r["test_avg"] - cmp["merged"][r["merge"]]) / gap)
    report = (tmp_path / "surgery-sweep-micro-vit-16.md").read_text()
    assert "best held-out" in report and "| task_arithmetic |" in report
    assert (tmp_path / "surgery-sweep-micro-vit-16.png").stat().st_size > 1000


def test_a_merge_that_is_not_in_the_run_is_refused(tiny_run):
    with pytest.raises(SystemExit, match="no merge 'nope'"):
        sweep.main(["--run", str(tiny_run[0]), "--merge", "nope"])


def test_adapt_size_redraws_only_the_adaptation_split_and_scores_every_size(tiny_run, tmp_path):
    from surgery_edge.bench import adapt_size
    from surgery_edge.data.suite import generate_suite

    suite = generate_suite(0, n_train=5, n_adapt=3, n_test=4, tasks=["digits", "shapes"])
    bigger = adapt_size.with_adaptation_pool(suite, 30)
    for old, new in zip(suite.tasks, bigger.tasks):
        assert len(new.adapt_x) == 30
        assert np.array_equal(old.train_x, new.train_x) and np.array_equal(old.test_y, new.test_y)

    argv = ["--run", str(tiny_run[0]), "--sizes", "4,20", "--pool", "28", "--held", "8"]
    record = adapt_size.main([*argv, "--out", str(tmp_path)], prog="adapt_size")
    assert [(r["method"], r["images"]) for r in record["rows"]] == [
        (m, n) for m in ("surgery", "surgeryv2") for n in (4, 20)
    ]
    # the run's own settings (tiny config): V1 6 steps at rank 4, V2 3 steps
    assert {(r["method"], r["steps"], r["rank"]) for r in record["rows"]} == {
        ("surgery", 6, 4),
        ("surgeryv2", 3, 4),
    }
    for r in record["rows"]:
        assert 0.0 <= r["heldout_agreement"] <= 100.0 and r["heldout_l1"] > 0
    saved = json.loads((tmp_path / "adapt-size-micro-vit-16.json").read_text())
    assert saved["rows"] == record["rows"]
    assert "| surgeryv2 | 20 |" in (tmp_path / "adapt-size-micro-vit-16.md").read_text()
    with pytest.raises(SystemExit, match="must lie in 1..20"):
        adapt_size.main([*argv[:-4], "--pool", "28", "--held", "8", "--sizes", "21"])

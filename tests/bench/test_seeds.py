"""The demo-over-seeds summary (surgery_edge.bench.seeds) on hand-written reports."""

from __future__ import annotations

import json

import pytest

from surgery_edge.bench import seeds


def _run(tmp_path, seed, v2, config_extra=None):
    run = tmp_path / f"seed{seed}"
    run.mkdir()
    rows = [
        {"method": "individual", "surgery": "none", "avg": 90.0},
        {"method": "task_arithmetic", "surgery": "none", "avg": 40.0},
        {"method": "task_arithmetic", "surgery": "surgeryv2", "avg": v2},
    ]
    (run / "report.json").write_text(
        json.dumps({"arch": "tiny-vit-32", "results": rows, "timings_s": {"total": 600.0 + seed}})
    )
    (run / "config.json").write_text(
        json.dumps({"seed": seed, "arch": "tiny-vit-32", **(config_extra or {})})
    )
    return run


def test_mean_spread_and_gap_closed_over_seeds(tmp_path):
    runs = [_run(tmp_path, s, v) for s, v in ((0, 80.0), (1, 85.0), (2, 75.0))]
    record = seeds.main([*map(str, runs), "--out", str(tmp_path / "out")], prog="demo_seeds")
    v2 = next(r for r in record["rows"] if r["surgery"] == "surgeryv2")
    assert v2["mean"] == pytest.approx(80.0) and v2["spread"] == pytest.approx(10.0)
    assert v2["std"] == pytest.approx(5.0)
    # (80 - 40) / (90 - 40) = 0.8, and 0.9, 0.7
    assert v2["gap_closed"]["mean"] == pytest.approx(0.8)
    assert v2["gap_closed"]["min"] == pytest.approx(0.7)
    assert record["seconds"] == [600.0, 601.0, 602.0]
    md = (tmp_path / "out" / "demo-seeds.md").read_text()
    assert "80.0 (75.0-85.0)" in md and "80% (70-90)" in md
    assert json.loads((tmp_path / "out" / "demo-seeds.json").read_text())["seeds"] == [0, 1, 2]


def test_runs_that_differ_in_more_than_the_seed_are_refused(tmp_path):
    a = _run(tmp_path, 0, 80.0)
    b = _run(tmp_path, 1, 80.0, {"surgery": {"lr": 0.01}})
    with pytest.raises(SystemExit, match="differs from .* in \\['surgery'\\]"):
        seeds.main([str(a), str(b)])
    with pytest.raises(SystemExit, match="not a finished run"):
        seeds.main([str(a), str(tmp_path / "nothing")])


@pytest.mark.parametrize("name", ["../outside", "sub/name", "", ".."])
def test_a_record_name_with_a_folder_is_refused_before_anything_is_written(tmp_path, capsys, name):
    run = _run(tmp_path, 0, 80.0)
    with pytest.raises(SystemExit) as exit_:
        seeds.main([str(run), "--name", name, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "a file name without a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "outside.json").exists()
    record = seeds.main([str(run), "--name", "demo-seed0", "--out", str(tmp_path / "out")])
    assert record["seeds"] == [0] and (tmp_path / "out" / "demo-seed0.json").is_file()

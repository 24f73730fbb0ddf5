"""The task-scaling benchmark (surgery_edge.bench.scaling) on the micro ViT, two tasks."""

from __future__ import annotations

import json

import pytest

from surgery_edge.bench import scaling


def test_scaling_records_every_engine_against_separate_experts(tmp_path):
    argv = ["--arch", "micro-vit-16", "--tasks", "2", "--batch", "4", "--rank", "4"]
    argv += ["--warmup", "1", "--max-seconds", "0.1", "--rounds", "2", "--out", str(tmp_path)]
    record = scaling.main(argv, prog="bench_scaling")
    saved = json.loads((tmp_path / "scaling-micro-vit-16.json").read_text())
    assert saved["results"] == record["results"] and saved["command"].startswith("bench_scaling")
    (row,) = record["results"]
    engines = row["engines"]
    assert set(engines) == set(scaling.ENGINES) | {"experts-all-tasks", "experts-routed"}
    for entry in engines.values():
        assert entry["median_ms"] > 0 and entry["engine_bytes"] > 0
        assert entry["images_per_s"] == pytest.approx(4 / (entry["median_ms"] / 1e3), rel=1e-2)
    # Two experts hold two backbones; the merged engines hold one (plus heads and adapters).
    assert (
        engines["experts-all-tasks"]["engine_bytes"]
        > 1.8 * engines["merged-routed"]["engine_bytes"]
    )
    assert engines["surgeryv2-routed"]["engine_bytes"] > engines["merged-routed"]["engine_bytes"]
    ratio = row["ratios"]["v2_routed"]["latency"]
    assert ratio == pytest.approx(
        engines["surgeryv2-routed"]["median_ms"] / engines["merged-routed"]["median_ms"], rel=1e-3
    )
    assert record["goals"]["v2_routed"]["met"] == (ratio <= 1.05)
    assert (tmp_path / "scaling-micro-vit-16.png").stat().st_size > 1000
    report = (tmp_path / "scaling-micro-vit-16.md").read_text()
    assert "| 2 |" in report and "/proc/loadavg" in report


def test_more_tasks_than_images_is_refused():
    with pytest.raises(SystemExit, match="at most --batch"):
        scaling.main(["--tasks", "8", "--batch", "4"])


def test_no_experts_times_the_shared_engines_alone(tmp_path):
    argv = ["--arch", "micro-vit-16", "--tasks", "1,3", "--batch", "3", "--rank", "2"]
    argv += ["--warmup", "1", "--max-seconds", "0.05", "--rounds", "1", "--no-experts"]
    record = scaling.main([*argv, "--out", str(tmp_path)], prog="bench_scaling")
    assert record["experts"] is False
    for row in record["results"]:
        assert set(row["engines"]) == set(scaling.ENGINES)
        assert set(row["ratios"]) == {"v1_all_tasks", "v2_routed"}
    assert record["goals"]["v1_all_tasks"]["tasks"] == 3
    report = (tmp_path / "scaling-micro-vit-16.md").read_text()
    assert "not timed (`--no-experts`)" in report and "experts-routed" not in report
    assert (tmp_path / "scaling-micro-vit-16.png").stat().st_size > 1000


def test_the_profile_says_which_operators_the_adapters_add(tmp_path):
    """bench_scaling_profile: ONNX Runtime's per-operator kernel times of the merged and the
    SurgeryV2 routed engines at T = 1 and T; the decomposition adds up to the totals, and the
    operators only the adapters have (ReLU, their per-row gathers) are V2's alone."""
    from surgery_edge.bench import scaling_profile

    argv = ["--arch", "micro-vit-16", "--tasks", "2", "--batch", "4", "--rank", "4"]
    argv += ["--profiled-calls", "2", "--rounds", "2", "--calls", "1", "--out", str(tmp_path)]
    record = scaling_profile.main(argv, prog="bench_scaling_profile")
    saved = json.loads((tmp_path / "scaling-profile-micro-vit-16.json").read_text())
    assert saved["decomposition_us"] == record["decomposition_us"]
    prof, parts = record["profiles"], record["decomposition_us"]
    assert set(prof) == {"merged-T1", "surgeryv2-T1", "merged-T2", "surgeryv2-T2"}
    assert "Relu" in prof["surgeryv2-T2"]["ops_us"] and "Relu" not in prof["merged-T2"]["ops_us"]
    assert parts["Relu"]["adapter_T"] > 0

    def total(name):
        return sum(prof[name]["ops_us"].values())

    assert sum(p["adapter_T"] for p in parts.values()) == pytest.approx(
        total("surgeryv2-T2") - total("merged-T2")
    )
    assert sum(p["with_T"] for p in parts.values()) == pytest.approx(
        total("surgeryv2-T2") - total("surgeryv2-T1") - total("merged-T2") + total("merged-T1")
    )
    for ratio in record["ratio_v2_over_merged"].values():
        assert ratio["rounds"] == 2 and ratio["iqr"][0] <= ratio["median"] <= ratio["iqr"][1]
        assert ratio["median_ci95"][0] <= ratio["median"] <= ratio["median_ci95"][1]
    assert "| **all** |" in (tmp_path / "scaling-profile-micro-vit-16.md").read_text()
    shares = record["shares_of_merged_kernel_time"]
    base = prof["merged-T2"]["kernel_us"]
    assert base == pytest.approx(total("merged-T2"))
    assert shares["adapter_pct"] == pytest.approx(
        100 * (total("surgeryv2-T2") - base) / base, abs=0.01
    )


@pytest.mark.parametrize(
    "argv", [["--tasks", "1"], ["--tasks", "8", "--batch", "4"], ["--rounds", "0"]]
)
def test_the_profile_refuses_bad_options_before_any_work(argv, tmp_path, capsys):
    from surgery_edge.bench import scaling_profile

    with pytest.raises(SystemExit) as stop:
        scaling_profile.main([*argv, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

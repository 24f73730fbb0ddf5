"""The benchmarks' plots, drawn from the committed records: what a reader needs is read from
the figure (tick labels at the swept values, units in the axis labels, few lines per panel,
every label once), not from pixels."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from surgery_edge.bench import plots, replot, scaling, sweep
from surgery_edge.bench.choices import CONFIGS, MODES

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cpu"


def _record(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _labels(axis) -> list[str]:
    """The major tick labels inside the axis's view (also where a shared axis hides them)."""
    lo, hi = sorted(axis.get_view_interval())
    locs = axis.get_majorticklocs()
    texts = axis.get_major_formatter().format_ticks(locs)
    return [t for v, t in zip(locs, texts) if lo <= v <= hi and t]


@pytest.fixture(scope="module")
def engine_record():
    return _record("engine-tiny-vit-32.json")


def _lines(ax) -> list:
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_latency_has_a_panel_per_mode_and_runtime_with_few_lines(engine_record):
    rows = plots.engine_results(engine_record)
    fig = plots.latency_figure(rows, "tiny-vit-32", engine_record["label"])
    panels = [ax for ax in fig.axes if ax.get_title()]
    titles = [ax.get_title() for ax in panels]
    assert titles == [f"{m}, {p}" for m in MODES for p in ("eager", "compile", "onnxruntime")]
    for ax in panels:
        labels = [line.get_label() for line in _lines(ax)]
        assert 0 < len(labels) <= len(CONFIGS) and len(set(labels)) == len(labels)
        assert _labels(ax.xaxis) == ["1", "8", "32"]  # the swept batches, not 10^0
        ticks = _labels(ax.yaxis)
        assert ticks and all("$" not in t and "e" not in t for t in ticks)
    assert sum(len(_lines(ax)) for ax in panels) == len(
        {(r.config, r.mode, r.path) for r in rows if r.status == "ok"}
    )  # every measured line is drawn once, none lost to the split
    assert "ms" in panels[0].get_ylabel()
    (legend,) = fig.legends
    measured = {r.config for r in rows if r.status == "ok"}
    assert [t.get_text() for t in legend.get_texts()] == [c for c in CONFIGS if c in measured]


def test_a_fused_twin_is_dashed_in_its_runtimes_panel(engine_record):
    rows = [
        r
        for r in plots.engine_results(engine_record)
        if (r.mode, r.path, r.status) == ("routed", "eager", "ok")
    ]
    fused = [dataclasses.replace(r, path="fused") for r in rows if r.config == "surgeryv2"]
    fig = plots.latency_figure(rows + fused, "tiny-vit-32", "test")
    (panel,) = [ax for ax in fig.axes if ax.get_title()]  # fused joins eager's panel
    assert panel.get_title() == "routed, eager"
    (twin,) = [line for line in _lines(panel) if line.get_label() == "surgeryv2 (fused)"]
    assert twin.get_linestyle() == "--"
    assert [h.get_label() for h in fig.legends[0].legend_handles][-1] == "fused (Triton) twin"


def test_weights_name_one_expert_once_with_units(engine_record):
    weights = engine_record["derived"]["weight_bytes"]
    fig = plots.weights_figure(weights, "tiny-vit-32", "fp32")
    (ax,) = fig.axes
    names = _labels(ax.yaxis)
    # the configurations the record measured (one recorded before the experts as one graph
    # was added lacks it)
    assert sorted(names) == sorted(c for c in CONFIGS if c in weights)
    assert len(set(names)) == len(names)
    assert "MiB" in ax.get_xlabel()
    notes = [t.get_text() for t in ax.texts]
    assert any("8.00x one expert" in t for t in notes)
    # an analytic size that differs from the measured one is a bar of its own, named so
    different = {**weights, "one_expert": weights["one-expert"] + 1024}
    assert "one expert (analytic)" in plots.weight_names(different).values()


@pytest.mark.parametrize("name", ["scaling-tiny-vit-32.json", "scaling-ViT-B-32.json"])
def test_scaling_shows_megabytes_and_the_goals_ratio(name):
    record = _record(name)
    tasks = [str(r["tasks"]) for r in record["results"]]
    latency, size, ratio = scaling.figure(record).axes
    for ax in (latency, size, ratio):
        assert _labels(ax.xaxis) == tasks
    assert "(MB)" in size.get_ylabel() and "(ms)" in latency.get_ylabel()
    for ax in (latency, size):  # plain numbers, never 6e7 or 10^8
        ticks = _labels(ax.yaxis)
        assert ticks and all("e" not in t and "$" not in t for t in ticks)
    assert ratio.get_yscale() == "linear"
    drawn = {line.get_label(): list(line.get_ydata()) for line in _lines(ratio)}
    for goal, (_, label) in scaling.GOAL_LINES.items():
        assert drawn[label] == [r["ratios"][goal]["latency"] for r in record["results"]]
    limits = {line.get_ydata()[0] for line in ratio.get_lines() if line.get_linestyle() == ":"}
    assert limits == set(scaling.GOALS.values())


def test_sweep_ticks_are_the_swept_steps():
    record = _record("surgery-sweep-tiny-vit-32.json")
    fig = sweep.figure(record)
    for ax, method in zip(fig.axes, sweep.METHODS):
        steps = sorted({p["steps"] for p in record["tune"] if p["method"] == method})
        assert _labels(ax.xaxis) == [str(s) for s in steps]  # 500, not 2^9
        labels = [line.get_label() for line in _lines(ax)]
        assert len(set(labels)) == len(labels)
        assert any(label.startswith("retuned:") for label in labels)


def test_replot_redraws_a_record_beside_it(engine_record, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(plots, "save", lambda fig, path: saved.append(path) or path)
    path = tmp_path / "engine-tiny-vit-32.json"
    path.write_text(json.dumps(engine_record))
    assert [p.name for p in replot.replot(path)] == [
        "engine-tiny-vit-32-latency.png",
        "engine-tiny-vit-32-weights.png",
    ]
    assert saved[0].parent == tmp_path  # beside the record
    seeds = tmp_path / "demo-seeds.json"
    seeds.write_text(json.dumps({"benchmark": "demo-seeds"}))
    assert replot.replot(seeds) == []  # a benchmark without plots

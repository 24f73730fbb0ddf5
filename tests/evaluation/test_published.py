"""The shipped reference figures: every average recomputed from its cells, every row sourced."""

from __future__ import annotations

import json

import pytest

from surgery_edge.evaluation.published import TABLES, published_names, published_table
from surgery_edge.evaluation.report import markdown


def _printed_precision(value: float) -> float:
    """One unit in the last printed place: 0.1 for ``88.9``, 0.01 for ``86.10``."""
    text = json.dumps(value)
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 10.0**-decimals


def _raw_rows():
    raw = json.loads(TABLES.read_text(encoding="utf-8"))
    return [(name, row) for name, table in raw.items() for row in table["rows"]]


@pytest.mark.parametrize(
    ("name", "row"), _raw_rows(), ids=lambda v: getattr(v, "get", str)("label")
)
def test_every_average_agrees_with_its_cells_or_says_why_not(name, row):
    table = published_table(name)
    assert row.get("source"), "each row names its own source"
    if row.get("per_task") is None:  # an average-only row
        assert isinstance(row.get("avg"), float) and 0 < row["avg"] <= 100
        return
    assert len(row["per_task"]) == len(table["tasks"])
    assert all(0 <= v <= 100 for v in row["per_task"])
    if "avg" not in row:
        assert "avg_differs" not in row  # nothing printed, nothing to differ from
        return
    computed = sum(row["per_task"]) / len(row["per_task"])
    # a printed average is the mean of unrounded cells, rounded: it may differ from the mean of
    # the printed cells by the rounding of both, at most one unit in its last place
    off = abs(computed - row["avg"]) > _printed_precision(row["avg"]) + 1e-9
    assert off == ("avg_differs" in row), (
        f"{row['label']}: cells average {computed:.3f}, printed {row['avg']}"
        + ("" if off else " (an avg_differs note on a row that agrees is stale)")
    )


def test_tall_masks_rows_use_dtd_figures_that_match_the_published_expert_averages():
    for name in published_names():
        if "tall" not in name:
            continue
        rows = {r["label"]: r for r in published_table(name)["rows"]}
        ours = rows["Individual (TALL-masks checkpoints)"]
        assert ours["per_task"]["DTD"] < 90  # the file's test figure (97.98 / 98.51) is an error
        # with the validation figure, the average meets the one SyMerge's page prints
        assert ours["computed_avg"] == pytest.approx(
            rows["Individual (SyMerge's table)"]["avg"], abs=0.15
        )


def test_both_sources_of_b32_adamerging_with_surgery_are_shown():
    rows = [
        r
        for r in published_table("paper_vit_b32")["rows"]
        if (r["method"], r["surgery"]) == ("adamerging_layerwise", "surgery")
    ]
    assert sorted(r["avg"] for r in rows) == [86.1, 87.5]
    assert len({r["source"] for r in rows}) == 2


def test_the_report_numbers_each_rows_source(tmp_path):
    from surgery_edge.evaluation.published import beside

    table = published_table("paper_vit_b32_tall14")
    tasks = ["MNIST", "DTD"]
    cells = {"MNIST": 99.0, "DTD": 80.0}
    measured = [{"method": "individual", "surgery": "none", "per_task": cells, "avg": 89.5}]
    report = {
        "suite": "disk",
        "arch": "ViT-B-32",
        "tasks": tasks,
        "results": [],
        "reference": {
            "name": table["name"],
            "source": table["source"],
            "rows": beside(measured, tasks, table),
        },
    }
    md = markdown(report)
    sources = [ln for ln in md.splitlines() if ln[:3] in {f"{i}. " for i in range(1, 10)}]
    assert len(sources) == 3  # FusionBench, TALL-masks, SyMerge
    assert any("SyMerge project page" in s for s in sources)
    line = next(ln for ln in md.splitlines() if ln.startswith("| Surgery w/ AdaMerging ["))
    assert "– / 84.6" in line and "– / –" in line  # average only
    line = next(ln for ln in md.splitlines() if ln.startswith("| Individual (FusionBench"))
    assert "99.0 / 99.6" in line

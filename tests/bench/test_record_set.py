"""write_record_set: a benchmark's JSON, Markdown and plot, side by side, each written whole."""

from __future__ import annotations

import json

from surgery_edge.bench.report import write_record_set


def test_writes_json_markdown_and_plot_under_one_stem(tmp_path):
    plotted = []
    record = {"benchmark": "x", "value": 1.5}
    path = write_record_set(
        tmp_path / "new", "bench-x", record, ["# X", "", "| a |"], lambda r, p: plotted.append(p)
    )
    assert path == tmp_path / "new" / "bench-x.json"
    assert json.loads(path.read_text()) == record
    assert (tmp_path / "new" / "bench-x.md").read_text() == "# X\n\n| a |\n"
    assert plotted == [tmp_path / "new" / "bench-x.png"]
    write_record_set(tmp_path, "y", record, "as given\n")  # a string is written as it is
    assert (tmp_path / "y.md").read_text() == "as given\n" and not (tmp_path / "y.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "y.json", "y.md"]

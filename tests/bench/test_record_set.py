"""write_record_set: a benchmark's JSON, Markdown and plot, side by side, each written whole,
with where the record comes from (commit, command, machine, load, date)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from surgery_edge.bench.report import write_record_set

ROOT = Path(__file__).resolve().parents[2]


def test_writes_json_markdown_and_plot_under_one_stem(tmp_path):
    plotted = []
    record = {"benchmark": "x", "value": 1.5}
    path = write_record_set(
        tmp_path / "new", "bench-x", record, ["# X", "", "| a |"], lambda r, p: plotted.append(p)
    )
    assert path == tmp_path / "new" / "bench-x.json"
    assert json.loads(path.read_text()) == record  # with its provenance, added in place
    assert (tmp_path / "new" / "bench-x.md").read_text().startswith("# X\n\n| a |\n\nMade at ")
    assert plotted == [tmp_path / "new" / "bench-x.png"]
    write_record_set(tmp_path, "y", record, "as given\n")  # a string is written as it is
    assert (tmp_path / "y.md").read_text().startswith("as given\n\nMade at commit ")
    assert not (tmp_path / "y.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "y.json", "y.md"]


def test_every_record_says_where_it_comes_from(tmp_path):
    record = {"benchmark": "x", "command": "python benchmarks/x.py --out here"}
    made = json.loads(write_record_set(tmp_path, "x", record, "# X").read_text())["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", made["commit"])  # this checkout's HEAD
    assert isinstance(made["dirty"], bool) and made["command"] == record["command"]
    assert made["machine"]["cores"] >= 1 and made["machine"]["cpu"]
    assert len(made["load_before"]) == len(made["load_after"]) == 3
    assert datetime.fromisoformat(made["date"]).tzinfo is not None
    line = (tmp_path / "x.md").read_text().splitlines()[-1]
    assert made["commit"] in line and record["command"] in line and made["date"] in line


def test_the_committed_records_each_name_their_commit():
    """A record measured by this code names its commit; an older one, the commit that committed
    it (from the git log of the file: ``committed_at``), never passed off as the measured one."""
    records = sorted((ROOT / "benchmarks" / "results").rglob("*.json"))
    assert records
    for path in records:
        made = json.loads(path.read_text()).get("provenance") or {}
        commit = made.get("commit") or made.get("committed_at")
        assert commit and re.fullmatch(r"[0-9a-f]{40}", commit), path
        if "commit" in made:  # measured here: the whole provenance
            assert {"dirty", "command", "machine", "load_before", "load_after", "date"} <= set(made)

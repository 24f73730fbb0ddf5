"""A benchmark record's plots drawn again from its JSON, beside it, without measuring anything:
``python benchmarks/replot.py benchmarks/results/cpu/*.json``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from surgery_edge.bench import scaling, sweep
from surgery_edge.bench.plots import engine_results, write_plots


def replot(path: Path) -> list[Path]:
    """Draw a benchmark record's plots again from its JSON, beside it (nothing is measured);
    returns the files written (none for a benchmark without plots)."""
    record = json.loads(Path(path).read_text())
    kind, folder = record.get("benchmark"), Path(path).parent
    if kind == "engine":
        rows = engine_results(record)
        return write_plots(rows, record["derived"], folder, record["arch"]["name"], record["label"])
    if kind == "task-scaling":
        return [scaling.plot(record, Path(path).with_suffix(".png"))]
    if kind == "surgery-sweep":
        return [sweep.plot(record, Path(path).with_suffix(".png"))]
    return []


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """``python benchmarks/replot.py RECORD.json ...``: each record's plots drawn again."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/replot.py",
        description="Draw the plots of benchmark records again from their JSON, beside them "
        "(nothing is measured; records of benchmarks without plots are skipped).",
    )
    parser.add_argument("records", nargs="+", type=Path, help="engine-, scaling- or sweep JSON")
    written = []
    for path in parser.parse_args(argv).records:
        written += replot(path)
    print("written: " + (", ".join(map(str, written)) or "nothing"))
    return written

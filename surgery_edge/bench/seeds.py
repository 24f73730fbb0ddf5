"""The demo's accuracy table over several seeds: the mean and the spread of every row.

    make demo                                   # seed 0, into runs/demo
    for s in 1 2; do
        echo "seed: $s" > /tmp/seed$s.yaml
        .venv/bin/surgery-edge demo --config /tmp/seed$s.yaml --out runs/demo-seed$s
    done
    python benchmarks/demo_seeds.py runs/demo runs/demo-seed1 runs/demo-seed2 \
        --out benchmarks/results/cpu

Each run is a finished demo (its ``report.json``); they must differ in ``seed`` alone (the
suite's images are the same: ``suite.seed`` is its own setting). Writes ``demo-seeds.json`` and
``demo-seeds.md``: per merge and surgery, the test accuracy averaged over the tasks for every
seed, their mean, and the spread (max - min, and the sample standard deviation), plus the share
of the merged-to-experts gap each surgery closes, and each run's wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery_edge.bench.report import command_line, table, write_record_set
from surgery_edge.surgery.methods import surgery_names

SURGERIES = tuple(surgery_names(with_none=True))


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished demo runs (one per seed)")
    p.add_argument("--out", type=Path, default=None, help="folder for the record")
    p.add_argument(
        "--name", default="demo-seeds", help="the record's file name, without .json / .md"
    )
    return p


def _read(run: Path) -> tuple[dict, dict]:
    try:
        report = json.loads((run / "report.json").read_text())
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{run} is not a finished run ({e}); run the demo there first.") from None
    return report, config


def _same_but_seed(configs: list[dict], runs: list[Path]) -> None:
    first = {k: v for k, v in configs[0].items() if k not in ("seed", "device")}
    for run, config in zip(runs[1:], configs[1:]):
        other = {k: v for k, v in config.items() if k not in ("seed", "device")}
        if other != first:
            keys = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise SystemExit(f"{run} differs from {runs[0]} in {keys}, not in seed alone.")


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "spread": max(values) - min(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def summarise(runs: Sequence[Path]) -> dict[str, Any]:
    """Every row of the runs' reports, across their seeds."""
    runs = list(runs)
    reports, configs = zip(*(_read(r) for r in runs))
    _same_but_seed(list(configs), runs)
    seeds = [c["seed"] for c in configs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"the runs repeat a seed: {seeds}")
    rows: dict[tuple[str, str], list[float]] = {}
    for report in reports:
        for row in report["results"]:
            rows.setdefault((row["method"], row["surgery"]), []).append(row["avg"])
    incomplete = [k for k, v in rows.items() if len(v) != len(runs)]
    if incomplete:
        raise SystemExit(f"rows {incomplete} are missing from some runs' reports")
    out = []
    for (method, surgery), values in rows.items():
        entry = {"method": method, "surgery": surgery, "per_seed": values, **_stats(values)}
        if surgery != "none" and (method, "none") in rows:
            closed = [
                (v - m) / (e - m)
                for v, m, e in zip(values, rows[(method, "none")], rows[("individual", "none")])
            ]
            entry["gap_closed"] = _stats(closed)
        out.append(entry)
    return {
        "benchmark": "demo-seeds",
        "runs": [str(r) for r in runs],
        "seeds": seeds,
        "arch": reports[0]["arch"],
        "seconds": [r.get("timings_s", {}).get("total") for r in reports],
        "rows": out,
    }


def markdown(record: dict[str, Any]) -> list[str]:
    seeds = record["seeds"]
    lines = [
        f"# The demo over seeds {', '.join(map(str, seeds))} ({record['arch']})",
        "",
        f"`{record['command']}`",
        "",
        "Average test accuracy (%) over the tasks; mean over the seeds, then min-max. Gap "
        "closed: the share of the merged-to-experts gap a surgery closes (mean, min-max).",
        "",
    ]
    by = {(r["method"], r["surgery"]): r for r in record["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in record["rows"]))

    def cell(key):
        r = by.get(key)
        return "" if r is None else f"{r['mean']:.1f} ({r['min']:.1f}-{r['max']:.1f})"

    def closed(key):
        r = by.get(key)
        if r is None or "gap_closed" not in r:
            return ""
        g = r["gap_closed"]
        return f"{100 * g['mean']:.0f}% ({100 * g['min']:.0f}-{100 * g['max']:.0f})"

    body = [
        [
            m,
            *(cell((m, s)) for s in SURGERIES),
            *(closed((m, s)) for s in surgery_names()),
        ]
        for m in methods
    ]
    lines += table(
        [
            "merge method",
            "merged",
            "w/ Surgery (V1)",
            "w/ SurgeryV2",
            "V1 gap closed",
            "V2 gap closed",
        ],
        body,
    )
    per_seed = [
        [f"{r['method']} / {r['surgery']}", *(f"{v:.2f}" for v in r["per_seed"])]
        for r in record["rows"]
    ]
    lines += ["", "## Every seed", ""]
    lines += table(["row", *(f"seed {s}" for s in seeds)], per_seed)
    secs = ", ".join("—" if s is None else f"{s:.0f} s" for s in record["seconds"])
    lines += ["", f"Wall-clock time of each run (this machine's CPU): {secs}."]
    return lines


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not args.name or args.name != Path(args.name).name or args.name in (".", ".."):
        parser.error(f"--name {args.name!r}: a file name without a folder, e.g. demo-seed0")
    record = summarise(args.runs)
    record["command"] = command_line(argv, prog or f"{__name__}.main")
    if args.out is not None:
        write_record_set(args.out, args.name, record, markdown(record))
    print("\n".join(markdown(record)))
    return record

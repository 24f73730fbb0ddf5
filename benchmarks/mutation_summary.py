"""The summary of a mutation run (``make mutate``): per module, mutants, killed, survived, timeouts.

    python benchmarks/mutation_summary.py --out benchmarks/results/cpu

Reads what mutmut left under ``mutants/`` (one ``<module>.py.meta`` per mutated module: each
mutant's exit code) and writes ``mutation.json`` and ``mutation.md`` with the record's
provenance (commit, command, machine, load, date). A mutant is killed when a test failed with it
(mutmut's exit codes 1 and 3), survived when every test it ran passed (0), a timeout when its
tests ran past mutmut's limit; "no tests" are mutants in code no selected test reaches. The
score is killed / (mutants - no tests - skipped): how many of the mutants the tests reach they
catch. ``--survivors`` lists the surviving mutants' names (``mutmut show NAME`` prints one).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from surgery_edge.bench.report import command_line, table, write_record_set

STATUS = {1: "killed", 3: "killed", 0: "survived", 33: "no tests", 5: "no tests", 34: "skipped"}
TIMEOUTS = {36, 24, -24, 152, 255}


def status(code: int | None) -> str:
    """mutmut's exit code of a mutant as one of the summary's columns."""
    if code is None:
        return "not run"
    if code in TIMEOUTS:
        return "timeout"
    return STATUS.get(code, "suspicious")


def summarise(folder: Path) -> dict:
    """Per module (``surgery_edge/...py``): the mutants' counts by status, and the survivors."""
    modules = {}
    for meta in sorted(Path(folder).rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = str(meta.relative_to(folder)).removesuffix(".meta")
        counts = Counter(status(c) for c in codes.values())
        reached = len(codes) - counts["no tests"] - counts["skipped"] - counts["not run"]
        modules[module] = {
            "mutants": len(codes),
            **{k: counts[k] for k in ("killed", "survived", "timeout", "no tests", "not run")},
            "suspicious": counts["suspicious"],
            "score": round(100.0 * (counts["killed"] + counts["timeout"]) / reached, 1)
            if reached
            else None,
            "score_all": round(
                100.0 * (counts["killed"] + counts["timeout"]) / (len(codes) - counts["not run"]),
                1,
            )
            if len(codes) > counts["not run"]
            else None,
            "survivors": sorted(k for k, c in codes.items() if status(c) == "survived"),
        }
    return modules


COLUMNS = ("mutants", "killed", "survived", "timeout", "no tests", "not run", "suspicious")


def markdown(record: dict) -> list[str]:
    total = record["total"]
    lines = [
        "# Mutation testing (`make mutate`, mutmut)",
        "",
        f"Mutants run by `{record['mutation_command']}` (mutmut {record['tool_version']}), "
        f"summarised by `{record['command']}`.",
        "",
        "Each mutant ran the tests of the listed test files that executed the function it "
        "changes (mutmut's per-function selection; the tests that need the tiny run are left to "
        "`make test`). Score: (killed + timeouts) / mutants the tests reach; of all: / every "
        "mutant run, the unreached ones (no tests) counted as missed.",
        "",
    ]

    def pct(x):
        return "—" if x is None else f"{x:.1f}%"

    rows = [
        [m, *(str(v[c]) for c in COLUMNS), pct(v["score"]), pct(v["score_all"])]
        for m, v in record["modules"].items()
    ]
    rows.append(
        ["all", *(str(total[c]) for c in COLUMNS), pct(total["score"]), pct(total["score_all"])]
    )
    notes = ["", record["notes"].rstrip("\n")] if record.get("notes") else []
    return lines + table(["module", *COLUMNS, "score", "of all"], rows) + notes


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's folder")
    p.add_argument("--out", type=Path, help="folder for mutation.json / .md")
    p.add_argument("--survivors", action="store_true", help="print the surviving mutants")
    p.add_argument("--ran", default="make mutate", help="the command that ran the mutants")
    p.add_argument(
        "--notes", type=Path, help="Markdown appended to the summary (survivors' reasons)"
    )
    args = p.parse_args(argv)
    modules = summarise(args.mutants)
    total = {c: sum(v[c] for v in modules.values()) for c in COLUMNS}
    reached = total["mutants"] - total["no tests"] - total["not run"]
    total["score"] = round(100.0 * (total["killed"] + total["timeout"]) / max(reached, 1), 1)
    ran = total["mutants"] - total["not run"]
    total["score_all"] = round(100.0 * (total["killed"] + total["timeout"]) / max(ran, 1), 1)
    record = {
        "benchmark": "mutation",
        "tool": "mutmut",
        "tool_version": version("mutmut"),
        "mutation_command": args.ran,
        "command": command_line(argv, "python benchmarks/mutation_summary.py"),
        "modules": modules,
        "total": total,
    }
    if args.notes:
        record["notes"] = args.notes.read_text()
    if args.survivors:
        print("\n".join(s for v in modules.values() for s in v["survivors"]))
    if args.out:
        write_record_set(args.out, "mutation", record, markdown(record))
    print("\n".join(markdown(record)))
    return record


if __name__ == "__main__":
    main()

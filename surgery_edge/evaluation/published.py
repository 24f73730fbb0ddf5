"""Published per-task accuracies, printed beside a run's own figures.

The figures live in ``published.json`` beside this module (one table per name, each with its
source). Sources of the shipped tables:
- ``paper_vit_b32`` / ``paper_vit_l14`` (the eight tasks): ``reference/paper_results.md`` of the
  design notes: the AdaMerging / Surgery papers' tables for the baselines, and the
  Representation Surgery authors' logs (step 500) for the "w/ Surgery" rows. No public per-task
  figures exist for SurgeryV2.
- ``paper_vit_{b32,l14}_tall{14,20}``: FusionBench's documentation, the zero-shot and fine-tuned
  accuracies of its own experts on the twenty tasks (the 14-task tables are the first fourteen
  columns), and the TALL-masks authors' recorded accuracies of their fine-tuned checkpoints (the
  ones these recipes import). No merged figures on these suites were verified, so none are
  attached.
Accuracy in percent.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from surgery_edge.errors import ConfigError

TABLES = Path(__file__).with_name("published.json")


@cache
def _tables() -> dict[str, Any]:
    return json.loads(TABLES.read_text(encoding="utf-8"))


def published_names() -> list[str]:
    return sorted(_tables())


def published_table(name: str) -> dict[str, Any]:
    """``{"name", "source", "tasks", "rows": [{"method", "surgery", "label", "per_task", "avg"}]}``
    with ``per_task`` keyed by task name."""
    tables = _tables()
    if name not in tables:
        raise ConfigError(f"Unknown reference {name!r}; known: {published_names()}.")
    table = tables[name]
    tasks = table["tasks"]
    rows = [
        {
            "method": row["method"],
            "surgery": row["surgery"],
            "label": row["label"],
            "per_task": dict(zip(tasks, row["per_task"], strict=True)),
            "avg": round(sum(row["per_task"]) / len(row["per_task"]), 2),
        }
        for row in table["rows"]
    ]
    return {"name": name, "source": table["source"], "tasks": list(tasks), "rows": rows}


def beside(report_rows: list[dict], tasks: list[str], reference: dict) -> list[dict]:
    """Measured and published rows matched by (method, surgery); tasks matched by name
    (case-insensitive, a ``Val`` suffix ignored). Rows missing on either side are kept."""

    def key(t: str) -> str:
        return t.lower().removesuffix("val")

    ref_tasks = {key(t): t for t in reference["tasks"]}
    measured = {(r["method"], r["surgery"]): r for r in report_rows}
    out = []
    for ref in reference["rows"]:
        m = measured.get((ref["method"], ref["surgery"]))
        per_task = {}
        for t in tasks:
            pt = ref_tasks.get(key(t))
            per_task[t] = {
                "measured": None if m is None else m["per_task"].get(t),
                "published": None if pt is None else ref["per_task"][pt],
            }
        out.append(
            {
                "label": ref["label"],
                "method": ref["method"],
                "surgery": ref["surgery"],
                "per_task": per_task,
                "measured_avg": None if m is None else m["avg"],
                "published_avg": ref["avg"],
            }
        )
    return out

"""Published accuracies, printed beside a run's own figures.

The figures live in ``published.json`` beside this module: one table per name, its task names,
and its rows. A row holds a method and surgery (matched with a run's rows), a label, the
per-task accuracies (``per_task``, one per task, or ``null`` where the source prints only an
average), the average the source prints (``avg``, where it prints one) and its ``source``: rows
of one table come from different places. ``avg_differs`` explains a row whose printed average
disagrees with the average of its own cells (a discrepancy in the source, kept as printed);
``tests/evaluation/test_published.py`` recomputes every average and requires that explanation
wherever the two differ by more than the printed precision.

Sources of the shipped tables:
- ``paper_vit_b32`` / ``paper_vit_l14`` (the eight tasks): ``reference/paper_results.md`` of the
  design notes: the AdaMerging / Surgery papers' tables for the baselines, and the
  Representation Surgery authors' logs (step 500) for the "w/ Surgery" rows; on ViT-B/32 also
  the 87.5 that the SyMerge page (and some papers) quote for AdaMerging w/ Surgery, beside the
  authors' log's 86.10. No public per-task figures exist for SurgeryV2.
- ``paper_vit_{b32,l14}_tall{14,20}``: FusionBench's documentation (zero-shot and its own
  experts, per task; the 14-task tables are the first fourteen columns), the TALL-masks
  authors' recorded accuracies of their fine-tuned checkpoints (the ones these recipes import;
  DTD from their validation figure, see the row's source), and the SyMerge project page's
  averages (individual experts, task arithmetic, Ties, AdaMerging, Surgery and ProbSurgery w/
  AdaMerging, EMR-Merging, SyMerge).
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
    """``{"name", "source", "tasks", "rows"}``; each row ``{"method", "surgery", "label",
    "per_task", "avg", "computed_avg", "source", "avg_differs"}`` with ``per_task`` keyed by
    task name (``None`` for a row the source gives as an average only), ``avg`` the source's
    printed average where it prints one (else the average of the cells) and ``computed_avg``
    the average of the cells (``None`` without cells)."""
    tables = _tables()
    if name not in tables:
        raise ConfigError(f"Unknown reference {name!r}; known: {published_names()}.")
    table = tables[name]
    tasks = table["tasks"]
    rows = []
    for row in table["rows"]:
        cells = row.get("per_task")
        computed = None if cells is None else round(sum(cells) / len(cells), 2)
        rows.append(
            {
                "method": row["method"],
                "surgery": row["surgery"],
                "label": row["label"],
                "per_task": None if cells is None else dict(zip(tasks, cells, strict=True)),
                "avg": row.get("avg", computed),
                "computed_avg": computed,
                "source": row.get("source", table["source"]),
                "avg_differs": row.get("avg_differs"),
            }
        )
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
                "published": None if pt is None or ref["per_task"] is None else ref["per_task"][pt],
            }
        out.append(
            {
                "label": ref["label"],
                "method": ref["method"],
                "surgery": ref["surgery"],
                "per_task": per_task,
                "measured_avg": None if m is None else m["avg"],
                "published_avg": ref["avg"],
                "source": ref["source"],
            }
        )
    return out

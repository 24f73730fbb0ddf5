"""Published eight-task accuracies, printed beside a run's own figures.

Source: ``reference/paper_results.md`` of the design notes: the AdaMerging / Surgery papers'
tables for the baselines, and the Representation Surgery authors' logs (step 500) for the
"w/ Surgery" rows. No public per-task figures exist for SurgeryV2. Accuracy in percent, task
order SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD.
"""

from __future__ import annotations

from typing import Any

TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")

# (method, surgery) as this project names the report's rows -> (label, per-task accuracies).
_VIT_B32 = {
    ("individual", "none"): ("Individual", (75.3, 77.7, 96.1, 99.7, 97.5, 98.7, 99.7, 79.4)),
    ("traditional_mtl", "none"): (
        "Traditional MTL",
        (73.9, 74.4, 93.9, 98.2, 95.8, 98.9, 99.5, 77.9),
    ),
    ("weight_averaging", "none"): (
        "Weight Averaging",
        (65.3, 63.4, 71.4, 71.7, 64.2, 52.8, 87.5, 50.1),
    ),
    ("task_arithmetic", "none"): (
        "Task Arithmetic",
        (55.2, 54.9, 66.7, 78.9, 80.2, 69.7, 97.3, 50.4),
    ),
    ("ties_merging", "none"): ("Ties-Merging", (59.8, 58.6, 70.7, 79.7, 86.2, 72.1, 98.3, 54.2)),
    ("adamerging_layerwise", "none"): (
        "Layer-wise AdaMerging",
        (64.5, 68.1, 79.2, 93.8, 87.0, 91.9, 97.5, 59.1),
    ),
    ("weight_averaging", "surgery"): (
        "WA w/ Surgery",
        (67.63, 64.64, 85.84, 96.81, 76.93, 82.98, 97.83, 67.39),
    ),
    ("task_arithmetic", "surgery"): (
        "TA w/ Surgery",
        (63.83, 59.98, 83.32, 97.93, 87.02, 87.09, 98.67, 69.47),
    ),
    ("ties_merging", "surgery"): (
        "Ties w/ Surgery",
        (69.82, 66.17, 87.38, 97.52, 86.77, 87.63, 98.51, 71.65),
    ),
    ("adamerging_layerwise", "surgery"): (
        "AdaMerging w/ Surgery",
        (69.85, 71.04, 88.94, 98.19, 91.76, 96.52, 98.84, 73.67),
    ),
}
_VIT_L14 = {
    ("individual", "none"): ("Individual", (82.3, 92.4, 97.4, 100.0, 98.1, 99.2, 99.7, 84.1)),
    ("traditional_mtl", "none"): (
        "Traditional MTL",
        (80.8, 90.6, 96.3, 96.3, 97.6, 99.1, 99.6, 84.4),
    ),
    ("weight_averaging", "none"): (
        "Weight Averaging",
        (72.1, 81.6, 82.6, 91.9, 78.2, 70.7, 97.1, 62.8),
    ),
    ("task_arithmetic", "none"): (
        "Task Arithmetic",
        (73.9, 82.1, 86.6, 94.1, 87.9, 86.7, 98.9, 65.6),
    ),
    ("ties_merging", "none"): ("Ties-Merging", (76.5, 85.0, 89.3, 95.7, 90.3, 83.3, 99.0, 68.8)),
    ("adamerging_layerwise", "none"): (
        "AdaMerging",
        (79.0, 90.3, 90.8, 96.2, 93.4, 98.0, 99.0, 79.9),
    ),
    ("weight_averaging", "surgery"): (
        "WA w/ Surgery",
        (73.78, 83.91, 92.08, 98.41, 82.49, 86.39, 98.79, 71.91),
    ),
    ("task_arithmetic", "surgery"): (
        "TA w/ Surgery",
        (75.76, 84.48, 93.16, 98.89, 91.32, 93.45, 99.19, 76.12),
    ),
    ("ties_merging", "surgery"): (
        "Ties w/ Surgery",
        (76.58, 85.86, 93.76, 99.30, 89.74, 92.00, 99.13, 78.19),
    ),
    ("adamerging_layerwise", "surgery"): (
        "AdaMerging w/ Surgery",
        (80.38, 90.90, 94.40, 98.30, 94.13, 98.70, 99.21, 82.50),
    ),
}
PUBLISHED = {"paper_vit_b32": _VIT_B32, "paper_vit_l14": _VIT_L14}
SOURCES = {
    "paper_vit_b32": "Surgery (ICML 2024) / AdaMerging tables and the Surgery authors' logs, "
    "CLIP ViT-B/32",
    "paper_vit_l14": "Surgery (ICML 2024) / AdaMerging tables and the Surgery authors' logs, "
    "CLIP ViT-L/14",
}


def published_table(name: str) -> dict[str, Any]:
    """``{"source", "tasks", "rows": [{"method", "surgery", "label", "per_task", "avg"}]}``."""
    from surgery_edge.errors import ConfigError

    if name not in PUBLISHED:
        raise ConfigError(f"Unknown reference {name!r}; known: {sorted(PUBLISHED)}.")
    rows = []
    for (method, surgery), (label, values) in PUBLISHED[name].items():
        per_task = dict(zip(TASKS, values, strict=True))
        rows.append(
            {
                "method": method,
                "surgery": surgery,
                "label": label,
                "per_task": per_task,
                "avg": round(sum(values) / len(values), 2),
            }
        )
    return {"name": name, "source": SOURCES[name], "tasks": list(TASKS), "rows": rows}


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

"""The report's plots say what they show: labelled axes, legends outside the data, titles that
do not collide, and a caption where one curve hides another."""

from __future__ import annotations

import pytest

from surgery_edge.evaluation import report as report_module

TASKS = ["digits", "shapes", "colours"]


def _row(method, surgery, values):
    per_task = dict(zip(TASKS, values))
    return {"method": method, "surgery": surgery, "per_task": per_task, "avg": sum(values) / 3}


REPORT = {
    "tasks": TASKS,
    "results": [
        _row("individual", "none", [95.0, 90.0, 99.0]),
        _row("task_arithmetic", "none", [40.0, 50.0, 30.0]),
        _row("task_arithmetic", "surgery", [60.0, 70.0, 50.0]),
        _row("task_arithmetic", "surgeryv2", [85.0, 80.0, 90.0]),
    ],
    "representation_bias": {
        "task_arithmetic": {
            "none": {"block.0": 0.4, "block.1": 0.6, "final": 1.4},
            "surgery": {"block.0": 0.4, "block.1": 0.6, "final": 0.9},  # V1: final site only
            "surgeryv2": {"block.0": 0.2, "block.1": 0.3, "final": 0.5},
        }
    },
}


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would save."""
    saved = []
    monkeypatch.setattr(report_module, "_save_fig", lambda fig, path: saved.append(fig))
    return saved


def _texts(fig):
    return [t.get_text() for t in fig.texts]


def test_accuracy_plot_labels_and_legend(figures, tmp_path):
    report_module.plot_accuracy(REPORT, tmp_path / "a.png")
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_ylabel() == "accuracy (%)"
    assert ax.get_title(loc="left").startswith("task_arithmetic: average merged 40.0")
    assert ax.get_legend() is None and fig.legends  # one legend, outside the panels
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(names) == sorted(
        ["merged", "w/ Surgery", "w/ SurgeryV2", "experts (one model per task)"]
    )


def test_bias_plot_names_the_hidden_curve(figures, tmp_path):
    report_module.plot_bias(REPORT, tmp_path / "b.png")
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_ylabel() == "mean L1 distance to the experts"
    assert ax.get_legend() is None and fig.legends
    (caption,) = [t for t in _texts(fig) if "equals merged" in t]
    assert "w/ Surgery equals merged at block.0 to block.1" in caption
    assert "corrects only the final site" in caption
    assert "SurgeryV2" not in caption  # its curve hides nothing
    title = fig._suptitle  # above the panels, not over their titles
    assert title.get_position()[1] > ax.get_position().y1

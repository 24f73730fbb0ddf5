"""The evaluation stage: accuracy of the pretrained model, the experts, every merge and every
surgery, and the representation bias; the report's content."""

from __future__ import annotations

from surgery_edge import __version__
from surgery_edge.evaluation.accuracy import average, routed_accuracy
from surgery_edge.evaluation.bias import representation_bias
from surgery_edge.evaluation.report import row_name
from surgery_edge.progress import progress_bar
from surgery_edge.run.state import Run
from surgery_edge.run.surgery import expert_representations
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.methods import NONE


def evaluate(run: Run) -> dict:
    """Accuracy rows for pretrained, experts, merges and surgeries, plus representation bias."""
    rows = []

    def row(method, surgery, per_task):
        rows.append(
            {"method": method, "surgery": surgery, "per_task": per_task, "avg": average(per_task)}
        )

    methods = run.config.surgery.methods
    pairs = [(m, s) for m in run.merged for s in methods if (m, s) in run.adapters]
    for path in run.merged.values():  # every checkpoint as the run made it, before any work
        run.verify(path, explain=run.as_encoder)
    for merge, method in pairs:
        run.verify(
            run.adapters[(merge, method)],
            explain=lambda p, m=method: AdapterBank.load(p, run.arch, run.tasks, method=m),
        )
    total = 1 + len(run.tasks) + len(run.merged) + len(pairs)  # models evaluated
    with run.stage("evaluation"), progress_bar(total, "evaluation", show=run.writer) as bar:
        row(
            "pretrained",
            NONE,
            routed_accuracy(run.model(run.experts.pretrained), run.suite, run.device),
        )
        bar.advance(model="pretrained")
        experts = {}
        for t in run.tasks:
            experts[t] = _expert_accuracy(run, t)
            bar.advance(model=f"expert {t}")
        row("individual", NONE, experts)
        bias: dict[str, dict[str, dict[str, float]]] = {}
        test_images = {t: run.suite.task(t).test_x for t in run.tasks}
        expert_test = {t: expert_representations(run, t, "test")[:2] for t in run.tasks}
        for merge_name, merged_path in run.merged.items():
            model = run.model(merged_path)
            row(merge_name, NONE, routed_accuracy(model, run.suite, run.device))
            bias[merge_name] = {
                NONE: representation_bias(model, test_images, expert_test, run.device)
            }
            bar.advance(model=merge_name)
            for method in methods:
                path = run.adapters.get((merge_name, method))
                if path is None:
                    continue
                model = run.model(merged_path, path, surgery=method)
                row(merge_name, method, routed_accuracy(model, run.suite, run.device))
                bias[merge_name][method] = representation_bias(
                    model, test_images, expert_test, run.device
                )
                bar.advance(model=row_name(merge_name, method))
    return {"rows": rows, "bias": bias}


def _expert_accuracy(run: Run, task: str) -> float:
    """An expert on its own task, with its own head."""
    model = run.layout.model(run.experts.experts[task], None, [task], run.arch, run.device)
    return routed_accuracy(model, run.suite.select([task]), run.device)[task]


def report_dict(run: Run, evaluation: dict, notes: list[str] | None = None) -> dict:
    """The content of ``report.json``: the run's settings, timings and :func:`evaluate`'s rows."""
    return {
        "suite": run.suite.name,
        "arch": run.arch.name,
        "tasks": run.tasks,
        "results": evaluation["rows"],
        "representation_bias": evaluation["bias"],
        "timings_s": {k: round(v, 2) for k, v in run.timings.items()},
        "config": run.config.model_dump(mode="json"),
        "device": str(run.device),
        "version": __version__,
        "notes": notes or [],
    }

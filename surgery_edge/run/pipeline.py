"""The whole flow on a run directory: suite -> experts -> merges -> surgery -> evaluation ->
engines -> report (``surgery-edge demo`` and ``run``).

The stages are their own modules (:mod:`~surgery_edge.run.state` holds the run and prepares
its data and experts; :mod:`~surgery_edge.run.merge`, :mod:`~surgery_edge.run.surgery`,
:mod:`~surgery_edge.run.evaluate`, :mod:`~surgery_edge.run.engines`); this is the top that
calls them in order, and nothing in the library imports it.
"""

from __future__ import annotations

import time
from pathlib import Path

from surgery_edge.evaluation.published import beside, published_table
from surgery_edge.evaluation.report import write_report
from surgery_edge.run.config import RunConfig
from surgery_edge.run.engines import export_engines
from surgery_edge.run.evaluate import evaluate, report_dict
from surgery_edge.run.merge import run_merges
from surgery_edge.run.state import Run, prepare_experts, prepare_suite, unused_run_removed
from surgery_edge.run.surgery import run_surgery
from surgery_edge.surgery.methods import SURGERY_METHODS


def run_pipeline(out: str | Path, config: RunConfig, log=print, overwrite: bool = False) -> Path:
    """The whole flow in ``out``; returns report.md.

    Built-in suite: generate it, train the experts. Recipe (``data`` + ``checkpoints``): read the
    tasks from disk, import the experts. Then every merge, every surgery, the evaluation, the
    exported engines (``export: true``) and the report, with the published figures beside the
    measured ones when ``reference`` names a table. Every stage reuses up-to-date artefacts;
    artefacts made with other settings are replaced only with ``overwrite``.
    """
    t0 = time.perf_counter()
    reference = None
    if config.reference:
        reference = published_table(config.reference)  # unknown names fail before any work
    with unused_run_removed(out):  # a missing data folder leaves no run folder behind
        run = Run.create(out, config, log, overwrite=overwrite)
        log(f"device: {run.device}; arch: {run.arch.name}; run directory: {run.out}")
        prepare_suite(run)
        prepare_experts(run)
    run_merges(run)
    run_surgery(run)
    evaluation = evaluate(run)
    engines = export_engines(run) if config.export else {"skipped": "export: false"}
    run.timings["total"] = time.perf_counter() - t0
    s = config.surgery
    methods = "; ".join(
        f"{SURGERY_METHODS[m].label}: rank {p.rank}, {p.steps} steps" for m, p in s.params.items()
    )
    notes = [
        f"{methods}; batch {s.batch_size} per task, lr {s.lr}; trained on the "
        f"{'test (transductive)' if s.transductive else 'adaptation'} split, evaluated on test.",
        "Timings are wall-clock seconds of this invocation; cached stages take ~0 s.",
    ]
    report = report_dict(run, evaluation, notes)
    report["engines"] = engines
    if reference is not None:
        report["reference"] = {
            "name": reference["name"],
            "source": reference["source"],
            "rows": beside(evaluation["rows"], run.tasks, reference),
        }
    return write_report(run.out, report)["md"]

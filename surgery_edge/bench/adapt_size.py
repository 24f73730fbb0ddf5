"""How many unlabelled adaptation images surgery needs, decided on held-out images alone.

    python benchmarks/adapt_size.py --run runs/demo --sizes 400,1000,2000 --pool 2200 \
        --out benchmarks/results/cpu

On a finished run of the built-in suite: every task's adaptation split is drawn again, with
``--pool`` images (the suite's own renderer and seed; the train and test splits are untouched).
``--held`` of them, fixed by a seed, are held out; each method then trains on the first ``N`` of
the rest for every ``N`` in ``--sizes`` (on ``--merge``, at the run's own settings). The score
is the sweep's (:mod:`surgery_edge.bench.sweep`): the held-out images on which the corrected
merged model's top-1 class agrees with the task's expert, and the mean L1 distance to the
experts' features. Test accuracy is recorded beside it, never used to choose.

Writes ``adapt-size-<arch>.json`` and ``.md`` into ``--out``. CPU timings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery_edge.bench.env import environment
from surgery_edge.bench.report import command_line, fmt, table, write_record_set
from surgery_edge.bench.sweep import METHODS, _ints, _Scorer, _Split, _train_now
from surgery_edge.data.suite import Suite, TaskData, generate_suite
from surgery_edge.errors import SurgeryEdgeError
from surgery_edge.surgery.trainer import TaskTargets


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished demo run")
    p.add_argument("--merge", default="task_arithmetic", help="the merge surgery corrects")
    p.add_argument("--sizes", type=_sizes, default="400,1000,2000", help="training images per task")
    p.add_argument("--pool", type=int, default=2200, help="adaptation images drawn per task")
    p.add_argument("--held", type=int, default=200, help="of them, held out per task")
    p.add_argument("--out", type=Path, default=None, help="folder for the record")
    return p


def _sizes(text: str) -> list[int]:
    try:
        return _ints(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers such as 400,1000, got {text!r}"
        ) from None


def with_adaptation_pool(suite: Suite, pool: int) -> Suite:
    """``suite`` with every task's adaptation split redrawn at ``pool`` images."""
    tasks = [t.name for t in suite.tasks]
    big = generate_suite(suite.seed, n_train=1, n_adapt=pool, n_test=1, tasks=tasks)
    return Suite(
        suite.name,
        suite.seed,
        suite.image_size,
        [
            TaskData(
                d.name,
                d.class_names,
                d.train_x,
                d.train_y,
                big.task(d.name).adapt_x,
                d.test_x,
                d.test_y,
            )  # fmt: skip
            for d in suite.tasks
        ],
    )


def measure(run, merge: str, sizes: list[int], pool: int, held: int) -> list[dict[str, Any]]:
    from surgery_edge.run.surgery import surgery_config, training_targets  # deferred

    run.suite = with_adaptation_pool(run.suite, pool)
    split = _Split(training_targets(run, "adapt"), held / pool)
    score = _Scorer(run, split, held / pool)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            cfg = surgery_config(run, method)
            steps = cfg.steps
            for n in sizes:
                part = {
                    t: TaskTargets(v.images[:n], v.final[:n], v.blocks[:n], f"{v.digest}:{n}")
                    for t, v in split.train.items()
                }
                points, seconds = _train_now(run, merge, cfg, part, [steps], score, Path(tmp))
                p = points[steps]
                rows.append(
                    {
                        "method": method,
                        "images": n,
                        "steps": steps,
                        "lr": cfg.lr,
                        "rank": cfg.rank,
                        "heldout_agreement": p["heldout_agreement"],
                        "heldout_l1": p["heldout_l1"],
                        "test_avg": p["test_avg"],
                        "seconds": round(seconds, 1),
                    }
                )
                print(f"{method} {n} images: held-out {p['heldout_agreement']:.2f}%", flush=True)
    return rows


def markdown(record: dict[str, Any]) -> list[str]:
    lines = [
        f"# Adaptation images per task: {record['arch']}, surgery on {record['merge']}",
        "",
        f"`{record['command']}`",
        "",
        f"- {record['pool']} adaptation images drawn per task, {record['held']} of them held out "
        "(fixed); each row trains on the first N of the rest, at the run's settings",
        "- choice by held-out agreement with the experts; test accuracy recorded, not used",
        f"- CPU timings; {record['seconds']} s in all",
        "",
    ]
    rows = [
        [
            r["method"],
            str(r["images"]),
            f"{r['steps']} steps, lr {r['lr']:g}, rank {r['rank']}",
            fmt(r["heldout_agreement"], ".2f"),
            fmt(r["heldout_l1"], ".4f"),
            fmt(r["test_avg"], ".2f"),
            fmt(r["seconds"], ".1f"),
        ]
        for r in record["rows"]
    ]
    header = ["method", "images / task", "setting", "held-out agreement (%)", "held-out L1",
              "test (%)", "train s"]  # fmt: skip
    return lines + table(header, rows)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    from surgery_edge.run.state import Run  # deferred: the training stack

    args = build_parser(prog).parse_args(argv)
    sizes = args.sizes
    if not sizes or sizes[0] < 1 or sizes[-1] > args.pool - args.held or args.held < 1:
        raise SystemExit(
            f"--sizes {','.join(map(str, sizes))} must lie in 1..{args.pool - args.held} "
            "(--pool minus --held)"
        )
    start = time.perf_counter()
    try:
        run = Run.open(args.run, log=lambda *a: None)
        run.require_experts()
        run.find_merges()
    except SurgeryEdgeError as e:  # a user error: one paragraph, exit 2, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not run.config.builtin:
        raise SystemExit(f"{args.run} reads its tasks from disk: only the built-in suite redraws")
    if args.merge not in run.merged:
        raise SystemExit(f"no merge {args.merge!r} in {args.run} (found {sorted(run.merged)})")
    rows = measure(run, args.merge, sizes, args.pool, args.held)
    record = {
        "benchmark": "adapt-size",
        "arch": run.arch.name,
        "run": str(args.run),
        "command": command_line(argv, prog or f"{__name__}.main"),
        "merge": args.merge,
        "pool": args.pool,
        "held": args.held,
        "criterion": "held-out adaptation images: top-1 agreement with the task's expert (%)",
        "seconds": round(time.perf_counter() - start, 1),
        "environment": environment("cpu"),
        "rows": rows,
    }
    if args.out is not None:
        write_record_set(args.out, f"adapt-size-{run.arch.name}", record, markdown(record))
    print("\n".join(markdown(record)))
    return record

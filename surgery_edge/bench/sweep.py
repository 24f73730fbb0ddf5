"""Surgery's schedule, step size, step count and V1 rank, tuned on the adaptation split alone.

    python benchmarks/sweep_surgery.py --run runs/demo --out benchmarks/results/cpu

On a finished run (the demo's, by default): every task's adaptation images are split once
(``--holdout`` of them, drawn by a fixed seed) into a training part and a held-out part.

1. **Tune** (on ``--merge``, task arithmetic by default): for each method and each setting of
   the grid (schedule, learning rate, V1 rank), one training on the training part, scored at
   every step count of the grid (Adam's learning rate is constant, so the adapters after ``s``
   steps of a longer run are those of an ``s``-step run). The score is label-free, as the
   method is: the held-out images on which the corrected merged model's top-1 class agrees with
   the task's own expert, in percent, averaged over tasks (with the mean L1 distance to the
   experts' final features beside it). Test accuracy is recorded for every point, never used.
2. **Choose**, per method, the joint setting with the best held-out agreement (the "retuned"
   row; a tie goes to fewer steps, then the smaller rank and learning rate), and compare it with
   the current defaults and with the authors' reference schedule, still on the held-out score.
3. **Compare** on every merge of the run: each of the three settings trained on the whole
   adaptation split, as the pipeline would, with its test accuracy and the share of the
   merged-to-experts gap it closes. The current settings are the run's own: its adapter files
   are evaluated where it has them (they were trained exactly so).

Writes ``surgery-sweep-<arch>.json``, ``.md`` and ``.png`` into ``--out``. CPU timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery_edge.bench.env import environment
from surgery_edge.bench.plots import plain_ticks, save
from surgery_edge.bench.report import command_line, fmt, table, write_record_set
from surgery_edge.data.transforms import to_model_input
from surgery_edge.errors import SurgeryEdgeError
from surgery_edge.evaluation.accuracy import average, routed_accuracy
from surgery_edge.evaluation.report import pyplot
from surgery_edge.io import fingerprint, write_json_atomic
from surgery_edge.models.checkpoint import load_encoder
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.methods import SURGERY, SURGERY_V2, get_surgery, surgery_names
from surgery_edge.surgery.model import MultiTaskModel
from surgery_edge.surgery.trainer import (
    SurgeryConfig,
    TaskTargets,
    TrainingHooks,
    schedule_length,
    train_surgery,
)

METHODS = tuple(surgery_names())
REFERENCE_LR = 1e-3  # the authors' learning rate, at which the reference schedule is run


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The sweep's options."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished run")
    p.add_argument("--merge", default="task_arithmetic", help="the merge the grid is tuned on")
    p.add_argument(
        "--holdout", type=float, default=0.25, help="share of adaptation images held out"
    )
    p.add_argument("--v1-lrs", default="1e-3,3e-3,1e-2,3e-2")
    p.add_argument("--v1-steps", default="500,1000,2000")
    p.add_argument(
        "--v1-ranks",
        default="current,matched",
        help="'current': the run's; 'matched': V2's parameter count (the SurgeryV2 paper's V1)",
    )
    p.add_argument("--v2-lrs", default="1e-3,2e-3,3e-3,5e-3")
    p.add_argument("--v2-steps", default="250,500")
    p.add_argument("--reference-steps", default="250,500", help="steps per task")
    p.add_argument("--compare", default="all", help="merges to compare on: all, or a list")
    p.add_argument(
        "--max-v2-steps",
        type=int,
        default=None,
        help="longest V2 training the chosen default may take (the demo's budget)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="folder for the record")
    return p


def _floats(text: str) -> list[float]:
    return sorted({float(v) for v in text.split(",") if v.strip()})


def _ints(text: str) -> list[int]:
    return sorted({int(v) for v in text.split(",") if v.strip()})


def matched_rank(arch, rank_v2: int) -> int:
    """The V1 rank whose adapter has SurgeryV2's parameter count (304 for ViT-B/32 at rank 16,
    as the SurgeryV2 paper's V1 rerun), capped at the feature width."""
    v2 = sum(2 * arch.site_dim(s) * rank_v2 for s in get_surgery(SURGERY_V2).sites(arch))
    return min(arch.embed_dim, round(v2 / (2 * arch.embed_dim)))


class _Split:
    """Every task's adaptation targets split into a training part and a held-out part."""

    def __init__(self, targets: dict[str, TaskTargets], holdout: float, seed: int = 0):
        self.train, self.held = {}, {}
        for i, (task, t) in enumerate(targets.items()):
            order = np.random.default_rng([seed, i]).permutation(len(t.images))
            k = max(1, int(round(holdout * len(order))))
            held, train = np.sort(order[:k]), np.sort(order[k:])
            for part, rows, name in ((self.train, train, "train"), (self.held, held, "held")):
                digest = fingerprint(t.digest, name, holdout, seed)
                part[task] = TaskTargets(t.images[rows], t.final[rows], t.blocks[rows], digest)


@torch.no_grad()
def _predict(model: MultiTaskModel, task_index: int, images: np.ndarray, device) -> tuple:
    x = to_model_input(images, model.encoder.arch, device)
    ids = torch.full((len(x),), task_index, dtype=torch.long, device=device)
    z = model.features(x, ids)
    return model.routed_logits(z, ids).argmax(-1).cpu().numpy(), z.float().cpu().numpy()


class _Scorer:
    """Held-out agreement with the experts (the choice) and test accuracy (the record)."""

    def __init__(self, run, split: _Split, holdout: float):
        self.run, self.split, self.device = run, split, run.device
        self.identity = {"holdout": holdout, "version": 1}
        self.expert_top1 = {}
        for task in run.tasks:
            expert = run.layout.model(run.experts.experts[task], None, [task], run.arch, run.device)
            self.expert_top1[task] = _predict(
                expert.eval(), 0, split.held[task].images, run.device
            )[0]

    def __call__(self, model: MultiTaskModel) -> dict[str, float]:
        model.eval()
        agree, dist = {}, {}
        for i, task in enumerate(self.run.tasks):
            top1, z = _predict(model, i, self.split.held[task].images, self.device)
            agree[task] = 100.0 * float((top1 == self.expert_top1[task]).mean())
            dist[task] = float(np.abs(z - self.split.held[task].final).mean())
        test = routed_accuracy(model, self.run.suite, self.device)
        return {
            "heldout_agreement": average(agree),
            "heldout_l1": float(np.mean(list(dist.values()))),
            "test_avg": average(test),
            "test": test,
        }


def _train(run, merge: str, cfg: SurgeryConfig, targets, snapshots, score, tmp: Path):
    """Train ``cfg`` on ``targets``; score the adapters after each step count in ``snapshots``
    (steps per task). Returns ``({steps: scores}, seconds)``.

    Each result is kept in the run's ``cache/sweep/`` under the identity of everything it was
    made from (merged model, targets, settings, snapshots, scorer), so an interrupted sweep
    picks up where it stopped."""
    key = fingerprint(
        run.hashes.digest(run.merged[merge]),
        {t: v.digest for t, v in targets.items()},
        [len(v.images) for v in targets.values()],
        asdict(cfg),
        sorted(snapshots),
        score.identity,
    )
    cached = run.out / "cache" / "sweep" / f"{key}.json"
    if cached.is_file():
        found = json.loads(cached.read_text())
        return {int(k): v for k, v in found["points"].items()}, found["seconds"]
    points, seconds = _train_now(run, merge, cfg, targets, snapshots, score, tmp)
    write_json_atomic(cached, {"points": points, "seconds": seconds})
    return points, seconds


def _train_now(run, merge: str, cfg: SurgeryConfig, targets, snapshots, score, tmp: Path):
    encoder = load_encoder(run.merged[merge], run.arch).build(run.device)
    heads = run.heads()
    T = len(run.tasks)
    wanted = {schedule_length(replace(cfg, steps=s), T): s for s in snapshots}
    points: dict[int, dict] = {}

    def on_update(done: int, bank: AdapterBank) -> None:
        if done in wanted:
            model = MultiTaskModel(encoder, heads, run.tasks, copy.deepcopy(bank))
            points[wanted[done]] = score(model.to(run.device))

    start = time.perf_counter()
    train_surgery(
        encoder,
        heads,
        run.tasks,
        targets,
        replace(cfg, steps=max(snapshots), checkpoint_every=0),
        tmp / f"{merge}-{cfg.method}.safetensors",
        run.device,
        hooks=TrainingHooks(on_update=on_update, log=lambda *a: None),
    )
    return points, time.perf_counter() - start


def _grid(args, run, method: str, current: dict) -> list[tuple[SurgeryConfig, list[int]]]:
    base = SurgeryConfig(
        method=method, rank=current[method]["rank"], lr=REFERENCE_LR, seed=run.config.seed
    )
    current_steps = current[method]["steps"]
    if method == SURGERY:
        named = {
            "current": current[SURGERY]["rank"],
            "matched": matched_rank(run.arch, current[SURGERY_V2]["rank"]),
        }
        ranks = [named[r] if r in named else int(r) for r in args.v1_ranks.split(",")]
        joint = [
            (replace(base, lr=lr, rank=r), _ints(args.v1_steps))
            for r in sorted(set(ranks))
            for lr in _floats(args.v1_lrs)
        ]
    else:
        joint = [(replace(base, lr=lr), _ints(args.v2_steps)) for lr in _floats(args.v2_lrs)]
    # the authors' schedule at their learning rate, at least at the current step count
    steps = _ints(args.v1_steps if method == SURGERY else args.reference_steps)
    steps = sorted(set(steps) | {current_steps})
    return joint + [(replace(base, schedule="reference"), steps)]


def _key(cfg: SurgeryConfig, steps: int) -> dict[str, Any]:
    return {"schedule": cfg.schedule, "lr": cfg.lr, "rank": cfg.rank, "steps": steps}


def tune(args, run, split: _Split, score, current: dict, tmp: Path) -> list[dict[str, Any]]:
    """Every grid point of both methods on ``args.merge``, scored on the held-out images."""
    points = []
    for method in METHODS:
        for cfg, steps in _grid(args, run, method, current):
            scores, seconds = _train(run, args.merge, cfg, split.train, steps, score, tmp)
            for s in steps:
                points.append(
                    {"method": method, **_key(cfg, s), **scores[s], "train_seconds": seconds}
                )
            print(
                f"  {method} {cfg.schedule} lr {cfg.lr:g} rank {cfg.rank}: "
                + ", ".join(f"{s}: {scores[s]['heldout_agreement']:.2f}" for s in steps)
                + f" ({seconds:.0f} s)",
                flush=True,
            )
    return points


def choose(points: list[dict[str, Any]], current: dict[str, dict], max_v2_steps) -> dict:
    """Per method: the retuned joint setting and the held-out comparison of the three."""
    out = {}
    for method in METHODS:
        mine = [p for p in points if p["method"] == method]
        joint = [
            p
            for p in mine
            if p["schedule"] == "joint"
            and (method != SURGERY_V2 or max_v2_steps is None or p["steps"] <= max_v2_steps)
        ]
        retuned = max(
            joint, key=lambda p: (p["heldout_agreement"], -p["steps"], -p["rank"], -p["lr"])
        )

        def at(schedule, lr, rank, steps, mine=mine):
            found = [
                p
                for p in mine
                if (p["schedule"], p["lr"], p["rank"], p["steps"]) == (schedule, lr, rank, steps)
            ]
            return found[0] if found else None

        c = current[method]
        rows = {
            "current": at("joint", c["lr"], c["rank"], c["steps"]),
            "retuned": retuned,
            "reference": at("reference", REFERENCE_LR, c["rank"], c["steps"]),
        }
        best = max(
            (k for k in rows if rows[k] is not None),
            key=lambda k: (rows[k]["heldout_agreement"], k == "current"),
        )
        out[method] = {"settings": rows, "best_heldout": best}
    return out


def compare(run, choice: dict, current: dict, merges: list[str], full, score, tmp: Path):
    """Each of the three settings of each method on every merge, trained on the whole
    adaptation split, with test accuracy."""
    rows = []
    merged_rows = {
        m: average(routed_accuracy(run.model(run.merged[m]), run.suite, run.device)) for m in merges
    }
    experts = average({t: _expert_accuracy(run, t) for t in run.tasks})
    for merge in merges:
        for method in METHODS:
            for name, p in choice[method]["settings"].items():
                if p is None:
                    continue
                cfg = SurgeryConfig(
                    method=method,
                    rank=p["rank"],
                    lr=p["lr"],
                    schedule=p["schedule"],
                    seed=run.config.seed,
                )
                trained = run.adapters.get((merge, method))
                if name == "current" and trained is not None:  # the run's own adapters
                    model = run.model(run.merged[merge], trained, surgery=method)
                    scores, seconds = {p["steps"]: score(model)}, None
                else:
                    scores, seconds = _train(run, merge, cfg, full, [p["steps"]], score, tmp)
                s = scores[p["steps"]]
                gap = experts - merged_rows[merge]
                rows.append(
                    {
                        "merge": merge,
                        "method": method,
                        "setting": name,
                        **_key(cfg, p["steps"]),
                        "test_avg": s["test_avg"],
                        "test": s["test"],
                        "gap_closed": (s["test_avg"] - merged_rows[merge]) / gap if gap else None,
                        "train_seconds": seconds,
                    }
                )
                took = "the run's adapters" if seconds is None else f"{seconds:.0f} s"
                print(f"  {merge} {method} {name}: {s['test_avg']:.2f} ({took})", flush=True)
    return {"merged": merged_rows, "experts": experts, "rows": rows}


def _expert_accuracy(run, task: str) -> float:
    model = run.layout.model(run.experts.experts[task], None, [task], run.arch, run.device)
    return routed_accuracy(model, run.suite.select([task]), run.device)[task]


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Parse ``argv``, tune, choose, compare; write the record, the report and the plot."""
    from surgery_edge.run.state import Run, adaptation_split  # deferred: the training stack
    from surgery_edge.run.surgery import training_targets  # deferred: the training stack

    args = build_parser(prog).parse_args(argv)
    if not 0.0 < args.holdout < 1.0:
        raise SystemExit(f"--holdout must be between 0 and 1, got {args.holdout}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        run = Run.open(args.run, log=lambda *a: None)
    except SurgeryEdgeError as e:  # a user error: one paragraph, exit 2, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    run.require_experts()
    run.find_merges()
    run.find_adapters()  # the current settings' adapters, where the run trained them
    if args.merge not in run.merged:
        raise SystemExit(f"no merge {args.merge!r} in {args.run} (found {sorted(run.merged)})")
    merges = list(run.merged) if args.compare == "all" else args.compare.split(",")
    missing = [m for m in merges if m not in run.merged]
    if missing:
        raise SystemExit(f"no merges {missing} in {args.run} (found {sorted(run.merged)})")
    s = run.config.surgery
    current = {
        m: {"lr": s.lr, "rank": s.params[m].rank, "steps": s.params[m].steps} for m in METHODS
    }
    full = training_targets(run, adaptation_split(run))
    split = _Split(full, args.holdout)
    score = _Scorer(run, split, args.holdout)
    with tempfile.TemporaryDirectory() as tmp:
        print("tuning on", args.merge, flush=True)
        points = tune(args, run, split, score, current, Path(tmp))
        choice = choose(points, current, args.max_v2_steps)
        print("comparing on", ", ".join(merges), flush=True)
        compared = compare(run, choice, current, merges, full, score, Path(tmp))
    record = {
        "benchmark": "surgery-sweep",
        "arch": run.arch.name,
        "run": str(args.run),
        "command": command_line(argv, prog or f"{__name__}.main"),
        "tuned_on": args.merge,
        "holdout": args.holdout,
        "heldout_images_per_task": {t: len(v.images) for t, v in split.held.items()},
        "criterion": "held-out adaptation images: top-1 agreement with the task's expert (%)",
        "current": current,
        "max_v2_steps": args.max_v2_steps,
        "seconds": round(time.perf_counter() - start, 1),
        "environment": environment("cpu"),
        "tune": points,
        "choice": choice,
        "compare": compared,
    }
    if args.out is not None:
        write_record_set(args.out, f"surgery-sweep-{run.arch.name}", record, markdown(record), plot)
    return record


def _setting(p: dict) -> str:
    return f"{p['schedule']}, lr {p['lr']:g}, rank {p['rank']}, {p['steps']} steps"


def markdown(record: dict[str, Any]) -> list[str]:
    """The record as a Markdown report."""
    lines = [
        f"# Surgery sweep: {record['arch']}, tuned on {record['tuned_on']}",
        "",
        f"`{record['command']}`",
        "",
        f"Criterion: {record['criterion']}; {record['holdout']:.0%} of each task's adaptation "
        "images held out, the rest trained on. Test accuracy is shown for every point and never "
        f"used to choose. {record['seconds']:.0f} s on the CPU "
        f"({record['environment'].get('device_name', '?')}).",
        "",
        "## Grid (held-out agreement %, held-out L1, test avg %)",
        "",
    ]
    rows = [
        [
            p["method"],
            p["schedule"],
            f"{p['lr']:g}",
            str(p["rank"]),
            str(p["steps"]),
            fmt(p["heldout_agreement"], ".2f"),
            fmt(p["heldout_l1"], ".4f"),
            fmt(p["test_avg"], ".2f"),
        ]
        for p in record["tune"]
    ]
    lines += table(["method", "schedule", "lr", "rank", "steps", "agreement", "L1", "test"], rows)
    lines += ["", "## Choice (held-out)", ""]
    for method, c in record["choice"].items():
        for name, p in c["settings"].items():
            if p is not None:
                mark = " **(best held-out)**" if name == c["best_heldout"] else ""
                lines.append(
                    f"- {method} {name}: {_setting(p)}: agreement "
                    f"{p['heldout_agreement']:.2f}%{mark}"
                )
    cmp = record["compare"]
    lines += [
        "",
        f"## Every merge, trained on the whole adaptation split (test avg %, experts "
        f"{cmp['experts']:.2f})",
        "",
    ]
    header = ["merge", "merged"] + [
        f"{m} {n}" for m in METHODS for n in ("current", "retuned", "reference")
    ]
    body = []
    for merge, merged in cmp["merged"].items():
        row = [merge, f"{merged:.2f}"]
        for m in METHODS:
            for n in ("current", "retuned", "reference"):
                found = [
                    r
                    for r in cmp["rows"]
                    if (r["merge"], r["method"], r["setting"]) == (merge, m, n)
                ]
                row.append(
                    f"{found[0]['test_avg']:.2f} ({100 * found[0]['gap_closed']:.0f}%)"
                    if found and found[0]["gap_closed"] is not None
                    else "—"
                )
        body.append(row)
    lines += table(header, body)
    lines += ["", "Parentheses: the share of the merged-to-experts gap closed."]
    return lines


def figure(record: dict[str, Any]) -> Any:
    """Held-out agreement against steps, one line per setting, a panel per method; the x axis
    is labelled with the swept step counts themselves."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    for ax, method in zip(axes, METHODS):
        points = [p for p in record["tune"] if p["method"] == method]
        settings = sorted({(p["schedule"], p["lr"], p["rank"]) for p in points})
        for schedule, lr, rank in settings:
            line = sorted(
                (p["steps"], p["heldout_agreement"])
                for p in points
                if (p["schedule"], p["lr"], p["rank"]) == (schedule, lr, rank)
            )
            label = f"{schedule} lr {lr:g}" + (f" rank {rank}" if method == SURGERY else "")
            style = "--" if schedule == "reference" else "-"
            ax.plot(*zip(*line), style, marker="o", label=label)
        chosen = record.get("choice", {}).get(method, {}).get("settings", {})
        for name, marker, size in (("current", "o", 11), ("retuned", "*", 15)):
            p = chosen.get(name)
            if p is not None:  # the defaults ringed, the held-out choice starred
                ax.plot(p["steps"], p["heldout_agreement"], marker, ms=size, mfc="none",
                        mec="k", label=f"{name}: {_setting(p)}")  # fmt: skip
        ax.set_xscale("log", base=2)  # the grid doubles its steps: evenly spaced
        plain_ticks(ax.xaxis, sorted({p["steps"] for p in points}))
        ax.set_xlabel("steps per task")
        ax.set_ylabel("held-out agreement with the experts (%)")
        ax.set_title(f"{method} on {record['tuned_on']}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(record: dict[str, Any], path: Path) -> Path:
    """``path``: the record's :func:`figure` as a PNG."""
    return save(figure(record), path)

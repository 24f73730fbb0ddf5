"""A task that arrives (or leaves) after the merge: change a finished run's task set.

Two strategies (``surgery-edge add-task`` / ``drop-task``):

- ``frozen``: every merged backbone and every other task's adapters stay bit for bit. Adding a
  task trains only its own adapters (V1 and/or V2, whichever the run has) against its expert's
  representations on its unlabelled adaptation images, with the settings the run's adapters
  were trained with; the cost is one task's targets and training. Dropping a task removes its
  rows from the adapter files and its head from the model (its task vector stays in the merge).
- ``remerge``: every merge is made again over the new set of experts, and every task's adapters
  are fine-tuned on it, warm-started from the previous ones (a new task's from the identity), for
  ``steps`` batches per task (default :data:`WARM_STEPS_FRACTION` of the run's).

The task set lives in the run's config (``suite.tasks``; a recipe run's ``data.tasks``, where an
added task brings its images: :mod:`~surgery_edge.run.task_data`), so ``eval`` and ``export``
see the new one as on any run. ``RUN/tasks.json`` keeps the history of the changes: what was
added or dropped, with which strategy, from which files (content hashes) and what was rewritten.

Every check runs before anything is written (:mod:`~surgery_edge.run.task_checks`: another
architecture or image size, a name that exists, an expert fine-tuned from another pretrained
model, data the recipe's loader refuses, dropping the last task: exit 2, nothing written).
``frozen`` trains into memory and publishes at the end; ``remerge`` publishes the task set
first, then each merge and adapter file as it is made, each atomically and recorded in
``RUN/checksums.json`` (a ``remerge`` stopped half-way is finished by ``surgery-edge merge``
and ``train --overwrite``, which the run's checks name).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from surgery_edge.data.suite import Suite, generate_suite, save_suite
from surgery_edge.errors import CheckpointError
from surgery_edge.io import atomic_path, fingerprint, write_json_atomic
from surgery_edge.models import load_encoder
from surgery_edge.models.checkpoint import load_head
from surgery_edge.run.config import DataTask, RunConfig
from surgery_edge.run.experts import ExpertSet
from surgery_edge.run.merge import run_merges
from surgery_edge.run.provenance import recorded
from surgery_edge.run.state import Run, adaptation_split
from surgery_edge.run.surgery import experts_representations, training_targets
from surgery_edge.run.task_checks import (
    check_drop,
    check_expert,
    check_head,
    check_strategy,
    check_task_name,
)
from surgery_edge.run.task_data import (
    ArrivingData,
    check_data_option,
    data_record,
    publish_data,
    read_arriving,
    recipe_with_tasks,
)
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.targets import Representations
from surgery_edge.surgery.trainer import (
    AdapterOutput,
    SurgeryConfig,
    TaskTargets,
    TrainingHooks,
    train_surgery,
    training_settings,
)

HISTORY = "tasks.json"  # RUN/tasks.json: the task set and the history of its changes
# A remerge fine-tunes for this share of the run's steps by default: on the demo suite, adding
# digits, textures or signs to the other seven, the eight-task average came within a point of
# the eight-task pipeline's after 250, 125 and 125 of its 500 steps (a quarter missed it for
# digits by 0.2 points; benchmarks/results/cpu/add-task-tiny-vit-32.md).
WARM_STEPS_FRACTION = 0.5


@dataclass
class TaskChange:
    """What ``add_task`` / ``drop_task`` did (also appended to ``RUN/tasks.json``)."""

    change: str  # "add" | "drop"
    task: str
    strategy: str
    tasks_before: list[str]
    tasks_after: list[str]
    merges: dict[str, Path] = field(default_factory=dict)  # re-made (remerge) or kept (frozen)
    adapters: dict[tuple[str, str], Path] = field(default_factory=dict)  # rewritten
    steps: dict[str, int] = field(default_factory=dict)  # "merge/method" -> steps trained
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall-clock seconds


# --- the run's task set ----------------------------------------------------------------------


def _with_tasks(
    config: RunConfig, tasks: list[str], added: dict[str, tuple[DataTask, Path]] | None = None
) -> RunConfig:
    """``config`` with exactly ``tasks``; ``added``: a recipe's new tasks' data and experts."""
    if not config.builtin:
        return recipe_with_tasks(config, tasks, added or {})
    return config.model_copy(update={"suite": config.suite.model_copy(update={"tasks": tasks})})


def _suite_of(run: Run, tasks: list[str], arriving: ArrivingData | None = None) -> Suite:
    """The run's suite with exactly ``tasks``, in that order: a built-in task the suite lacks is
    generated (each task's images depend on the suite's seed and the task alone); a recipe's
    new task's images are ``arriving``'s."""
    have = {t.name: t for t in run.suite.tasks}
    if arriving is not None:
        have[arriving.name] = arriving.data
    missing = [t for t in tasks if t not in have]
    if missing:
        s = run.config.suite
        made = generate_suite(
            seed=s.seed,
            n_train=s.n_train,
            n_adapt=s.n_adapt,
            n_test=s.n_test,
            size=run.suite.image_size,
            tasks=missing,
        )
        have.update({t.name: t for t in made.tasks})
    return Suite(run.suite.name, run.suite.seed, run.suite.image_size, [have[t] for t in tasks])


def _use_tasks(
    run: Run,
    tasks: list[str],
    expert: dict[str, tuple[Path, Path]],
    arriving: ArrivingData | None = None,
) -> None:
    """Make ``tasks`` the run's task set in memory (config, suite, experts); ``expert``: where
    an added task's expert and head are read from; ``arriving``: a recipe's new task's data."""
    added = {} if arriving is None else {arriving.name: (arriving.entry, expert[arriving.name][0])}
    run.config = _with_tasks(run.config, tasks, added)
    run.suite = _suite_of(run, tasks, arriving)
    e = run.experts
    paths = {t: expert.get(t, (e.experts.get(t), e.heads.get(t))) for t in tasks}
    run.experts = ExpertSet(e.pretrained, {t: p[0] for t, p in paths.items()},
                            {t: p[1] for t, p in paths.items()})  # fmt: skip


def _publish_tasks(
    run: Run, added: str | None = None, arriving: ArrivingData | None = None
) -> None:
    """Write the task set of ``run`` (in memory) into the run: the added task's expert and
    head (copied in, recorded), a recipe's new task's decoded images, the built-in suite and
    the config, each atomically."""
    if added is not None:
        for src, dst in (
            (run.experts.experts[added], run.layout.expert(added)),
            (run.experts.heads[added], run.layout.head(added)),
        ):
            if Path(src).resolve() != dst.resolve():
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
                run.record(dst)
        run.experts.experts[added] = run.layout.expert(added)
        run.experts.heads[added] = run.layout.head(added)
    if arriving is not None:
        publish_data(run, arriving)
    if run.config.builtin:  # a recipe's tasks are read from disk, not from a suite file
        save_suite(run.suite, run.layout.suite_file)
    write_json_atomic(run.layout.config_file, run.config.model_dump(mode="json"))


def _history(run: Run, change: TaskChange, files: dict[str, str]) -> None:
    path = run.out / HISTORY
    old = recorded_history(run.out)
    entry = {
        "change": change.change,
        "task": change.task,
        "strategy": change.strategy,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks_before": change.tasks_before,
        "tasks_after": change.tasks_after,
        "files": files,
        "steps": change.steps,
        "seconds": {k: round(v, 2) for k, v in change.seconds.items()},
    }
    write_json_atomic(path, {"tasks": change.tasks_after, "history": [*old, entry]})


def recorded_history(run_dir: Path) -> list[dict]:
    """The changes of a run's task set so far (``RUN/tasks.json``; empty when none)."""
    import json

    try:
        data = json.loads((Path(run_dir) / HISTORY).read_text())
    except (OSError, ValueError):
        return []
    history = data.get("history") if isinstance(data, dict) else None
    return history if isinstance(history, list) else []


# --- adapters ---------------------------------------------------------------------------------


def _recorded_config(path: Path, steps: int | None = None) -> SurgeryConfig:
    """The settings ``path``'s adapters were trained with (``steps`` instead, when given)."""
    settings = dict(((recorded(path) or {}).get("provenance") or {}).get("settings") or {})
    if not settings:
        raise CheckpointError(
            f"Adapters {path} record no training settings (an older or foreign file), so a "
            "task's adapters cannot be trained to match them. Re-train them with `surgery-edge "
            "train --overwrite` first."
        )
    if steps is not None:
        settings["steps"] = steps
    return SurgeryConfig(**settings)


def _assemble(
    tasks: list[str], rows: dict[str, tuple[AdapterBank, int]], like: AdapterBank, seed: int
) -> AdapterBank:
    """A bank of ``tasks`` whose rows are copied from ``rows`` (task -> (bank, row)); a task
    not in ``rows`` keeps the identity initialisation (seeded by ``seed``)."""
    torch.manual_seed(seed)
    bank = AdapterBank(tasks, like.arch, like.method, like.rank)
    with torch.no_grad():
        for site in bank.sites:
            down, up = bank.weights(site)  # (T, r, d), (T, d, r)
            for i, task in enumerate(tasks):
                if task in rows:
                    src, j = rows[task]
                    src_down, src_up = src.weights(site)
                    down[i].copy_(src_down[j])
                    up[i].copy_(src_up[j])
    return bank


def _provenance(run: Run, merged: Path, split: str, cfg: SurgeryConfig, **change) -> dict:
    """The adapter file's provenance as ``train`` records it, plus how the task set changed
    (so ``train`` with the run's settings does not take them for its own: --overwrite)."""
    targets = experts_representations(run, run.tasks, split)
    return {
        "merged": run.hashes.digest(merged),
        "targets": fingerprint({t: targets[t].digest for t in run.tasks}),
        "split": split,
        "images": run.split_digest(split),
        "settings": training_settings(cfg),
        "task_change": change,
    }


def _targets(run: Run, task: str, split: str) -> TaskTargets:
    found: Representations = experts_representations(run, [task], split)[task]
    images = {"adapt": run.suite.task(task).adapt_x, "test": run.suite.task(task).test_x}[split]
    return TaskTargets(images, *found)


def _existing_adapters(run: Run) -> dict[tuple[str, str], tuple[AdapterBank, dict]]:
    """Every adapter file of the run, checked (content as made, fits its merge, these tasks)."""
    out = {}
    for merged in run.merged.values():
        run.verify(merged, explain=run.as_encoder)
    for (merge, method), path in run.find_adapters().items():
        run.verify(path)
        bank, meta = AdapterBank.load(path, run.arch, run.tasks, method=method)
        run.layout.check_adapters(run.merged[merge], path, meta)
        out[(merge, method)] = (bank, meta)
    return out


# --- the two operations -----------------------------------------------------------------------


def add_task(
    run: Run,
    name: str,
    expert: Path,
    head: Path,
    strategy: str,
    steps: int | None = None,
    on_update: Callable[[str, int, AdapterBank], None] | None = None,
    data: Path | None = None,
) -> TaskChange:
    """Add task ``name`` (its expert and head checkpoints) to a finished run.

    Args:
        strategy: ``frozen`` or ``remerge`` (module docstring).
        steps: batches per task to train (default: frozen, the run's adapters' own; remerge,
            :data:`WARM_STEPS_FRACTION` of them).
        on_update: called as ``on_update("merge/method", steps done, adapters)`` after each
            update (the benchmark scores intermediate adapters through it).
        data: a recipe run's new task's images (:mod:`~surgery_edge.run.task_data`; needed
            there, refused on the built-in suite, whose tasks' images are generated).

    Raises:
        ConfigError, CheckpointError, DataError: the task cannot be added (nothing was written).
    """
    t0 = time.perf_counter()
    check_strategy(strategy)
    check_data_option(run, data)
    run.require_experts()
    run.find_merges()
    expert, head = Path(expert), Path(head)
    check_task_name(run, name)
    found = check_expert(run, name, expert, head)  # before the data is read (and decoded)
    with tempfile.TemporaryDirectory(prefix="surgery-edge-data-") as staging:
        arriving = None if data is None else read_arriving(run, name, Path(data), Path(staging))
        check_head(run, name, head, found, arriving)
        existing = _existing_adapters(run)
        before = list(run.tasks)
        change = TaskChange("add", name, strategy, before, [*before, name])
        change.seconds["checks"] = time.perf_counter() - t0
        t1 = time.perf_counter()  # the built-in task's images are generated (a task's own exist)
        _use_tasks(run, change.tasks_after, {name: (expert, head)}, arriving)
        adaptation_split(run)  # no images to adapt on: refused before anything is written
        change.seconds["data"] = time.perf_counter() - t1
        files = {"expert": run.hashes.digest(expert), "head": run.hashes.digest(head)}
        if strategy == "frozen":
            _add_frozen(run, name, existing, change, steps, on_update, arriving)
        else:
            _publish_tasks(run, name, arriving)
            _remerge(run, existing, change, steps, on_update)
    if arriving is not None:
        files["data"] = data_record(run, arriving)
    change.seconds["total"] = time.perf_counter() - t0
    files.update({f"{m}/{s}": run.hashes.digest(p) for (m, s), p in change.adapters.items()})
    _history(run, change, files)
    return change


def drop_task(
    run: Run,
    name: str,
    strategy: str,
    steps: int | None = None,
    on_update: Callable[[str, int, AdapterBank], None] | None = None,
) -> TaskChange:
    """Remove task ``name`` from a finished run (``frozen``: its adapter rows and head
    leave, everything else stays bit for bit; ``remerge``: merges without its task vector and
    the other tasks' adapters fine-tuned warm). Its expert and head files stay in the run."""
    check_strategy(strategy)
    run.require_experts()
    run.find_merges()
    check_drop(run, name)
    existing = _existing_adapters(run)
    before = list(run.tasks)
    change = TaskChange("drop", name, strategy, before, [t for t in before if t != name])
    t0 = time.perf_counter()
    _use_tasks(run, change.tasks_after, {})
    if strategy == "frozen":
        split = adaptation_split(run)
        banks = {}
        for (merge, method), (bank, meta) in existing.items():
            rows = {t: (bank, before.index(t)) for t in change.tasks_after}
            cfg = _recorded_config(run.adapters[(merge, method)])
            banks[(merge, method)] = (
                _assemble(change.tasks_after, rows, bank, cfg.seed),
                meta,
                cfg,
            )
        _publish_tasks(run)
        for (merge, method), (bank, meta, cfg) in banks.items():
            provenance = _provenance(
                run, run.merged[merge], split, cfg, change="drop", task=name, strategy="frozen"
            )
            _save_adapters(run, merge, method, bank, meta, provenance)
            change.adapters[(merge, method)] = run.layout.adapters(merge, method)
        change.merges = dict(run.merged)
    else:
        _publish_tasks(run)
        _remerge(run, existing, change, steps, on_update)
    change.seconds["total"] = time.perf_counter() - t0
    files = {f"{m}/{s}": run.hashes.digest(p) for (m, s), p in change.adapters.items()}
    _history(run, change, files)
    return change


def _save_adapters(
    run: Run, merge: str, method: str, bank: AdapterBank, meta: dict, provenance: dict
) -> Path:
    path = run.layout.adapters(merge, method)
    extra = {"provenance": provenance, "fingerprint": fingerprint(provenance)}
    extra["split"] = provenance["split"]
    bank.save(path, meta.get("merge_recipe") or {}, extra)
    run.record(path)
    return path


def _add_frozen(run, name, existing, change, steps, on_update, arriving=None) -> None:
    """Train ``name``'s adapters alone on every merge, in memory; then publish everything."""
    split = adaptation_split(run)
    t0 = time.perf_counter()
    targets = {name: _targets(run, name, split)}
    change.seconds["targets"] = time.perf_counter() - t0
    head = load_head(run.experts.heads[name], run.arch).head.eval()
    banks = {}
    with tempfile.TemporaryDirectory(prefix="surgery-edge-add-") as tmp:
        for (merge, method), (bank, meta) in existing.items():
            cfg = _recorded_config(run.adapters[(merge, method)], steps)
            merged = load_encoder(run.merged[merge], run.arch)
            key = f"{merge}/{method}"
            t0 = time.perf_counter()
            alone = train_surgery(
                merged.build(run.device),
                [head],
                [name],
                targets,
                cfg,
                Path(tmp) / f"{merge}-{method}.safetensors",
                run.device,
                hooks=TrainingHooks(log=run.log, on_update=_per_key(on_update, key)),
            )
            change.seconds[key] = time.perf_counter() - t0
            change.steps[key] = cfg.steps
            rows = {t: (bank, i) for i, t in enumerate(change.tasks_before)}
            rows[name] = (alone, 0)
            banks[(merge, method)] = (
                _assemble(change.tasks_after, rows, bank, cfg.seed),
                meta,
                cfg,
            )
    t0 = time.perf_counter()
    _publish_tasks(run, name, arriving)
    for (merge, method), (bank, meta, cfg) in banks.items():
        provenance = _provenance(
            run, run.merged[merge], split, cfg, change="add", task=name, strategy="frozen"
        )
        change.adapters[(merge, method)] = _save_adapters(
            run, merge, method, bank, meta, provenance
        )
    change.merges = dict(run.merged)
    change.seconds["publish"] = time.perf_counter() - t0


def _merge_note(text: str) -> bool:
    return text.startswith("--overwrite: replacing") or "no longer fits" in text


def _remerge(run, existing, change, steps, on_update) -> None:
    """Make every merge again over the run's (new) experts, then fine-tune every adapter file
    on it warm-started from the previous adapters (an added task's from the identity)."""
    split = adaptation_split(run)
    # the merges are re-made on purpose (not by --overwrite), and their adapters re-trained
    # next: run_merges' notes on both are not for this command's user
    overwrite, log, run.overwrite = run.overwrite, run.log, True
    run.log = lambda text, *a, **k: None if _merge_note(str(text)) else log(text, *a, **k)
    try:
        for merge, path in list(run.merged.items()):
            log(f"remerge: making {merge} again over the tasks {run.tasks}")
            params = ((recorded(path) or {}).get("provenance") or {}).get("params")
            with run.stage(f"merge:{merge}"):
                t0 = time.perf_counter()
                run_merges(run, [merge], params if isinstance(params, dict) else None)
                change.seconds[f"merge:{merge}"] = time.perf_counter() - t0
    finally:
        run.overwrite, run.log = overwrite, log
    change.merges = dict(run.merged)
    with run.stage("targets"):
        targets = training_targets(run, split)
    heads = run.heads()
    for (merge, method), (bank, _) in existing.items():
        old_path = run.layout.adapters(merge, method)
        recorded_cfg = _recorded_config(old_path)
        if steps is None:
            steps_here = max(1, round(recorded_cfg.steps * WARM_STEPS_FRACTION))
        else:
            steps_here = steps
        cfg = _recorded_config(old_path, steps_here)
        rows = {t: (bank, i) for i, t in enumerate(change.tasks_before) if t in run.tasks}
        warm = _assemble(run.tasks, rows, bank, cfg.seed)
        merged_path = run.merged[merge]
        provenance = _provenance(
            run, merged_path, split, cfg, change=change.change, task=change.task,
            strategy="remerge", warm_start=run.hashes.digest(old_path),
        )  # fmt: skip
        merged = load_encoder(merged_path, run.arch)
        key = f"{merge}/{method}"
        t0 = time.perf_counter()
        train_surgery(
            merged.build(run.device),
            heads,
            run.tasks,
            targets,
            cfg,
            AdapterOutput(
                old_path,
                merge_recipe=dict(merged.meta.get("recipe", {})),
                extra_meta={
                    "provenance": provenance,
                    "fingerprint": fingerprint(provenance),
                    "split": split,
                },
                inputs=fingerprint({k: v for k, v in provenance.items() if k != "settings"}),
            ),
            run.device,
            hooks=TrainingHooks(log=run.log, on_update=_per_key(on_update, key)),
            init=warm,
        )
        run.record(old_path)
        change.seconds[key] = time.perf_counter() - t0
        change.steps[key] = cfg.steps
        change.adapters[(merge, method)] = old_path


def _per_key(on_update, key):
    """``on_update(key, steps, bank)`` as the trainer's ``on_update(steps, bank)``, or None."""
    return None if on_update is None else (lambda n, b: on_update(key, n, b))

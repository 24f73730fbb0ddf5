"""Runs over the user's own files: tasks read from disk, experts and heads imported.

A run whose config has ``data`` and ``checkpoints`` (see :class:`surgery_edge.run.config.RunConfig`)
replaces the demo's two first stages:

- :func:`disk_suite` reads every task from image folders or torchvision datasets, decoded once at
  the model's input size and cached (memory-mapped) under ``RUN/cache/data``;
- :func:`import_checkpoints` converts the pretrained model, the experts and the heads into the run's
  ``checkpoints/`` folder, exactly the layout the demo's training writes, so every later stage
  (merge, train, eval, export) is the same code for both kinds of run.

Both are cached: the import is redone only when a source file, the class names or the settings
change (``checkpoints/import.json`` records their fingerprint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surgery_edge.data.disk import DiskTask, load_disk_task
from surgery_edge.data.suite import Suite, TaskData
from surgery_edge.errors import CheckpointError
from surgery_edge.io import HashCache, fingerprint, write_json_atomic
from surgery_edge.models import ArchSpec, get_arch
from surgery_edge.models.convert.task_vectors import find_task_vectors_layout, import_task_vectors
from surgery_edge.models.convert.weights import checkpoint_arch, import_weights, zeroshot_heads
from surgery_edge.models.templates import paper_class_names
from surgery_edge.run.config import DataTask
from surgery_edge.run.experts import ExpertSet
from surgery_edge.run.provenance import check_replace


def disk_suite(run) -> Suite:
    """The run's tasks, read from disk at the run's input size (cached under RUN/cache/data)."""
    data = run.config.data
    tasks = [
        read_disk_task(run, name, t, data.task_path(name), data.class_names_path(name))
        for name, t in data.tasks.items()
    ]
    return Suite(run.config.name or "disk", run.config.seed, run.arch.image_size, tasks)


def read_disk_task(
    run,
    name: str,
    task: DataTask,
    path: Path,
    class_names: Path | None,
    cache_dir: Path | None = None,
) -> TaskData:
    """One task of the recipe read from disk as :func:`disk_suite` reads each (the run's input
    size, seed and adaptation sample), decoded into ``cache_dir`` (default RUN/cache/data).

    Args:
        task: its entry in the config's ``data.tasks``.
        path, class_names: where its images and its class-name file are (resolved paths).
    """
    spec = DiskTask(
        name=name,
        source=task.source,
        path=path,
        dataset=task.dataset,
        class_names=class_names,
        test_fraction=task.test_fraction,
        split_lists=tuple(task.split_lists.items()),
    )
    found = load_disk_task(
        spec,
        run.arch.image_size,
        cache_dir or run.out / "cache" / "data",
        seed=run.config.seed,
        n_adapt=run.config.data.n_adapt,
        log=run.log,
    )
    # Zero-shot heads need words, not label numbers: without a class-name file, the paper's
    # tasks (e.g. torchvision's SVHN and GTSRB, which carry no names) get the names the
    # CLIP / task_vectors code uses.
    paper = paper_class_names(name)
    if task.class_names is None and paper and len(paper) == len(found.class_names):
        found.class_names = list(paper)
    return found


def class_names_source(run, task: str) -> str:
    """Where ``task``'s class names come from, for error messages."""
    data = run.config.data
    t = data.tasks[task]
    if t.class_names is not None:
        return str(data.class_names_path(task))
    if t.source == "torchvision":
        return f"torchvision {t.dataset} at {data.task_path(task)}"
    return f"the class folders of {data.task_path(task) / 'test'}"


def _source_files(cfg, model_dir: str, tasks: list[str]) -> list[Path]:
    if cfg.format == "task_vectors":
        return find_task_vectors_layout(cfg.root, model_dir, tasks).files
    files = [cfg.resolve(cfg.pretrained), *(cfg.resolve(cfg.experts[t]) for t in tasks)]
    for p in files:
        if not p.exists():
            raise CheckpointError(
                f"Checkpoint {p} (from the config's `checkpoints`) does not exist."
            )
    return files


def _tree_digest(path: Path, hashes: HashCache) -> str:
    """A file's content hash, or a folder's (every file in it, by relative name): HF folders."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return fingerprint({p.relative_to(path).as_posix(): hashes.digest(p) for p in files})
    return hashes.digest(path)


def import_checkpoints(run) -> ExpertSet:
    """Convert the config's checkpoints into ``RUN/checkpoints`` (reused while unchanged).

    Also sets ``run.arch`` to the architecture the checkpoints turned out to have (task_vectors
    files record the MLP activation: OpenAI-based ``ViT-B-32`` becomes ``ViT-B-32-quickgelu``).
    """
    cfg = run.config.checkpoints
    tasks = run.tasks
    out = run.out / "checkpoints"
    class_names = {t: list(run.suite.task(t).class_names) for t in tasks}
    sources = _source_files(cfg, cfg.model or run.config.arch, tasks)
    if cfg.heads == "zeroshot":
        sources.append(cfg.resolve(cfg.clip_weights))
    # What the import is made of: the settings that shape it and the sources' contents (in
    # their roles' order), never where the files are.
    settings = cfg.model_dump(mode="json", include={"format", "model", "heads"})
    provenance = {
        "settings": settings,
        "arch": run.config.arch,
        "sources": [_tree_digest(p, run.hashes) for p in sources if p.exists()],
        "class_names": class_names,
    }
    fp = fingerprint(provenance)
    summary_path = out / "import.json"
    expert_set = ExpertSet(
        out / "pretrained.safetensors",
        {t: out / "experts" / f"{t}.safetensors" for t in tasks},
        {t: out / "heads" / f"{t}.safetensors" for t in tasks},
    )
    if _reuse(run, expert_set, summary_path, provenance, fp):
        run.arch = checkpoint_arch(expert_set.pretrained)
        return expert_set
    arch = get_arch(run.config.arch)
    origins = {t: class_names_source(run, t) for t in tasks}
    arch, notes = _convert(run, arch, out, class_names, origins)
    write_json_atomic(
        summary_path,
        {
            "format": cfg.format,
            "sources": [str(p) for p in sources],
            "arch": arch.to_dict(),
            "class_names_from": origins,
            "notes": notes,
            "provenance": provenance,
            "fingerprint": fp,
        },
    )
    for note in notes:
        run.log(f"note: {note}")
    run.arch = arch
    return expert_set


def _reuse(
    run, expert_set: ExpertSet, summary_path: Path, provenance: dict[str, Any], fp: str
) -> bool:
    """Whether the last import, recorded in ``summary_path``, was made of the same inputs
    (fingerprint ``fp``) and its checkpoints are there; if not, whether what is there may be
    replaced (else ConfigError, unless the run overwrites)."""
    summary = _read_summary(summary_path)
    if summary.get("fingerprint") == fp:
        if all(p.is_file() for p in [expert_set.pretrained, *expert_set.experts.values()]):
            run.log(f"reusing imported checkpoints in {summary_path.parent}")
            return True
    if summary_path.is_file() or expert_set.pretrained.is_file():
        old = summary.get("provenance", "none") if summary else None
        check_replace(summary_path, "import record", provenance, run.overwrite, run.log, old=old)
    return False


def _convert(
    run, arch: ArchSpec, out: Path, class_names: dict[str, list[str]], origins: dict[str, str]
) -> tuple[ArchSpec, list[str]]:
    """Convert the config's checkpoints of architecture ``arch`` into ``out`` in the layout the
    demo's training writes; returns the architecture they turned out to have (task_vectors
    files record the MLP activation) and the notes on the way.

    Args:
        class_names: each task's class names (from its data).
        origins: where each task's class names come from, for errors.
    """
    cfg = run.config.checkpoints
    tasks = run.tasks
    if cfg.format == "task_vectors":
        summary = import_task_vectors(
            cfg.root,
            cfg.model or run.config.arch,
            out,
            cfg.trust_pickle,
            tasks=tasks,
            class_names=class_names if cfg.heads == "checkpoint" else None,
            class_names_source=origins,
            overwrite=True,
            arch=arch,
            log=run.log,
        ).to_dict()
        arch = checkpoint_arch(out / "pretrained.safetensors")
        notes = summary["notes"]
        if cfg.heads == "zeroshot":  # replace the shipped heads, each file atomically
            clip = cfg.resolve(cfg.clip_weights)
            zeroshot_heads(arch, clip, class_names, out, run.device, run.log)
    else:
        arch, notes = (
            import_weights(
                cfg.format,
                arch,
                cfg.resolve(cfg.pretrained),
                {t: cfg.resolve(cfg.experts[t]) for t in tasks},
                out,
                trust_pickle=cfg.trust_pickle,
                clip_weights=cfg.resolve(cfg.clip_weights),
                class_names=class_names,
                device=run.device,
                log=run.log,
            ),
            [],
        )
    if cfg.heads == "zeroshot":
        notes.append(f"Heads: zero-shot, from {cfg.resolve(cfg.clip_weights)}'s text tower.")
    return arch, notes


def _read_summary(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

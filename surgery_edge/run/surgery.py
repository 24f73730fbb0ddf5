"""The surgery stage: the experts' representations as targets (cached), then every configured
surgery method trained on every merge (reusing adapters that are up to date)."""

from __future__ import annotations

from pathlib import Path

from surgery_edge.errors import ConfigError
from surgery_edge.io import check_output, fingerprint, safe_name
from surgery_edge.models import load_encoder
from surgery_edge.run.config import RunConfig
from surgery_edge.run.provenance import check_replace, recorded, up_to_date
from surgery_edge.run.state import (
    Run,
    adaptation_split,
    is_kind,
    metrics_file,
    suite_images,
    unlabelled_split,
)
from surgery_edge.surgery.methods import get_surgery
from surgery_edge.surgery.targets import Representations, Request, cached_representations_many
from surgery_edge.surgery.trainer import (
    AdapterOutput,
    SurgeryConfig,
    TaskTargets,
    TrainingHooks,
    train_surgery,
    training_settings,
)


def expert_representations(run: Run, task: str, split: str) -> Representations:
    """The expert of ``task``'s (final, block means) on that task's ``split`` images, cached
    under a key of the expert's and the images' content hashes."""
    return experts_representations(run, [task], split)[task]


def experts_representations(
    run: Run, tasks: list[str], split: str, fresh: bool = False
) -> dict[str, Representations]:
    """:func:`expert_representations` of several tasks at once: in a distributed job, the
    missing entries are computed by all ranks and written by the first.

    Args:
        fresh: hash the experts, images and cache entries from their bytes (before training
            adapters that will be published), not the hash cache's stat.
    """
    requests = []
    for task in tasks:
        path = run.experts.experts[task]
        key = fingerprint(
            run.hashes.digest(path, fresh), run.images_digest(task, split, fresh), run.arch.name
        )
        requests.append(
            Request(
                f"{safe_name(task, 'Task name')}-{split}-{key}",
                lambda path=path: load_encoder(path, run.arch).build(run.device),
                suite_images(run.suite, task, split),
            )
        )
    found = cached_representations_many(
        run.layout.cache,
        requests,
        run.device,
        hashes=run.hashes,
        warn=lambda message: run.log(f"warning: {message}"),
        world=run.world,
        fresh=fresh,
    )
    return dict(zip(tasks, found))


def surgery_config(run: Run, method: str) -> SurgeryConfig:
    """``method``'s training settings as the run's config records them."""
    return surgery_settings(run.config, method)


def surgery_settings(config: RunConfig, method: str, **given) -> SurgeryConfig:
    """``method``'s training settings as ``config`` records them, with each ``given`` value
    that is not None instead (``train``'s options: the run's config is their default)."""
    s = config.surgery
    get_surgery(method)  # an unknown method: ConfigError listing the known ones
    settings = {
        "method": method,
        "rank": s.params[method].rank,
        "steps": s.params[method].steps,
        "batch_size": s.batch_size,
        "lr": s.lr if s.params[method].lr is None else s.params[method].lr,
        "seed": config.seed,
        "schedule": s.schedule,
    }
    settings.update({k: v for k, v in given.items() if v is not None})
    return SurgeryConfig(**settings)


def training_targets(run: Run, split: str, fresh: bool = False) -> dict[str, TaskTargets]:
    """Every task's ``split`` images with its expert's representations of them (cached)."""
    found = experts_representations(run, run.tasks, split, fresh)
    return {t: TaskTargets(suite_images(run.suite, t, split), *found[t]) for t in run.tasks}


def check_training(
    run: Run,
    merge_name: str,
    cfg: SurgeryConfig,
    out_path: Path | None = None,
    transductive: bool = False,
) -> Path:
    """What training checks before any work (and before ``--nproc`` starts its processes): the
    merge exists, the output is an adapter file or new, and adapters already there were trained
    with these settings on this split (else ConfigError, unless ``run.overwrite``). Returns the
    adapters' path. Their other inputs (merged model, targets, images) are compared once the
    targets are known."""
    if merge_name not in run.merged:
        raise ConfigError(
            f"No merged model {merge_name!r} in {run.out / 'merged'}; found {sorted(run.merged)}. "
            f"Create it with `surgery-edge merge --run {run.out} --method {merge_name}`."
        )
    path = Path(out_path) if out_path is not None else run.layout.adapters(merge_name, cfg.method)
    check_output(path, "surgery adapter file", is_kind("adapters"))
    meta = (recorded(path) or {}) if path.exists() else {}
    old = meta.get("provenance")
    if isinstance(old, dict) and not run.overwrite:
        split = unlabelled_split(run.config, transductive)  # the one train_one learns from
        new = {"settings": training_settings(cfg), "split": split}
        old = {k: old.get(k) for k in new}
        if old != new:
            check_replace(path, f"{cfg.method} adapter file", new, False, run.log, old=old)
    return path


def _training_provenance(
    run: Run, merged: Path, targets: dict[str, TaskTargets], split: str, cfg: SurgeryConfig,
    fresh: bool = False,
) -> dict:  # fmt: skip
    return {
        "merged": run.hashes.digest(merged, fresh),
        "targets": fingerprint({t: targets[t].digest for t in run.tasks}),
        "split": split,
        "images": run.split_digest(split, fresh),
        "settings": training_settings(cfg),
    }


def train_one(
    run: Run,
    merge_name: str,
    cfg: SurgeryConfig,
    out_path: Path | None = None,
    transductive: bool = False,
    resume: bool = True,
    targets: dict[str, TaskTargets] | None = None,
) -> Path:
    """Train one surgery method on one merged backbone (reused when already up to date).

    Reused adapters must hold what the run made. Adapters about to be trained are published
    from inputs hashed from their bytes (experts, merged model, targets, images), not trusted
    from the hash cache's stat: a file changed in place with its modification time restored is
    seen (and refused, or a changed cache entry rebuilt) before any training step.
    """
    path = check_training(run, merge_name, cfg, out_path, transductive)
    merged_path = run.merged[merge_name]
    split = adaptation_split(run, transductive)
    run.verify(merged_path, explain=run.as_encoder)
    if targets is None:
        with run.stage("surgery:targets"):
            targets = training_targets(run, split)
    provenance = _training_provenance(run, merged_path, targets, split, cfg)
    fp = fingerprint(provenance)
    remade = False
    if up_to_date(path, fp):
        if run.layout.checksums.reusable(path, run.hashes, run.overwrite, run.log):
            run.log(f"reusing {cfg.method} adapters on {merge_name}")
            return path
        remade = True  # changed since the run made it, and --overwrite: trained again
    for expert in run.experts.experts.values():
        run.verify(expert, fresh=True, explain=run.as_encoder)
    run.verify(merged_path, fresh=True, explain=run.as_encoder)
    with run.stage("surgery:targets"):
        targets = training_targets(run, split, fresh=True)
    provenance = _training_provenance(run, merged_path, targets, split, cfg, fresh=True)
    fp = fingerprint(provenance)
    if path.exists() and not remade:
        what = f"{cfg.method} adapter file"
        check_replace(path, what, provenance, run.overwrite, run.log)
    merged = load_encoder(merged_path, run.arch)
    recipe = dict(merged.meta.get("recipe", {}))
    with run.stage(f"surgery:{cfg.method}"):
        train_surgery(
            merged.build(run.device),
            run.heads(),
            run.tasks,
            targets,
            cfg,
            AdapterOutput(
                path,
                merge_recipe=recipe,
                extra_meta={"provenance": provenance, "fingerprint": fp, "split": split},
                inputs=fingerprint({k: v for k, v in provenance.items() if k != "settings"}),
            ),
            run.device,
            resume=resume,
            hooks=TrainingHooks(
                log=run.log, metrics=metrics_file(run, f"train-{merge_name}-{cfg.method}")
            ),
            world=run.world,
        )
    run.record(path)
    return path


def run_surgery(run: Run, resume: bool = True) -> dict[tuple[str, str], Path]:
    """Train every configured surgery method on top of every merge (reusing finished ones)."""
    s = run.config.surgery
    with run.stage("surgery:targets"):
        targets = training_targets(run, adaptation_split(run))
    for merge_name in run.merged:
        for method in s.methods:
            run.adapters[(merge_name, method)] = train_one(
                run,
                merge_name,
                surgery_config(run, method),
                transductive=s.transductive,
                resume=resume,
                targets=targets,
            )
    return run.adapters

"""The whole flow on a run directory: suite -> experts -> merges -> surgery -> evaluation.

The directory's layout is :class:`~surgery_edge.run.layout.RunLayout`. Every stage writes its
artefact atomically with its provenance (content hashes of its inputs, the settings that shaped
it) and their fingerprint in the metadata; a re-run reuses an artefact whose fingerprint matches
and redoes only what changed. Nothing about where the run sits enters a fingerprint, so a moved
or copied run reuses everything. An artefact made with other settings is replaced only with
``overwrite`` (:mod:`~surgery_edge.run.provenance`).

``train`` and ``merge`` also run as the ranks of a torchrun job (:meth:`Run.join`): every rank
opens the same run directory (a shared file system when the job spans machines), rank 0 alone
writes into it and logs, and the expensive work (expert targets, surgery and AdaMerging steps)
is split across the ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from surgery_edge import __version__, merging
from surgery_edge.data.suite import Suite, load_or_generate_suite
from surgery_edge.data.transforms import to_model_input
from surgery_edge.device import make_deterministic, resolve_device
from surgery_edge.distributed import World, check_rows
from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.evaluation.accuracy import average, routed_accuracy
from surgery_edge.evaluation.bias import representation_bias
from surgery_edge.evaluation.published import beside, published_table
from surgery_edge.evaluation.report import row_name, write_report
from surgery_edge.io import HashCache, check_output, fingerprint, safe_name, write_json_atomic
from surgery_edge.merging import AdaMergingContext
from surgery_edge.models import ArchSpec, get_arch, load_encoder, save_encoder
from surgery_edge.models.checkpoint import file_kind
from surgery_edge.progress import MetricsLog, progress_bar
from surgery_edge.run.config import RunConfig, differences, shaping_settings
from surgery_edge.run.engines import export_engines
from surgery_edge.run.experts import ExpertSet, FinetuneConfig, PretrainConfig, build_experts
from surgery_edge.run.layout import RunLayout
from surgery_edge.run.provenance import check_replace, recorded, up_to_date
from surgery_edge.run.recipe import disk_suite, import_checkpoints
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.methods import NONE, SURGERY_METHODS, get_surgery
from surgery_edge.surgery.model import MultiTaskModel
from surgery_edge.surgery.targets import Representations, Request, cached_representations_many
from surgery_edge.surgery.trainer import (
    SurgeryConfig,
    TaskTargets,
    train_surgery,
    training_settings,
)


@dataclass
class Run:
    """A run directory plus what the stages have produced so far."""

    layout: RunLayout
    config: RunConfig
    device: torch.device
    arch: ArchSpec
    log: Callable[..., None] = print
    suite: Suite | None = None
    experts: ExpertSet | None = None
    merged: dict[str, Path] = field(default_factory=dict)
    adapters: dict[tuple[str, str], Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    overwrite: bool = False  # replace artefacts made with other settings (never silently)
    world: World | None = None  # the ranks of a distributed job (None: this process alone)

    @classmethod
    def create(cls, out: str | Path, config: RunConfig, log=print, overwrite: bool = False) -> Run:
        """Start (or continue) a run in ``out`` with ``config``; the config is saved there.

        Everything is checked before anything is written: the output folder, the device, the
        architecture, and, for an existing run, that ``config`` shapes its artefacts as the
        recorded one did (other settings need ``overwrite``: they would replace artefacts).
        """
        layout = RunLayout.create(out)
        make_deterministic()
        run = cls(
            layout,
            config,
            resolve_device(config.device),
            get_arch(config.arch),
            log,
            overwrite=overwrite,
        )
        if layout.config_file.is_file():
            try:
                before = shaping_settings(layout.read_config())
            except ConfigError:
                before = None
            changed = (
                differences(before, shaping_settings(config))
                if before is not None
                else [f"its {layout.config_file.name} is unreadable"]
            )
            if changed and not overwrite:
                raise ConfigError(
                    f"Run directory {layout.root} was made with other settings ("
                    + "; ".join(changed[:8])
                    + "). Pass --overwrite to redo what they change (its artefacts are replaced), "
                    "or choose another --run."
                )
            if changed:
                log(f"settings changed ({'; '.join(changed[:8])}): redoing what they shape")
        write_json_atomic(layout.config_file, config.model_dump(mode="json"))
        return run

    @classmethod
    def open(
        cls,
        out: str | Path,
        log=print,
        device: str | None = None,
        write: bool = False,
        overwrite: bool = False,
    ) -> Run:
        """Re-open a run directory made by ``surgery-edge experts``, ``demo`` or ``run``.

        Args:
            write: the command writes into the run (checked to be writable now).
            overwrite: it may replace artefacts made with other settings.
        """
        layout = RunLayout.open(out, write=write)
        config = layout.read_config()
        if device is not None:
            config = config.model_copy(update={"device": device})
        arch = get_arch(config.arch)
        make_deterministic()
        return cls(layout, config, resolve_device(config.device), arch, log, overwrite=overwrite)

    def join(self, world: World) -> None:
        """Take part in a distributed job as ``world``'s rank: compute on its device; only the
        writer (rank 0) logs and remembers hashes in ``cache/hashes.json``."""
        self.world, self.device = world, world.device
        if not world.is_writer:
            self.log = _silent
            self.layout = RunLayout(self.layout.root, writer=False)  # hashes in memory only

    @property
    def writer(self) -> bool:
        return self.world is None or self.world.is_writer

    @property
    def hashes(self) -> HashCache:
        return self.layout.hashes

    def verify(self, path: Path, fresh: bool = False, explain=None) -> None:
        """Refuse (exit 2) a checkpoint of the run whose content is not what the run made
        (``explain``: loads it as what it should be, for a more specific error first)."""
        self.layout.verify(path, fresh, explain)

    def as_encoder(self, path: Path) -> None:
        """Load ``path`` as an encoder of the run's architecture (CheckpointError otherwise)."""
        load_encoder(path, self.arch)

    def record(self, path: Path) -> None:
        """Remember a checkpoint just written as what the run made (the writer only)."""
        if self.writer:
            self.layout.checksums.record(path, self.hashes)

    @property
    def out(self) -> Path:
        return self.layout.root

    @property
    def tasks(self) -> list[str]:
        return self.layout.tasks(self.config)

    def require_experts(self) -> ExpertSet:
        """Load the suite and the (existing) experts; never trains or imports."""
        prepare_suite(self)
        layout = self.layout
        if not self.config.builtin and layout.pretrained.is_file():
            self.arch = layout.arch()  # e.g. ViT-B-32-quickgelu, as the import found it
        experts = {t: layout.expert(t) for t in self.tasks}
        heads = {t: layout.head(t) for t in self.tasks}
        for p in [layout.pretrained, *experts.values(), *heads.values()]:
            if not p.is_file():
                make = (
                    f"surgery-edge experts --run {self.out}"
                    if self.config.builtin
                    else f"surgery-edge run CONFIG --run {self.out}"
                )
                raise CheckpointError(
                    f"Checkpoint {p} does not exist. Run `{make}` first, or restore the file."
                )
        for p in [layout.pretrained, *experts.values()]:  # heads: where they are loaded
            self.verify(p, explain=self.as_encoder)
        self.experts = ExpertSet(layout.pretrained, experts, heads)
        return self.experts

    def find_merges(self) -> dict[str, Path]:
        self.merged = self.layout.merges()
        return self.merged

    def find_adapters(self) -> dict[tuple[str, str], Path]:
        self.adapters = self.layout.trained_adapters(list(self.merged))
        return self.adapters

    def images_digest(self, task: str, split: str, fresh: bool = False) -> str:
        """The content hash of ``task``'s ``split`` images (a decoded split on disk is hashed
        through the run's hash cache, by file; ``fresh``: from its bytes)."""
        data = self.suite.task(task)
        name = f"{split}_x"
        arr = getattr(data, name)
        if (fresh or name not in data.digests) and isinstance(arr, np.memmap) and arr.filename:
            file = Path(arr.filename)
            if arr.flags.c_contiguous and arr.nbytes == file.stat().st_size - arr.offset:
                data.digests[name] = fingerprint(self.hashes.digest(file, fresh), arr.shape)
        return data.digest(name)

    def split_digest(self, split: str, fresh: bool = False) -> str:
        """The identity of every task's ``split`` images."""
        return fingerprint({t: self.images_digest(t, split, fresh) for t in self.tasks})

    def heads(self) -> list:
        """The heads of the run's tasks, in task order (each checked to be its task's)."""
        return [h.head.eval() for h in self.layout.heads(self.tasks, self.arch)]

    def model(
        self, encoder: Path, adapters: Path | None = None, surgery: str | None = None
    ) -> MultiTaskModel:
        """The multi-task model of an encoder checkpoint (+ adapters) with the run's heads;
        adapters not trained on ``encoder`` as it is now are refused."""
        return self.layout.model(
            encoder, adapters, self.tasks, self.arch, self.device, surgery=surgery
        )

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


@contextmanager
def unused_run_removed(out: str | Path):
    """Remove the run folder this block creates if the block fails before anything but the
    run's ``config.json`` was written into it (e.g. the data it names is missing), so that a
    failed first command leaves nothing behind; a run that holds artefacts is kept."""
    root = Path(out)
    existed = root.exists()
    try:
        yield
    except BaseException:
        if not existed and root.is_dir() and [p.name for p in root.iterdir()] == ["config.json"]:
            (root / "config.json").unlink()
            root.rmdir()
        raise


def prepare_suite(run: Run) -> Suite:
    """The built-in suite (generated once, cached), or the config's tasks read from disk
    (in a distributed job the writer first, so that the others only read what it wrote)."""
    if run.world is not None and run.world.distributed:
        if run.world.is_writer:
            _prepare_suite(run)
        run.world.barrier("preparing the data")
        if not run.world.is_writer:
            _prepare_suite(run)
        return run.suite
    return _prepare_suite(run)


LOGS = "logs"  # RUN/logs/<stage>.jsonl: the training stages' metrics (progress.MetricsLog)


def metrics_file(run: Run, stage: str) -> Path | None:
    """``RUN/logs/<stage>.jsonl``, the metrics log of a training stage (None on the ranks of
    a distributed job that do not write)."""
    return run.layout.root / LOGS / f"{stage}.jsonl" if run.writer else None


def _silent(*args, **kwargs) -> None:
    pass


def _prepare_suite(run: Run) -> Suite:
    s = run.config.suite
    with run.stage("suite"):
        if not run.config.builtin:
            run.suite = disk_suite(run)
            return run.suite
        run.suite = load_or_generate_suite(
            run.layout.suite_file,
            seed=s.seed,
            warn=run.log,
            n_train=s.n_train,
            n_adapt=s.n_adapt,
            n_test=s.n_test,
            size=32,
            tasks=s.tasks,
        )
    return run.suite


def prepare_experts(run: Run) -> ExpertSet:
    """Train the built-in suite's experts, or import the config's checkpoints (both cached)."""
    e = run.config.experts
    with run.stage("experts"):
        if not run.config.builtin:
            record = run.layout.checkpoints / "import.json"
            before = record.read_bytes() if record.is_file() else None
            run.experts = import_checkpoints(run)
            files = [run.experts.pretrained, *run.experts.experts.values()]
            files += run.experts.heads.values()
            imported = not record.is_file() or record.read_bytes() != before
            for path in files:  # what an import just wrote is the run's; what it kept, checked
                if imported:
                    run.record(path)
                else:
                    run.verify(path)
            return run.experts
        run.experts = build_experts(
            run.out / "checkpoints",
            run.suite,
            run.arch,
            run.device,
            PretrainConfig(
                n_per_source=e.pretrain_n_per_source,
                epochs=e.pretrain_epochs,
                lr=e.pretrain_lr,
                seed=run.config.seed,
            ),
            FinetuneConfig(
                epochs=e.finetune_epochs,
                lr=e.finetune_lr,
                batch_size=e.finetune_batch_size,
                seed=run.config.seed,
            ),
            log=run.log,
            hashes=run.hashes,
            overwrite=run.overwrite,
            logs=run.layout.root / LOGS,
            checksums=run.layout.checksums,
        )
    return run.experts


def check_merges(
    run: Run, methods: list[str] | None = None, overrides: dict | None = None, processes: int = 1
) -> tuple[dict, dict[str, dict]]:
    """What merging checks before any work (and before ``--nproc`` starts its processes): the
    methods and their parameters, every output, a learning method's batch against the number
    of processes, and merges already there made with other parameters (ConfigError, unless
    ``run.overwrite``). Returns ``({method: spec}, {method: parameters})``."""
    methods = methods or run.config.merge.methods
    specs = {name: merging.get(name) for name in methods}  # unknown names fail before any work
    declared = {p.name for spec in specs.values() for p in spec.params}
    unknown = sorted(set(overrides or {}) - declared)
    if unknown:
        raise ConfigError(
            f"No chosen merge method takes {unknown}: "
            + " ".join(spec.describe() for spec in specs.values())
        )
    plans = {}
    for name, spec in specs.items():
        params = run.config.merge.params_for(name)
        given = {k: v for k, v in (overrides or {}).items() if k in params}
        plans[name] = spec.resolve({**params, **given})  # values checked before any work
        if spec.needs_data and "batch_size" in plans[name]:
            check_rows(plans[name]["batch_size"], processes, f"Merge method {name!r}: batch_size")
    for name in specs:  # every output checked before any merge is computed
        path = check_output(run.layout.merged(name), "merged model", _is("encoder"))
        old = (recorded(path) or {}).get("provenance") if path.exists() else None
        new = {"method": name, "params": plans[name]}
        if isinstance(old, dict) and not run.overwrite and {k: old.get(k) for k in new} != new:
            what = f"merged model {name!r}"
            check_replace(path, what, new, False, run.log, old={k: old.get(k) for k in new})
    return specs, plans


def run_merges(
    run: Run, methods: list[str] | None = None, overrides: dict | None = None
) -> dict[str, Path]:
    """Merge the experts with every configured method (reusing up-to-date merges).

    Args:
        methods: merge only these (default: the config's list).
        overrides: parameter overrides, e.g. ``{"lam": 0.5}``, for every method that declares
            them; a name no chosen method declares is an error.
    """
    specs, plans = check_merges(run, methods, overrides)
    experts_fp = run.experts.fingerprint(run.hashes)
    todo = {}
    for name, spec in specs.items():
        path = run.layout.merged(name)
        params = plans[name]
        provenance: dict = {"experts": experts_fp, "method": name, "params": params}
        if spec.needs_data:
            split = adaptation_split(run)
            provenance["data"] = {
                "seed": run.config.seed,
                "split": split,
                "images": run.split_digest(split),
            }
        fp = fingerprint(provenance)
        if up_to_date(path, fp) and run.layout.checksums.reusable(
            path, run.hashes, run.overwrite, run.log
        ):
            run.log(f"reusing merge {name}")
            run.merged[name] = path
            continue
        if path.exists() and not up_to_date(path, fp):
            check_replace(path, f"merged model {name!r}", provenance, run.overwrite, run.log)
        todo[name] = (path, provenance, fp)
    if not todo:
        return run.merged
    pre = load_encoder(run.experts.pretrained, run.arch)
    experts = {t: load_encoder(p, run.arch).state_dict for t, p in run.experts.experts.items()}
    for name, (path, provenance, fp) in todo.items():
        spec, params = specs[name], plans[name]
        if not (spec.needs_data or run.writer):  # one rank computes a merge that learns nothing
            run.merged[name] = path
            continue
        with run.stage(f"merge:{name}"):
            context = None
            if spec.needs_data:
                context = AdaMergingContext(
                    encoder=pre.build(run.device),
                    heads={t: h.to(run.device) for t, h in zip(run.tasks, run.heads())},
                    # uint8 arrays (memory-mapped for data from disk), converted per batch
                    images={
                        t: _split_images(run.suite, t, adaptation_split(run)) for t in run.tasks
                    },
                    transform=lambda x: to_model_input(x, run.arch, run.device),
                    seed=run.config.seed,
                    device=run.device,
                    world=run.world,
                )
            if context is None:
                result = spec(pre.state_dict, experts, **params)
            else:
                with (
                    progress_bar(params["steps"], name, show=run.writer) as bar,
                    MetricsLog(metrics_file(run, f"merge-{name}"), method=name, params=params) as m,
                ):
                    context.progress = lambda step, loss: bar.advance(entropy=loss)
                    context.metrics = m
                    result = spec(pre.state_dict, experts, context=context, **params)
            if run.writer:
                save_encoder(
                    path,
                    run.arch,
                    result.state_dict,
                    task=None,
                    recipe=result.recipe,
                    provenance=provenance,
                    fingerprint=fp,
                )
                run.record(path)
        run.merged[name] = path
        stale = run.layout.trained_adapters([name])
        for (_, method), adapters in stale.items():
            run.log(
                f"note: {adapters} was trained on the previous {name} merge and no longer fits "
                f"it; re-train it (surgery-edge train --run {run.out} --merge {name} --surgery "
                f"{method} --overwrite)."
            )
    if run.world is not None:
        run.world.barrier("saving the merged models")
    return run.merged


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
                _split_images(run.suite, task, split),
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


def adaptation_split(run: Run, transductive: bool | None = None) -> str:
    """The unlabelled images AdaMerging and surgery learn from: ``test`` (the paper's
    transductive protocol) or ``adapt``; an empty adaptation split is an error."""
    if run.config.surgery.transductive if transductive is None else transductive:
        return "test"
    empty = [t for t in run.tasks if len(run.suite.task(t).adapt_x) == 0]
    if empty:
        raise ConfigError(
            f"Tasks {empty} have no adaptation images (no adapt/ or train/ folder). Add one, or "
            "set `surgery.transductive: true` to learn from the unlabelled test images as the "
            "paper does."
        )
    return "adapt"


def _split_images(suite: Suite, task: str, split: str) -> np.ndarray:
    data = suite.task(task)
    return {"adapt": data.adapt_x, "test": data.test_x, "train": data.train_x}[split]


def surgery_config(run: Run, method: str) -> SurgeryConfig:
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
    found = experts_representations(run, run.tasks, split, fresh)
    return {t: TaskTargets(_split_images(run.suite, t, split), *found[t]) for t in run.tasks}


def _is(kind: str):
    return lambda path: file_kind(path) == kind


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
    check_output(path, "surgery adapter file", _is("adapters"))
    meta = (recorded(path) or {}) if path.exists() else {}
    old = meta.get("provenance")
    if isinstance(old, dict) and not run.overwrite:
        split = "test" if (transductive or run.config.surgery.transductive) else "adapt"
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
            path,
            run.device,
            merge_recipe=recipe,
            resume=resume,
            extra_meta={"provenance": provenance, "fingerprint": fp, "split": split},
            inputs=fingerprint({k: v for k, v in provenance.items() if k != "settings"}),
            log=run.log,
            world=run.world,
            metrics=metrics_file(run, f"train-{merge_name}-{cfg.method}"),
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

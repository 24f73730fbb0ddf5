"""A run's shared state: :class:`Run` (a run directory plus what its stages have produced),
the data it learns from, and the rules every stage shares (which split is unlabelled).

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

from surgery_edge.data.suite import Suite, load_or_generate_suite
from surgery_edge.device import make_deterministic, resolve_device
from surgery_edge.distributed import World
from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.io import HashCache, fingerprint, write_json_atomic
from surgery_edge.models import ArchSpec, get_arch, load_encoder
from surgery_edge.models.checkpoint import file_kind
from surgery_edge.run.config import RunConfig, differences, shaping_settings
from surgery_edge.run.experts import ExpertSet, FinetuneConfig, PretrainConfig, build_experts
from surgery_edge.run.layout import RunLayout
from surgery_edge.run.recipe import disk_suite, import_checkpoints
from surgery_edge.surgery.model import MultiTaskModel


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
        """The merged models in the run folder (into ``self.merged``)."""
        self.merged = self.layout.merges()
        return self.merged

    def find_adapters(self) -> dict[tuple[str, str], Path]:
        """The adapters trained on those merges (into ``self.adapters``)."""
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
        """Add the block's wall-clock seconds to ``self.timings[name]``."""
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


def unlabelled_split(config: RunConfig, transductive: bool | None = None) -> str:
    """The split whose unlabelled images AdaMerging and surgery learn from and quantisation
    calibrates on: ``test`` (the paper's transductive protocol) or ``adapt``.

    Args:
        transductive: the choice of a command (``train --transductive``); None: the config's.
    """
    if config.surgery.transductive if transductive is None else transductive:
        return "test"
    return "adapt"


def adaptation_split(run: Run, transductive: bool | None = None) -> str:
    """:func:`unlabelled_split` for learning from it: an empty adaptation split is an error
    that says how to train (calibration checks its images itself, with its own advice)."""
    if unlabelled_split(run.config, transductive) == "test":
        return "test"
    empty = [t for t in run.tasks if len(run.suite.task(t).adapt_x) == 0]
    if empty:
        raise ConfigError(
            f"Tasks {empty} have no adaptation images (no adapt/ or train/ folder). Add one, or "
            "set `surgery.transductive: true` to learn from the unlabelled test images as the "
            "paper does."
        )
    return "adapt"


def suite_images(suite: Suite, task: str, split: str) -> np.ndarray:
    """``task``'s ``split`` images as the suite holds them (uint8; memory-mapped from disk)."""
    data = suite.task(task)
    return {"adapt": data.adapt_x, "test": data.test_x, "train": data.train_x}[split]


def is_kind(kind: str) -> Callable[[Path], bool]:
    """Whether a path holds a checkpoint of ``kind`` (:func:`check_output`'s ``same`` test)."""
    return lambda path: file_kind(path) == kind

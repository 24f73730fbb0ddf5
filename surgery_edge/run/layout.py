"""A run directory: where each artefact lives, and what its checkpoints say about the run.

::

    config.json                             the run's settings (RunConfig)
    suite.npz                               the generated built-in suite
    checkpoints/pretrained.safetensors      pretrained backbone
    checkpoints/experts/<task>.safetensors  one fine-tuned encoder per task
    checkpoints/heads/<task>.safetensors    one head per task (its task and class names inside)
    merged/<method>.safetensors             merged backbones (recipe in the metadata)
    adapters/<merge>/<surgery>.safetensors  surgery adapters
    cache/                                  expert representations, decoded datasets
    cache/hashes.json                       content hashes of files, by (size, mtime, inode)
    checksums.json                          each checkpoint's content hash, recorded when made
    engines/                                exported engines
    report.json, report.md, *.png

:class:`RunLayout` answers everything export needs from the checkpoints alone: the tasks (in
task-id order, from the config), their class names (from the heads), the architecture (from
the pretrained checkpoint) and the multi-task model of a merge and its adapters. It never reads
a dataset, so a paper-scale run exports on a machine that holds only its checkpoints.

Every artefact records its provenance in its metadata: a merged model the identity of the experts
and the method's parameters, adapters the content hash of the merged model and of the targets they
were trained on, a head its task. :meth:`RunLayout.model` refuses a pair that does not belong
together (adapters trained on another merge, a head of another task), naming both files and the
command that fixes it, and a checkpoint whose content is not what the run made
(:class:`~surgery_edge.run.provenance.Checksums`). Names that become paths (tasks, merges,
methods) are checked to be plain file names, so nothing is ever read or written outside the run
directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from surgery_edge.data.suite import TASK_NAMES
from surgery_edge.errors import AdapterError, CheckpointError, ConfigError
from surgery_edge.io import HashCache, check_writable, safe_name
from surgery_edge.models.archs import ArchSpec
from surgery_edge.models.checkpoint import HeadCheckpoint, load_encoder, load_head, read_metadata
from surgery_edge.run.config import RunConfig
from surgery_edge.run.provenance import Checksums
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.methods import NONE, SURGERY_METHODS, check_surgery
from surgery_edge.surgery.model import MultiTaskModel


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is created by building one).

    Attributes:
        root: the run directory.
        writer: this process writes into the run (False for the ranks of a distributed job
            other than the first: their content hashes are remembered in memory only).
    """

    root: Path
    writer: bool = field(default=True, compare=False)

    @classmethod
    def open(cls, root: str | os.PathLike, write: bool = False) -> RunLayout:
        """An existing run directory; ConfigError saying how to make one otherwise.

        Args:
            write: the caller will write into it: a folder that cannot be written is refused
                now, before any work.
        """
        layout = cls(Path(root))
        if not layout.config_file.is_file():
            raise ConfigError(
                f"{layout.root} is not a surgery-edge run directory (no config.json). Create one "
                f"with `surgery-edge experts --run {root}` or `surgery-edge demo --run {root}`."
            )
        if write:
            check_writable(layout.root, "run directory")
        return layout

    @classmethod
    def create(cls, root: str | os.PathLike) -> RunLayout:
        """A new run directory, or an existing one; refuses a file, a folder of other things,
        or a place that cannot be written (before any work)."""
        layout = cls(Path(root))
        if layout.root.exists() and not layout.root.is_dir():
            raise ConfigError(
                f"{layout.root} is a file, not a run directory. Choose another --run."
            )
        if (
            layout.root.is_dir()
            and not layout.config_file.is_file()
            and any(not p.name.startswith(".") for p in layout.root.iterdir())
        ):
            raise ConfigError(
                f"{layout.root} already holds other files and is not a surgery-edge run "
                "directory (no config.json), so nothing was written there. Choose a new or empty "
                "folder for --run."
            )
        check_writable(layout.root, "run directory")
        return layout

    @cached_property
    def hashes(self) -> HashCache:
        """Content hashes of the run's files, remembered in ``cache/hashes.json``."""
        return HashCache(self.cache / "hashes.json" if self.writer else None)

    @cached_property
    def checksums(self) -> Checksums:
        """The content hash of each checkpoint, recorded when the run made it."""
        return Checksums(self.root, self.remake)

    def verify(self, path: Path, fresh: bool = False, explain=None) -> None:
        """Refuse (exit 2) a checkpoint of the run whose content is not what the run made.

        Args:
            fresh: hash its bytes again (before publishing what is made from it).
            explain: loads a changed file as what it should be, so that one of another
                architecture (say) is refused as such, the more useful message.
        """
        self.checksums.verify(path, self.hashes, fresh, explain)

    def remake(self, path: Path) -> str:
        """The command that makes the run's file ``path`` again."""
        parts = Path(path).resolve().relative_to(self.root.resolve()).parts
        run = str(self.root)
        if parts[:1] == ("merged",):
            return f"surgery-edge merge --run {run} --method {Path(parts[-1]).stem} --overwrite"
        if parts[:1] == ("adapters",) and len(parts) == 3:
            merge, method = parts[1], Path(parts[2]).stem
            return f"surgery-edge train --run {run} --merge {merge} --surgery {method} --overwrite"
        # experts (and run without --config) take the settings the run recorded
        return f"surgery-edge experts --run {run} --overwrite"

    # --- paths ------------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def suite_file(self) -> Path:
        return self.root / "suite.npz"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def pretrained(self) -> Path:
        return self.checkpoints / "pretrained.safetensors"

    def expert(self, task: str) -> Path:
        return self.checkpoints / "experts" / f"{safe_name(task, 'Task name')}.safetensors"

    def head(self, task: str) -> Path:
        return self.checkpoints / "heads" / f"{safe_name(task, 'Task name')}.safetensors"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    def merged(self, merge: str) -> Path:
        return self.merged_dir / f"{safe_name(merge, 'Merge name')}.safetensors"

    def adapters(self, merge: str, surgery: str) -> Path:
        merge, surgery = safe_name(merge, "Merge name"), safe_name(surgery, "Surgery method")
        return self.root / "adapters" / merge / f"{surgery}.safetensors"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def engines(self) -> Path:
        return self.root / "engines"

    # --- what the files say -----------------------------------------------------------------

    def read_config(self) -> RunConfig:
        try:
            return RunConfig.model_validate(json.loads(self.config_file.read_text()))
        except (OSError, ValueError) as e:  # JSON, UTF-8 and pydantic's errors are ValueErrors
            raise ConfigError(
                f"{self.config_file} is unreadable or invalid ({type(e).__name__}: {e}). Restore "
                "it, or start the run again in a new directory."
            ) from None

    def tasks(self, config: RunConfig | None = None) -> list[str]:
        """The tasks in task-id order, as the config lists them."""
        config = config or self.read_config()
        if config.data is not None:
            return list(config.data.tasks)
        return list(config.suite.tasks or TASK_NAMES)

    def arch(self) -> ArchSpec:
        """The architecture the pretrained checkpoint was saved with."""
        meta = read_metadata(self.pretrained)
        if meta is None or "arch" not in meta:
            raise CheckpointError(
                f"Checkpoint {self.pretrained} is missing or unreadable. Run "
                f"`surgery-edge experts --run {self.root}` (or `surgery-edge run CONFIG`) first."
            )
        try:
            return ArchSpec.from_dict(meta["arch"])
        except ConfigError as e:
            raise CheckpointError(f"Checkpoint {self.pretrained}: {e} Re-create it.") from None

    def heads(self, tasks: list[str], arch: ArchSpec, fresh: bool = False) -> list[HeadCheckpoint]:
        """Every task's head, in ``tasks`` order; each must say it is that task's head, and
        hold what the run made (``fresh``: read its bytes again, before publishing)."""
        out = []
        for task in tasks:
            head = load_head(self.head(task), arch)
            if head.task != task:
                raise CheckpointError(
                    f"Head {self.head(task)} was saved for task {head.task!r}, not {task!r}: it "
                    "is another task's head (or another tool's file). Restore the run's own head "
                    f"file, or re-make the run's checkpoints (surgery-edge experts --run "
                    f"{self.root} --overwrite)."
                )
            self.verify(self.head(task), fresh)
            out.append(head)
        return out

    def check_adapters(self, merged: Path, adapters: Path, meta: dict, fresh: bool = False) -> None:
        """Refuse adapters that were not trained on ``merged`` as it is now, or did not finish.

        The adapter file records the content hash of the merged model it was trained on; a
        merge that was re-made since (other parameters, other experts) no longer fits them.
        ``fresh``: hash the merged model's bytes again (before publishing an engine).
        """
        if meta.get("complete", True) is not True:
            raise AdapterError(
                f"Adapters {adapters} are the last good ones of a run stopped by a non-finite "
                "loss, not trained adapters. Train again with a lower --lr."
            )
        merge = merged.stem
        fix = (
            f"surgery-edge train --run {self.root} --merge {merge} --surgery "
            f"{meta.get('method', 'METHOD')} --overwrite"
        )
        recorded = (meta.get("provenance") or {}).get("merged")
        if not isinstance(recorded, str):
            raise AdapterError(
                f"Adapters {adapters} do not record which merged model they were trained on (an "
                f"older or foreign file), so they cannot be checked against {merged}. Re-train "
                f"them: `{fix}`."
            )
        if recorded != self.hashes.digest(merged, fresh=fresh):
            raise AdapterError(
                f"Adapters {adapters} were trained on another version of {merged} (the merged "
                "model was re-made since, with other parameters or experts), so they do not fit "
                f"it. Re-train them on this merge: `{fix}`."
            )

    def merges(self) -> dict[str, Path]:
        """The merged models present, by name (files whose names are no merge name are not)."""
        folder = self.merged_dir
        if not folder.is_dir():
            return {}
        found = {}
        for p in sorted(folder.glob("*.safetensors")):
            try:
                found[safe_name(p.stem, "Merge name")] = p
            except ConfigError:
                continue
        return found

    def trained_adapters(self, merges: list[str]) -> dict[tuple[str, str], Path]:
        """The adapter files present for ``merges``, by (merge, surgery method)."""
        return {
            (merge, method): self.adapters(merge, method)
            for merge in merges
            for method in SURGERY_METHODS
            if self.adapters(merge, method).is_file()
        }

    def model(
        self,
        merged: Path,
        adapters: Path | None = None,
        tasks: list[str] | None = None,
        arch: ArchSpec | None = None,
        device: str | torch.device = "cpu",
        surgery: str | None = None,
        fresh: bool = False,
    ) -> MultiTaskModel:
        """The multi-task model of a merged backbone (+ adapters) with the run's heads.

        Args:
            surgery: the method the adapters must be (default: the adapter file's name, e.g.
                ``surgeryv2`` for ``adapters/<merge>/surgeryv2.safetensors``).
            fresh: hash the checkpoints' bytes again, not the hash cache's stat (before an
                engine is published from them).

        Raises:
            AdapterError: the adapters are of another method, were trained on another version
                of ``merged``, or are incomplete.
            CheckpointError: a checkpoint's content is not what the run made.
        """
        tasks = tasks if tasks is not None else self.tasks()
        arch = arch or self.arch()
        self.verify(Path(merged), fresh, lambda p: load_encoder(p, arch))
        heads = self.heads(tasks, arch, fresh)
        encoder = load_encoder(merged, arch).build(device)
        bank = None
        if adapters is not None:
            adapters = Path(adapters)
            method = surgery or (adapters.stem if adapters.stem in SURGERY_METHODS else None)
            bank, meta = AdapterBank.load(adapters, arch=arch, tasks=tasks, method=method)
            self.check_adapters(Path(merged), adapters, meta, fresh)
            self.verify(adapters, fresh)
        names = [h.class_names for h in heads]
        model = MultiTaskModel(encoder, [h.head.eval() for h in heads], tasks, bank, names)
        return model.to(device).eval()

    def export_model(
        self, merge: str, surgery: str, device: str | torch.device = "cpu"
    ) -> tuple[MultiTaskModel, dict]:
        """The model of merge ``merge`` with ``surgery``'s adapters (``none``: the plain merge),
        and the engine metadata that describes where it came from.

        An engine is published from it, so every checkpoint is hashed from its bytes here (a
        file changed in place with its modification time restored is seen), not trusted from
        the hash cache's stat."""
        check_surgery(surgery, allow_none=True)
        merges = self.merges()
        if merge not in merges:
            raise ConfigError(
                f"No merged model {merge!r} in {self.merged_dir}; found {sorted(merges)}. Create "
                f"it with `surgery-edge merge --run {self.root} --method {merge}`."
            )
        adapters = None
        if surgery != NONE:
            adapters = self.adapters(merge, surgery)
            if not adapters.is_file():
                raise ConfigError(
                    f"No {surgery} adapters for {merge!r} in {adapters.parent}. Train them with "
                    f"`surgery-edge train --run {self.root} --merge {merge} --surgery {surgery}`."
                )
        model = self.model(merges[merge], adapters, device=device, surgery=surgery, fresh=True)
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise CheckpointError(
                f"The model of {merges[merge]} with {adapters or 'no adapters'} holds non-finite "
                f"weights (e.g. {bad[:3]}); no engine was exported. Re-create the broken file."
            )
        recipe = dict((read_metadata(merges[merge]) or {}).get("recipe", {}))
        source = {"merged": self.hashes.digest(merges[merge], fresh=True)}
        if adapters is not None:
            source["adapters"] = self.hashes.digest(adapters, fresh=True)
        return model, {"merge": merge, "merge_recipe": recipe, "source": source}

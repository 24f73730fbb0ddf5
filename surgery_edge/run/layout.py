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
    engines/                                exported engines
    report.json, report.md, *.png

:class:`RunLayout` answers everything export needs from the checkpoints alone: the tasks (in
task-id order, from the config), their class names (from the heads), the architecture (from
the pretrained checkpoint) and the multi-task model of a merge and its adapters. It never reads
a dataset, so a paper-scale run exports on a machine that holds only its checkpoints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery_edge.data.suite import TASK_NAMES
from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.models.archs import ArchSpec
from surgery_edge.models.checkpoint import HeadCheckpoint, load_encoder, load_head, read_metadata
from surgery_edge.run.config import RunConfig
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.methods import NONE, SURGERY_METHODS, check_surgery
from surgery_edge.surgery.model import MultiTaskModel


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is created by building one)."""

    root: Path

    @classmethod
    def open(cls, root: str | os.PathLike) -> RunLayout:
        """An existing run directory; ConfigError saying how to make one otherwise."""
        layout = cls(Path(root))
        if not layout.config_file.is_file():
            raise ConfigError(
                f"{layout.root} is not a surgery-edge run directory (no config.json). Create one "
                f"with `surgery-edge experts --out {root}` or `surgery-edge demo --out {root}`."
            )
        return layout

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
        return self.checkpoints / "experts" / f"{task}.safetensors"

    def head(self, task: str) -> Path:
        return self.checkpoints / "heads" / f"{task}.safetensors"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    def merged(self, merge: str) -> Path:
        return self.merged_dir / f"{merge}.safetensors"

    def adapters(self, merge: str, surgery: str) -> Path:
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
        except (OSError, ValueError) as e:  # JSONDecodeError and pydantic's errors are ValueErrors
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
                f"`surgery-edge experts --out {self.root}` (or `surgery-edge run CONFIG`) first."
            )
        return ArchSpec.from_dict(meta["arch"])

    def heads(self, tasks: list[str], arch: ArchSpec) -> list[HeadCheckpoint]:
        """Every task's head, in ``tasks`` order; each must say it is that task's head."""
        out = []
        for task in tasks:
            head = load_head(self.head(task), arch)
            if head.task is not None and head.task != task:
                raise CheckpointError(
                    f"Head {self.head(task)} was saved for task {head.task!r}, not {task!r}. "
                    "Restore the run's own head file (or re-run `surgery-edge experts`)."
                )
            out.append(head)
        return out

    def merges(self) -> dict[str, Path]:
        """The merged models present, by name."""
        folder = self.merged_dir
        return {p.stem: p for p in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}

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
    ) -> MultiTaskModel:
        """The multi-task model of a merged backbone (+ adapters) with the run's heads."""
        tasks = tasks if tasks is not None else self.tasks()
        arch = arch or self.arch()
        heads = self.heads(tasks, arch)
        encoder = load_encoder(merged, arch).build(device)
        bank = None if adapters is None else AdapterBank.load(adapters, arch=arch, tasks=tasks)[0]
        names = [h.class_names for h in heads]
        model = MultiTaskModel(encoder, [h.head.eval() for h in heads], tasks, bank, names)
        return model.to(device).eval()

    def export_model(
        self, merge: str, surgery: str, device: str | torch.device = "cpu"
    ) -> tuple[MultiTaskModel, dict]:
        """The model of merge ``merge`` with ``surgery``'s adapters (``none``: the plain merge),
        and the engine metadata that describes where it came from."""
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
                    f"`surgery-edge train --run {self.root} --merge {merge} --method {surgery}`."
                )
        model = self.model(merges[merge], adapters, device=device)
        recipe = dict((read_metadata(merges[merge]) or {}).get("recipe", {}))
        return model, {"merge": merge, "merge_recipe": recipe}

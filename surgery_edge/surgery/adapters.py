"""Surgery adapters and the AdapterBank that stacks every task's adapters per site.

The adapter is ``z_hat = z - W_up · ReLU(W_down · z)`` with no biases, ``W_down`` (r, d)
Kaiming-uniform (torch's ``nn.Linear`` default, a = sqrt(5)) and ``W_up`` (d, r) zero, so an
untrained adapter is the identity.

The bank keeps one tensor per site for all T tasks, ``down[site]: (T, r, d)`` and
``up[site]: (T, d, r)``: routing a batch with one task id per image is a gather, and the fused
Triton kernel reads the same tensors. On disk an adapter file is safetensors with keys
``"{task}/{site}/down"`` (r, d) and ``"{task}/{site}/up"`` (d, r).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from surgery_edge.errors import AdapterError, CheckpointError, ConfigError
from surgery_edge.models.archs import ArchSpec
from surgery_edge.models.checkpoint import load_tensors, save_tensors
from surgery_edge.models.metadata import AdapterMeta, parse_meta
from surgery_edge.surgery.functional import (
    TaskGroups,
    all_tasks_correction,
    grouped_correction,
    routed_correction,
)
from surgery_edge.surgery.methods import get_surgery


def _key(site: str) -> str:
    return site.replace(".", "_")


class AdapterBank(nn.Module):
    """Every task's adapters, stacked per site.

    Args:
        tasks: task names, in the order task ids refer to.
        arch: the backbone architecture (gives each site's width).
        method: a registered surgery method (:mod:`surgery_edge.surgery.methods`): ``surgery``
            (final site) or ``surgeryv2`` (every block and final).
        rank: r.
    """

    def __init__(self, tasks: Sequence[str], arch: ArchSpec, method: str, rank: int = 16):
        super().__init__()
        self.tasks, self.arch, self.method, self.rank = list(tasks), arch, method, rank
        try:
            self.sites = get_surgery(method).sites(arch)
        except ConfigError as e:
            raise AdapterError(str(e)) from None
        widest = min(arch.site_dim(site) for site in self.sites)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= widest:
            raise AdapterError(
                f"Adapter rank must be an integer from 1 to {widest} (the narrowest corrected "
                f"width of {arch.name}), got {rank!r}."
            )
        T = len(self.tasks)
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for site in self.sites:
            d = arch.site_dim(site)
            down = torch.empty(T, rank, d)
            for t in range(T):  # nn.Linear(d, r).weight's default init, per task
                nn.init.kaiming_uniform_(down[t], a=math.sqrt(5))
            self.down[_key(site)] = nn.Parameter(down)
            self.up[_key(site)] = nn.Parameter(torch.zeros(T, d, rank))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def weights(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down (T, r, d), up (T, d, r))`` of ``site``."""
        return self.down[_key(site)], self.up[_key(site)]

    def has(self, site: str) -> bool:
        return _key(site) in self.down

    def correct(
        self, site: str, z: torch.Tensor, task_ids: torch.Tensor | TaskGroups
    ) -> torch.Tensor:
        """Routed correction at ``site`` (a task id per row, or a batch laid out by task);
        identity for sites this bank does not correct."""
        if not self.has(site):
            return z
        down, up = self.weights(site)
        if isinstance(task_ids, TaskGroups):
            return grouped_correction(z, task_ids, down, up)
        return routed_correction(z, task_ids, down, up)

    def correct_all_tasks(self, site: str, z: torch.Tensor) -> torch.Tensor:
        """Every task's correction of the same rows: (B, d) -> (T, B, d)."""
        down, up = self.weights(site)
        return all_tasks_correction(z, down, up)

    # --- files -----------------------------------------------------------------------------

    def metadata(self, merge_recipe: dict | None = None, extra: dict | None = None) -> dict:
        return {
            **(extra or {}),
            "kind": "adapters",
            "method": self.method,
            "rank": self.rank,
            "arch": self.arch.to_dict(),
            "tasks": self.tasks,
            "sites": list(self.sites),
            "merge_recipe": merge_recipe or {},
        }

    def save(
        self, path: str | os.PathLike, merge_recipe: dict | None = None, extra: dict | None = None
    ) -> Path:
        """Write the per-task adapter file (atomically); non-finite adapters are never written."""
        if not all(bool(torch.isfinite(p).all()) for p in self.parameters()):
            raise AdapterError(
                f"Refusing to write {path}: the adapters hold NaN or infinity (training diverged)."
            )
        tensors = {}
        for site in self.sites:
            down, up = self.weights(site)
            for t, task in enumerate(self.tasks):
                tensors[f"{task}/{site}/down"] = down[t]
                tensors[f"{task}/{site}/up"] = up[t]
        return save_tensors(path, tensors, self.metadata(merge_recipe, extra))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        arch: ArchSpec | None = None,
        tasks: Sequence[str] | None = None,
        method: str | None = None,
        rank: int | None = None,
    ) -> tuple[AdapterBank, dict]:
        """Read an adapter file; every expectation given is checked with a clear error.

        Returns the bank and the file's metadata (which carries the merge recipe).
        """
        path = Path(path)
        try:
            tensors, meta = load_tensors(path)
        except CheckpointError as e:  # the same message, as an adapter problem
            raise AdapterError(str(e)) from None
        if meta.get("kind") != "adapters":
            raise AdapterError(f"{path} holds a {meta.get('kind')!r} file, not surgery adapters.")
        fields = parse_meta(AdapterMeta, meta, path, AdapterError, "Re-train the adapters.")
        found_arch = ArchSpec.from_fields(fields.arch)
        if arch is not None and found_arch != arch:
            raise AdapterError(
                f"Adapters {path} were trained for architecture {found_arch.name!r} "
                f"(width {found_arch.width}, {found_arch.layers} blocks, "
                f"embed {found_arch.embed_dim}) "
                f"but the model is {arch.name!r} (width {arch.width}, {arch.layers} blocks, "
                f"embed {arch.embed_dim}). Train adapters for this model."
            )
        if tasks is not None and list(tasks) != fields.tasks:
            raise AdapterError(
                f"Adapters {path} are for tasks {fields.tasks} but the model has tasks "
                f"{list(tasks)}. Use adapters trained for exactly these tasks, in this order."
            )
        if method is not None and method != fields.method:
            raise AdapterError(
                f"Adapters {path} are {fields.method!r} adapters, not {method!r} ones: they "
                f"correct other sites. Use {method} adapters here (surgery-edge train --surgery "
                f"{method})."
            )
        if rank is not None and rank != fields.rank:
            raise AdapterError(f"Adapters {path} have rank {fields.rank}, expected {rank}.")
        try:
            bank = cls(fields.tasks, found_arch, fields.method, fields.rank)
        except AdapterError as e:
            raise AdapterError(f"Adapters {path}: {e} Re-train them.") from None
        if fields.sites is not None and list(fields.sites) != list(bank.sites):
            raise AdapterError(
                f"Adapters {path} record sites {fields.sites}, but {fields.method} adapters of "
                f"{found_arch.name} sit at {list(bank.sites)}. The file is inconsistent: re-train."
            )
        expected = {f"{t}/{s}/{w}" for t in bank.tasks for s in bank.sites for w in ("down", "up")}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise AdapterError(
                f"Adapter file {path} does not match its metadata: missing {missing[:4]}, "
                f"unexpected {extra[:4]}."
            )
        with torch.no_grad():
            for site in bank.sites:
                down, up = bank.weights(site)
                for t, task in enumerate(bank.tasks):
                    for w, target in (("down", down[t]), ("up", up[t])):
                        src = tensors[f"{task}/{site}/{w}"]
                        if src.shape != target.shape:
                            raise AdapterError(
                                f"Adapter {path}: {task}/{site}/{w} has shape {tuple(src.shape)}, "
                                f"expected {tuple(target.shape)} (rank {bank.rank}, width "
                                f"{found_arch.site_dim(site)})."
                            )
                        target.copy_(src)
        return bank, meta

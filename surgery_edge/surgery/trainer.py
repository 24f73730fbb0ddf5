"""Unsupervised surgery training: pull the merged model's representations to each expert's.

Objective (as the reference code): for each task, the mean L1 distance between the corrected
merged representation and that task's expert representation, summed over tasks. V1 uses the
final feature only; V2 adds, for every block, the token mean of the corrected block output.
Only adapter weights train (Adam, lr 1e-3, betas (0.9, 0.999), no weight decay); backbone and
heads are frozen.

Deliberate differences from the reference code (documented in the README):
- One step draws one batch per task and sends all tasks through the backbone together as a
  routed batch (T x batch rows): the same gradient as the reference's per-task loop, one pass.
- V1 caches the merged model's final features as well: its adapter sits after the frozen
  backbone, so re-running the backbone each step (as the reference does) changes nothing.
- Batches are drawn by a generator seeded from (seed, step), so ``resume`` continues exactly the
  sequence an uninterrupted run would have drawn.

Distributed (``world`` of :mod:`surgery_edge.distributed`, several ranks of a torchrun job): every
rank draws the same global batch and keeps its contiguous share of each task's rows; the
adapters train under DistributedDataParallel, each rank's loss weighted so that the averaged
gradient is the one-process gradient of the whole batch. Rank 0 alone reads and writes
checkpoints and adapters; a resumed checkpoint is sent from it to the other ranks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from surgery_edge.data.transforms import to_model_input
from surgery_edge.distributed import World
from surgery_edge.errors import ConfigError, TrainingError
from surgery_edge.io import atomic_path
from surgery_edge.models.encoder import ImageEncoder
from surgery_edge.progress import progress_bar
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.methods import get_surgery
from surgery_edge.surgery.model import MultiTaskModel
from surgery_edge.surgery.targets import BATCH


@dataclass(frozen=True)
class SurgeryConfig:
    """Training settings; the defaults are the reference code's."""

    method: str = "surgeryv2"  # a registered surgery method (surgery_edge.surgery.methods)
    rank: int = 16
    steps: int = 1000  # per task: each step draws one batch of every task
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self):
        """Every setting checked at once, as a ConfigError naming the setting and the value."""
        get_surgery(self.method)  # ConfigError listing the methods
        _check_int("rank", self.rank, 1, 1 << 14)
        _check_int("steps", self.steps, 1, 10**9)
        _check_int("batch_size", self.batch_size, 1, 1 << 16)
        _check_int("seed", self.seed, 0, 2**32 - 1)
        _check_int("checkpoint_every", self.checkpoint_every, 0, 10**9)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ConfigError(f"Surgery setting lr must be a finite number, got {lr!r}.")
        if lr <= 0:
            raise ConfigError(f"Surgery setting lr must be greater than 0, got {lr!r}.")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"Surgery setting {name} must be an integer from {low} to {high}, got {value!r}."
        )


@dataclass
class TaskTargets:
    """One task's training images and its expert's cached representations."""

    images: np.ndarray  # (N, H, W, 3) uint8
    final: np.ndarray  # (N, e) expert final features
    blocks: np.ndarray  # (N, L, d) expert block-output token means
    digest: str = ""  # identity of the cached representations (empty when not cached)


def _batch_indices(seed: int, step: int, task: int, n: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + task) % (2**63))
    return torch.randint(0, n, (batch,), generator=g)


def _state_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".state.pt")


def last_good_path(out_path: str | os.PathLike) -> Path:
    """Where a run stopped by a non-finite loss leaves its last good adapters:
    ``surgeryv2.safetensors`` -> ``surgeryv2.last-good.safetensors`` (never reused)."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.last-good{out_path.suffix}")


def _save_state(
    path: Path, bank: AdapterBank, opt, step: int, cfg: SurgeryConfig, inputs: str | None
) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "bank": bank.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "config": asdict(cfg),
                "inputs": inputs,
            },
            tmp,
        )


def _shaping(settings: dict) -> dict:
    """The settings that shape the adapters (how often they are checkpointed does not)."""
    return {k: v for k, v in settings.items() if k != "checkpoint_every"}


def training_settings(cfg: SurgeryConfig) -> dict:
    """``cfg`` as the adapters' provenance records it."""
    return _shaping(asdict(cfg))


def _resume_from(
    path: Path, bank: AdapterBank, opt, cfg: SurgeryConfig, inputs: str | None, device
) -> tuple[int, str | None]:
    """Load the checkpoint at ``path`` into ``bank`` and ``opt``.

    Returns:
        (the step to continue from, None), or (0, why the checkpoint was not used): it was
        written with other settings or for other inputs (merged model, targets, split), or it
        is unreadable. ``bank`` and ``opt`` are untouched then.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or corrupt files raise many exception types
        return 0, f"it is unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or not {"bank", "opt", "step", "config"} <= set(state):
        return 0, "it is not a surgery training checkpoint"
    if not isinstance(state["config"], dict) or _shaping(state["config"]) != _shaping(asdict(cfg)):
        return 0, f"it was written with other settings ({state['config']})"
    if state.get("inputs") != inputs:
        return 0, "it was written for another merged model, other targets or another data split"
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 < step < cfg.steps:
        return 0, f"it records an impossible step {step!r}"
    saved_bank, saved_opt = bank.state_dict(), opt.state_dict()
    try:
        bank.load_state_dict(state["bank"])
        opt.load_state_dict(state["opt"])
        if not all(bool(torch.isfinite(p).all()) for p in bank.parameters()):
            raise ValueError("non-finite adapters")
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        bank.load_state_dict(saved_bank)
        opt.load_state_dict(saved_opt)
        return 0, f"its contents do not fit these adapters ({type(e).__name__})"
    return step, None


def train_surgery(
    encoder: ImageEncoder,
    model_heads: list,
    tasks: list[str],
    targets: dict[str, TaskTargets],
    cfg: SurgeryConfig,
    out_path: str | os.PathLike,
    device: torch.device,
    merge_recipe: dict | None = None,
    resume: bool = False,
    merged_finals: dict[str, np.ndarray] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    extra_meta: dict | None = None,
    inputs: str | None = None,
    log: Callable[[str], None] = print,
    world: World | None = None,
) -> AdapterBank:
    """Train an AdapterBank for ``tasks`` and save it to ``out_path``.

    Args:
        encoder: the merged backbone (kept frozen).
        model_heads: the task heads, in ``tasks`` order (frozen; unused by the loss).
        targets: per task, training images and the expert's cached representations.
        cfg: method, rank, steps, batch size, lr, seed, checkpoint interval.
        out_path: the adapter ``.safetensors`` file; a ``.state.pt`` beside it holds the
            optimiser state for ``resume`` and is removed when training completes.
        merged_finals: for V1, the merged model's cached final features per task (same order as
            ``targets[t].images``); computed here when missing (split across the ranks).
        resume: continue from the ``.state.pt`` checkpoint if present. A checkpoint written
            with other settings or for other ``inputs`` is not used: training starts again from
            step 0, and ``log`` says so.
        extra_meta: added to the adapter file's metadata (e.g. its provenance).
        inputs: the identity of what the adapters are trained from (the merged model, the
            targets, the data split), recorded in the checkpoint and checked on resume.
        log: receives what happened to a checkpoint that could not be resumed.
        world: the ranks of a distributed job (default: this process alone). ``cfg.batch_size``
            is the global batch per task; ``device`` must be this rank's.

    Raises:
        TrainingError: if the loss becomes NaN/inf. ``out_path`` is left as it was (a file there
            keeps its adapters bit for bit); the last adapters that gave a finite loss go to
            :func:`last_good_path`, marked incomplete, so no later run reuses them.
        DistributedError: a rank of the job was lost.
    """
    world = world or World.single(device)
    world.require_rows(cfg.batch_size, "The batch size per task")
    out_path = Path(out_path)
    torch.manual_seed(cfg.seed)
    bank = AdapterBank(tasks, encoder.arch, cfg.method, cfg.rank)
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    model = MultiTaskModel(encoder, model_heads, tasks, bank).to(device)
    opt = torch.optim.Adam(bank.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    start = 0
    state_path = _state_path(out_path)
    if resume:
        resumed = None
        if world.is_writer and state_path.exists():
            start, why = _resume_from(state_path, bank, opt, cfg, inputs, device)
            if why is not None:
                log(f"not resuming from {state_path}: {why}; training from step 0.")
            elif world.distributed:
                resumed = (start, bank.state_dict(), opt.state_dict())
        resumed = world.broadcast(resumed, "sending the resumed checkpoint")
        if resumed is not None and not world.is_writer:
            start = resumed[0]
            bank.load_state_dict(resumed[1])
            opt.load_state_dict(resumed[2])

    T = len(tasks)
    v1 = bank.sites == ("final",)  # the adapter sits after the frozen backbone
    if v1 and merged_finals is None:
        merged_finals = _merged_finals(encoder, tasks, targets, device, world)
    rows = world.share(cfg.batch_size)  # this rank's rows of every task's batch
    local = len(rows)
    task_ids = torch.arange(T, device=device).repeat_interleave(local)

    def loss_at(step: int) -> torch.Tensor:
        idx = [
            _batch_indices(cfg.seed, step, i, len(targets[t].images), cfg.batch_size).numpy()[
                rows.start : rows.stop
            ]
            for i, t in enumerate(tasks)
        ]
        tgt_final = torch.cat(
            [torch.from_numpy(np.asarray(targets[t].final[j])) for t, j in zip(tasks, idx)]
        ).to(device)
        if v1:
            z = torch.cat(
                [torch.from_numpy(np.asarray(merged_finals[t][j])) for t, j in zip(tasks, idx)]
            ).to(device)
            final, block_means, tgt_blocks = bank.correct("final", z, task_ids), [], None
        else:
            images = torch.cat(
                [
                    to_model_input(targets[t].images[j], encoder.arch, device)
                    for t, j in zip(tasks, idx)
                ]
            )
            final, block_means = model.representations(images, task_ids)
            tgt_blocks = torch.cat(
                [torch.from_numpy(np.asarray(targets[t].blocks[j])) for t, j in zip(tasks, idx)]
            ).to(device)
        # per-task mean L1 over the global batch, summed over tasks (and over sites for V2);
        # scaled by the number of ranks, whose gradients DistributedDataParallel averages
        per_row = (final - tgt_final).abs().mean(dim=-1)
        for layer, m in enumerate(block_means):
            per_row = per_row + (m - tgt_blocks[:, layer]).abs().mean(dim=-1)
        per_task = per_row.view(T, local).sum(dim=1) / cfg.batch_size
        return per_task.sum() * world.size if world.distributed else per_task.sum()

    objective = world.wrap(_Objective(bank, loss_at))
    # The adapters that gave the last finite loss, copied before each update: a NaN stop
    # keeps exactly those (the update that follows them is the one that diverged).
    good = [p.detach().clone() for p in bank.parameters()]
    good_step: int | None = None
    writer = world.is_writer
    with progress_bar(cfg.steps - start, f"{cfg.method} rank {cfg.rank}", show=writer) as bar:
        for step in range(start, cfg.steps):
            loss = objective(step)
            value = world.mean(loss.detach(), "training (sharing the loss)").item()
            if not math.isfinite(value):  # every rank sees the same value and stops
                raise TrainingError(
                    f"Surgery loss became {value} at step {step}. "
                    + _stopped(out_path, bank, good, good_step, merge_recipe, extra_meta, writer)
                    + f" Lower the learning rate (--lr, now {cfg.lr}) or check the expert "
                    "checkpoints and images for NaNs."
                )
            with torch.no_grad():
                for g, p in zip(good, bank.parameters()):
                    g.copy_(p)
            good_step = step
            opt.zero_grad(set_to_none=True)
            with world.lost("training (averaging the gradients)"):
                loss.backward()
            opt.step()
            bar.advance(loss=value)
            if on_step:
                on_step(step, value)
            done = step + 1
            due = cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps
            if due and writer:
                _save_state(state_path, bank, opt, done, cfg, inputs)
    if not all(bool(torch.isfinite(p).all()) for p in bank.parameters()):  # the last update
        raise TrainingError(
            f"The last update of step {cfg.steps - 1} made the adapters non-finite. "
            + _stopped(out_path, bank, good, good_step, merge_recipe, extra_meta, writer)
            + f" Lower the learning rate (--lr, now {cfg.lr})."
        )
    if writer:
        bank.save(out_path, merge_recipe, extra_meta)
        state_path.unlink(missing_ok=True)
        last_good_path(out_path).unlink(missing_ok=True)
    world.barrier("saving the adapters")
    return bank


class _Objective(torch.nn.Module):
    """The adapters as the one module whose gradients DistributedDataParallel averages; its
    forward is one step's loss (the frozen backbone is reached through the closure)."""

    def __init__(self, bank: AdapterBank, loss_at: Callable[[int], torch.Tensor]):
        super().__init__()
        self.bank, self._loss_at = bank, loss_at

    def forward(self, step: int) -> torch.Tensor:
        return self._loss_at(step)


@torch.no_grad()
def _merged_finals(
    encoder: ImageEncoder,
    tasks: list[str],
    targets: dict[str, TaskTargets],
    device: torch.device,
    world: World,
) -> dict[str, np.ndarray]:
    """The merged model's final features of every task's images, each chunk computed by one
    rank and shared with all (a V1 adapter's input never changes, so it is computed once)."""
    finals = {
        t: np.empty((len(targets[t].images), encoder.arch.embed_dim), np.float32) for t in tasks
    }
    units = [
        (t, i, min(i + BATCH, len(targets[t].images)))
        for t in tasks
        for i in range(0, len(targets[t].images), BATCH)
    ]

    def compute(unit):
        t, i, j = unit
        return [encoder(to_model_input(targets[t].images[i:j], encoder.arch, device)).float()]

    def deliver(unit, arrays):
        t, i, j = unit
        finals[t][i:j] = arrays[0]

    world.exchange(units, compute, deliver, everyone=True, what="computing the merged features")
    return finals


def _stopped(
    out_path: Path,
    bank: AdapterBank,
    good: list[torch.Tensor],
    good_step: int | None,
    merge_recipe: dict | None,
    extra_meta: dict | None,
    writer: bool = True,
) -> str:
    """Save the last good adapters beside ``out_path`` (never onto it; only the writer
    writes); say where they are."""
    kept = (
        f"{out_path} was not written; the adapters there are unchanged."
        if out_path.exists()
        else f"Nothing was written to {out_path}."
    )
    if good_step is None:
        return kept + " No step of this run gave a finite loss, so there are no good adapters."
    with torch.no_grad():
        for p, g in zip(bank.parameters(), good):
            p.copy_(g)
    meta = {k: v for k, v in (extra_meta or {}).items() if k != "fingerprint"}
    meta.update(complete=False, last_finite_step=good_step)
    path = bank.save(last_good_path(out_path), merge_recipe, meta) if writer else None
    path = path or last_good_path(out_path)
    return (
        f"{kept} The last adapters that gave a finite loss (as they were at step {good_step}) were "
        f"saved to {path} for inspection; they are marked incomplete and never reused."
    )

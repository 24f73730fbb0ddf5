"""Unsupervised surgery training: pull the merged model's representations to each expert's.

Objective (as the reference code): for each task, the mean L1 distance between the corrected
merged representation and that task's expert representation, summed over tasks. V1 uses the
final feature only; V2 adds, for every block, the token mean of the corrected block output.
Only adapter weights train (Adam, lr 1e-3, betas (0.9, 0.999), no weight decay); backbone and
heads are frozen.

Two update schedules (``SurgeryConfig.schedule``):
- ``joint`` (the default): one step draws one batch of every task and sends all tasks through
  the backbone together as a routed batch (T x batch rows); one Adam step per step. Its gradient
  is the sum of the reference's per-task gradients, taken in one pass.
- ``reference``: the authors' update sequence. Each iteration visits the tasks in order and
  takes two batches of each (the first two batches of a fresh shuffle of its images), one Adam
  step per batch, every task's adapters in one optimiser, with torch 1.10's ``zero_grad``: an
  adapter that has had a gradient once keeps a zero gradient, not None, so every step also moves
  it on its momentum alone. ``steps`` counts batches per task in both schedules, so ``reference``
  makes ``T x steps`` Adam steps.

Deliberate differences from the reference code (documented in the README):
- The ``joint`` schedule is the default (see the README for the measurements behind it).
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

import copy
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from surgery_edge.data.transforms import to_model_input
from surgery_edge.distributed import World
from surgery_edge.errors import TrainingError
from surgery_edge.io import atomic_path
from surgery_edge.models.encoder import ImageEncoder
from surgery_edge.progress import MetricsLog, progress_bar
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.functional import TaskGroups
from surgery_edge.surgery.model import MultiTaskModel
from surgery_edge.surgery.schedule import ReferenceAdam, schedule_draws, schedule_length
from surgery_edge.surgery.settings import SurgeryConfig, shaping, training_settings
from surgery_edge.surgery.targets import BATCH


@dataclass
class TaskTargets:
    """One task's training images and its expert's cached representations."""

    images: np.ndarray  # (N, H, W, 3) uint8
    final: np.ndarray  # (N, e) expert final features
    blocks: np.ndarray  # (N, L, d) expert block-output token means
    digest: str = ""  # identity of the cached representations (empty when not cached)


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
    state = {
        "bank": bank.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "config": asdict(cfg),
        "inputs": inputs,
    }
    state["digest"] = state_digest(state)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def state_digest(state: dict) -> str:
    """SHA-256 of a training checkpoint's content: every tensor's dtype, shape and bytes and
    every other value, in key order (the ``digest`` entry itself left out).

    A checkpoint carries it, so flipped bytes or edited numbers (even finite ones) are found
    before training continues from them.
    """
    h = hashlib.sha256()

    def add(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            h.update(f"dict {len(value)};".encode())
            for key in sorted(value, key=repr):
                h.update(f"{key!r}:".encode())
                add(value[key])
        elif isinstance(value, (list, tuple)):
            h.update(f"list {len(value)};".encode())
            for item in value:
                add(item)
        else:
            h.update(f"{type(value).__name__} {value!r};".encode())

    add({k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def _resume_from(
    path: Path, bank: AdapterBank, opt, cfg: SurgeryConfig, inputs: str | None, device, total: int
) -> tuple[int, str | None]:
    """Load the checkpoint at ``path`` into ``bank`` and ``opt``.

    Returns:
        (the step to continue from, None), or (0, why the checkpoint was not used): it is
        unreadable, its content does not match the digest it was saved with (damaged or
        edited), or it was written with other settings or for other inputs (merged model,
        targets, split). ``bank`` and ``opt`` are untouched then.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or corrupt files raise many exception types
        return 0, f"it is unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or not {"bank", "opt", "step", "config"} <= set(state):
        return 0, "it is not a surgery training checkpoint"
    if "digest" not in state:
        return 0, "it records no digest of its content (written by an earlier version)"
    if state["digest"] != state_digest(state):
        return 0, (
            "its content does not match the digest it was saved with: it was damaged or "
            "edited since, and training from it could go anywhere"
        )
    if not isinstance(state["config"], dict) or shaping(state["config"]) != shaping(asdict(cfg)):
        return 0, f"it was written with other settings ({state['config']})"
    if state.get("inputs") != inputs:
        return 0, "it was written for another merged model, other targets or another data split"
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 < step < total:
        return 0, f"it records an impossible step {step!r}"
    # copies: a state_dict holds the live tensors, which a failed load may have overwritten
    saved_bank, saved_opt = copy.deepcopy(bank.state_dict()), copy.deepcopy(opt.state_dict())
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


@dataclass(frozen=True)
class AdapterOutput:
    """Where trained adapters are written and what they record (only the writer rank writes)."""

    path: Path  # the adapter .safetensors file; its .state.pt checkpoint sits beside it
    merge_recipe: dict | None = None  # the merged backbone's recipe, into the file's metadata
    extra_meta: dict | None = None  # more metadata (e.g. the provenance)
    inputs: str | None = None  # what they are trained from (merge, targets, split): on resume


@dataclass(frozen=True)
class TrainingHooks:
    """Who hears about training as it goes."""

    # each optimiser step's index and the loss it descended
    on_step: Callable[[int, float], None] | None = None
    # the number of optimiser steps made so far and the adapters (the tuning sweep scores them)
    on_update: Callable[[int, AdapterBank], None] | None = None
    log: Callable[[str], None] = print  # what happened to a checkpoint that was not resumed
    # a metrics log (progress.MetricsLog, .jsonl): one row per step, ``step`` (as on_step),
    # ``loss`` (as on_step), ``loss_per_task`` (their sum is ``loss``), ``lr``
    metrics: str | os.PathLike | None = None


def train_surgery(
    encoder: ImageEncoder,
    model_heads: list,
    tasks: list[str],
    targets: dict[str, TaskTargets],
    cfg: SurgeryConfig,
    out: AdapterOutput | str | os.PathLike,
    device: torch.device,
    resume: bool = False,
    merged_finals: dict[str, np.ndarray] | None = None,
    hooks: TrainingHooks | None = None,
    world: World | None = None,
    init: AdapterBank | None = None,
) -> AdapterBank:
    """Train an AdapterBank for ``tasks`` and save it to ``out`` (a path, or the path with
    what the file records).

    Args:
        encoder: the merged backbone (kept frozen).
        model_heads: the task heads, in ``tasks`` order (frozen; unused by the loss).
        targets: per task, training images and the expert's cached representations.
        cfg: method, rank, steps, batch size, lr, seed, checkpoint interval.
        resume: continue from the ``.state.pt`` checkpoint beside the output if there is one
            (it is removed when training completes). One written with other settings or for
            other ``out.inputs`` is not used: training starts again from step 0, and
            ``hooks.log`` says so.
        merged_finals: for V1, the merged model's cached final features per task (same order as
            ``targets[t].images``); computed here when missing (split across the ranks).
        world: the ranks of a distributed job (default: this process alone). ``cfg.batch_size``
            is the global batch per task; ``device`` must be this rank's.
        init: adapters to start from instead of the identity (a warm start: the same tasks,
            method and rank); ``out.inputs`` should then include their identity.

    Raises:
        TrainingError: if the loss becomes NaN/inf. The output is left as it was (a file there
            keeps its adapters bit for bit); the last adapters that gave a finite loss go to
            :func:`last_good_path`, marked incomplete, so no later run reuses them.
        DistributedError: a rank of the job was lost.
    """
    world = world or World.single(device)
    world.require_rows(cfg.batch_size, "The batch size per task")
    out = out if isinstance(out, AdapterOutput) else AdapterOutput(Path(out))
    hooks = hooks or TrainingHooks()
    model, opt = _trainable(encoder, model_heads, tasks, cfg, device, init)
    bank, writer = model.bank, world.is_writer
    total = schedule_length(cfg, len(tasks))
    start = _resume(out, bank, opt, cfg, device, total, world, hooks.log) if resume else 0
    if bank.sites == ("final",) and merged_finals is None:  # V1: after the frozen backbone
        merged_finals = _merged_finals(model.encoder, tasks, targets, device, world)
    loss = _Loss(model, tasks, targets, cfg, device, world, merged_finals)
    objective = world.wrap(_Objective(bank, loss))
    guard = _LastGood(bank, out, writer)
    sizes = [len(targets[t].images) for t in tasks]
    label = f"{cfg.method} rank {cfg.rank}"
    label += " (reference schedule)" if cfg.schedule == "reference" else ""
    with (
        progress_bar(total - start, label, show=writer) as bar,
        MetricsLog(
            hooks.metrics if writer else None,
            method=cfg.method,
            settings=training_settings(cfg),
            first_step=start,  # > 0: resumed from a checkpoint
        ) as metrics_log,
    ):
        for step in range(start, total):
            value = _update(objective, opt, step, cfg, sizes, world, guard)
            bar.advance(loss=value)
            metrics_log.write(step, loss=value, loss_per_task=loss.per_task(), lr=cfg.lr)
            if hooks.on_step:
                hooks.on_step(step, value)
            done = step + 1
            if hooks.on_update:
                hooks.on_update(done, bank)
            due = cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total
            if due and writer:
                _save_state(_state_path(out.path), bank, opt, done, cfg, out.inputs)
    _publish(out, guard, total, cfg, writer)
    world.barrier("saving the adapters")
    return bank


def _trainable(
    encoder: ImageEncoder,
    model_heads: list,
    tasks: list[str],
    cfg: SurgeryConfig,
    device,
    init: AdapterBank | None = None,
) -> tuple[MultiTaskModel, torch.optim.Optimizer | ReferenceAdam]:
    """The model whose new adapters (or ``init``'s values) alone train (seeded by
    ``cfg.seed``), and its optimiser."""
    torch.manual_seed(cfg.seed)
    bank = AdapterBank(tasks, encoder.arch, cfg.method, cfg.rank)
    if init is not None:  # a warm start
        bank.load_state_dict(init.state_dict())
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    model = MultiTaskModel(encoder, model_heads, tasks, bank).to(device)
    if cfg.schedule == "reference":
        return model, ReferenceAdam(bank, cfg.lr)
    adam = torch.optim.Adam(bank.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    return model, adam


def _publish(
    out: AdapterOutput, guard: _LastGood, total: int, cfg: SurgeryConfig, writer: bool
) -> None:
    """Write the trained adapters (finite ones only) and remove the checkpoint and any last
    good adapters of an earlier stop."""
    bank = guard.bank
    if not all(bool(torch.isfinite(p).all()) for p in bank.parameters()):  # the last update
        raise TrainingError(
            f"The last update of step {total - 1} made the adapters non-finite. "
            + guard.restore_and_save()
            + f" Lower the learning rate (--lr, now {cfg.lr})."
        )
    if writer:
        bank.save(out.path, out.merge_recipe, out.extra_meta)
        _state_path(out.path).unlink(missing_ok=True)
        last_good_path(out.path).unlink(missing_ok=True)


def _resume(
    out: AdapterOutput,
    bank: AdapterBank,
    opt,
    cfg: SurgeryConfig,
    device,
    total: int,
    world: World,
    log: Callable[[str], None],
) -> int:
    """The step to continue from: the writer loads ``out``'s checkpoint (if usable; ``log``
    says why not) and sends it to the other ranks."""
    start, resumed = 0, None
    state_path = _state_path(out.path)
    if world.is_writer and state_path.exists():
        start, why = _resume_from(state_path, bank, opt, cfg, out.inputs, device, total)
        if why is not None:
            log(f"not resuming from {state_path}: {why}; training from step 0.")
        elif world.distributed:
            resumed = (start, bank.state_dict(), opt.state_dict())
    resumed = world.broadcast(resumed, "sending the resumed checkpoint")
    if resumed is not None and not world.is_writer:
        start = resumed[0]
        bank.load_state_dict(resumed[1])
        opt.load_state_dict(resumed[2])
    return start


def _update(
    objective, opt, step: int, cfg: SurgeryConfig, sizes: list[int], world: World,
    guard: _LastGood,
) -> float:  # fmt: skip
    """One optimiser step; returns the loss it descended (every rank sees the same value).

    Raises:
        TrainingError: the loss is not finite (the last good adapters are kept first).
    """
    loss = objective(step)
    value = world.mean(loss.detach(), "training (sharing the loss)").item()
    if not math.isfinite(value):  # every rank sees the same value and stops
        raise TrainingError(
            f"Surgery loss became {value} at step {step}. "
            + guard.restore_and_save()
            + f" Lower the learning rate (--lr, now {cfg.lr}) or check the expert "
            "checkpoints and images for NaNs."
        )
    guard.keep(step)
    opt.zero_grad(set_to_none=True)
    with world.lost("training (averaging the gradients)"):
        loss.backward()
    if cfg.schedule == "reference":
        opt.step({i for i, _ in schedule_draws(cfg, step, sizes)})
    else:
        opt.step()
    return value


class _LastGood:
    """The adapters that gave the last finite loss, copied before each update: a NaN stop
    keeps exactly those (the update that follows them is the one that diverged)."""

    def __init__(self, bank: AdapterBank, out: AdapterOutput, writer: bool):
        self.bank, self.out, self.writer = bank, out, writer
        self.params = [p.detach().clone() for p in bank.parameters()]
        self.step: int | None = None

    @torch.no_grad()
    def keep(self, step: int) -> None:
        for g, p in zip(self.params, self.bank.parameters()):
            g.copy_(p)
        self.step = step

    def restore_and_save(self) -> str:
        """Put them back into the bank and save them beside the output; say where."""
        o = self.out
        return _stopped(
            o.path, self.bank, self.params, self.step, o.merge_recipe, o.extra_meta, self.writer
        )


class _Loss:
    """One step's loss: per task, the mean L1 distance between the corrected merged
    representations and the expert's over the global batch, summed over tasks (and over sites
    for V2). This rank computes its share of each task's rows; the sum is scaled by the number
    of ranks, whose gradients DistributedDataParallel averages."""

    def __init__(
        self, model: MultiTaskModel, tasks: list[str], targets: dict[str, TaskTargets],
        cfg: SurgeryConfig, device: torch.device, world: World,
        merged_finals: dict[str, np.ndarray] | None,
    ):  # fmt: skip
        self.model, self.bank, self.arch = model, model.bank, model.encoder.arch
        self.tasks, self.targets, self.cfg, self.device = tasks, targets, cfg, device
        self.world, self.merged_finals = world, merged_finals
        self.v1 = self.bank.sites == ("final",)  # corrects the cached merged final features
        self.rows = world.share(cfg.batch_size)  # this rank's rows of every task's batch
        self.sizes = [len(targets[t].images) for t in tasks]
        self.last: dict = {}  # the last step's per-task losses, for the metrics log

    def __call__(self, step: int) -> torch.Tensor:
        rows, local, device, targets = self.rows, len(self.rows), self.device, self.targets
        draws = [
            (i, self.tasks[i], j[rows.start : rows.stop])
            for i, j in schedule_draws(self.cfg, step, self.sizes)
        ]
        # the batch is laid out by task: each task's adapters are applied once to its rows
        groups = TaskGroups(torch.tensor([i for i, _, _ in draws], device=device), local)
        tgt_final = torch.cat(
            [torch.from_numpy(np.asarray(targets[t].final[j])) for _, t, j in draws]
        ).to(device)
        if self.v1:
            z = torch.cat(
                [torch.from_numpy(np.asarray(self.merged_finals[t][j])) for _, t, j in draws]
            ).to(device)
            final, block_means, tgt_blocks = self.bank.correct("final", z, groups), [], None
        else:
            images = torch.cat(
                [to_model_input(targets[t].images[j], self.arch, device) for _, t, j in draws]
            )
            final, block_means = self.model.representations(images, groups)
            tgt_blocks = torch.cat(
                [torch.from_numpy(np.asarray(targets[t].blocks[j])) for _, t, j in draws]
            ).to(device)
        per_row = (final - tgt_final).abs().mean(dim=-1)
        for layer, m in enumerate(block_means):
            per_row = per_row + (m - tgt_blocks[:, layer]).abs().mean(dim=-1)
        per_task = per_row.view(len(draws), local).sum(dim=1) / self.cfg.batch_size
        self.last["per_task"] = ([t for _, t, _ in draws], per_task.detach())
        world = self.world
        return per_task.sum() * world.size if world.distributed else per_task.sum()

    def per_task(self) -> dict[str, float]:
        """The last step's loss per task (:func:`_task_losses`)."""
        return _task_losses(self.last, self.world)


def _task_losses(last: dict, world: World) -> dict[str, float]:
    """The last step's loss per task over the whole batch (every rank's share summed)."""
    names, per_task = last["per_task"]
    if world.distributed:  # each rank holds its rows' share: their sum is the task's loss
        what = "training (sharing the per-task losses)"
        per_task = torch.stack([world.mean(x, what) * world.size for x in per_task])
    out: dict[str, float] = {}
    for name, value in zip(names, per_task.tolist()):
        out[name] = out.get(name, 0.0) + value
    return out


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

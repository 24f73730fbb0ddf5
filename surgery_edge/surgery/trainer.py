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
from surgery_edge.errors import ConfigError, TrainingError
from surgery_edge.io import atomic_path
from surgery_edge.models.encoder import ImageEncoder
from surgery_edge.progress import MetricsLog, progress_bar
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.functional import TaskGroups
from surgery_edge.surgery.methods import SCHEDULES, SURGERY_V2, get_surgery
from surgery_edge.surgery.model import MultiTaskModel
from surgery_edge.surgery.targets import BATCH

REFERENCE_VISIT = 2  # batches of one task per visit in the authors' loop


@dataclass(frozen=True)
class SurgeryConfig:
    """Training settings; the defaults are the reference code's."""

    method: str = SURGERY_V2  # a registered surgery method (surgery_edge.surgery.methods)
    rank: int = 16
    steps: int = 1000  # per task: each step draws one batch of every task
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 100
    schedule: str = "joint"  # one of SCHEDULES

    def __post_init__(self):
        """Every setting checked at once, as a ConfigError naming the setting and the value."""
        get_surgery(self.method)  # ConfigError listing the methods
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"Surgery setting schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}."
            )
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


def reference_batch_indices(
    seed: int, iteration: int, task: int, n: int, batch: int, visit_batch: int
) -> torch.Tensor:
    """Batch ``visit_batch`` (0 or 1) of ``task`` in iteration ``iteration`` of the authors'
    loop: the first batches of a fresh shuffle of the task's ``n`` images (drawn without
    replacement; a task with fewer than two batches of images wraps round its shuffle)."""
    g = torch.Generator().manual_seed(((seed * 1_000_033 + iteration) * 1013 + task) % (2**63))
    order = torch.randperm(n, generator=g)
    need = (visit_batch + 1) * batch
    if need > n:
        order = order.repeat(-(-need // n))
    return order[visit_batch * batch : need]


def schedule_length(cfg: SurgeryConfig, num_tasks: int) -> int:
    """Optimiser steps of a training run: ``steps``, or ``T x steps`` for ``reference``."""
    return cfg.steps * (num_tasks if cfg.schedule == "reference" else 1)


def schedule_draws(
    cfg: SurgeryConfig, update: int, sizes: list[int]
) -> list[tuple[int, np.ndarray]]:
    """The batches of optimiser step ``update``: ``[(task index, image indices), ...]``.

    ``joint``: one batch of every task. ``reference``: one batch of one task; iteration ``k``
    visits the tasks in order and takes ``REFERENCE_VISIT`` batches of each (fewer in a last,
    partial iteration when ``steps`` is not a multiple of it).
    """
    B, T = cfg.batch_size, len(sizes)
    if cfg.schedule == "joint":
        return [(i, _batch_indices(cfg.seed, update, i, n, B).numpy()) for i, n in enumerate(sizes)]
    full, per_iter = cfg.steps // REFERENCE_VISIT, T * REFERENCE_VISIT
    if update < full * per_iter:
        iteration, r = divmod(update, per_iter)
        task, b = divmod(r, REFERENCE_VISIT)
    else:  # the last, partial iteration: one batch of each task
        iteration, task, b = full, update - full * per_iter, 0
    idx = reference_batch_indices(cfg.seed, iteration, task, sizes[task], B, b)
    return [(task, idx.numpy())]


class _ReferenceAdam:
    """torch.optim.Adam as the authors' loop drives it under torch 1.10.

    The reference keeps one module per task, so Adam holds one parameter per (task, site,
    weight): here a leaf per row of the bank's stacked tensors. A step copies the gradient of
    the tasks in the batch into their leaves; ``zero_grad`` zeroes gradients instead of freeing
    them, so a leaf that has had a gradient once takes part in every later step (moved by its
    momentum alone), while one that never had one is skipped, as torch's Adam skips a None
    gradient. The leaves are copied back into the bank after each step.
    """

    def __init__(self, bank: AdapterBank, lr: float):
        self.bank = bank
        self.rows = [(p, t) for p in bank.parameters() for t in range(p.shape[0])]
        self.leaves = [torch.nn.Parameter(p.detach()[t].clone()) for p, t in self.rows]
        self.opt = torch.optim.Adam(self.leaves, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 (as torch 1.10)
        for p in self.bank.parameters():
            p.grad = None
        for leaf in self.leaves:
            if leaf.grad is not None:
                leaf.grad.zero_()

    def step(self, tasks: set[int]) -> None:
        for (p, t), leaf in zip(self.rows, self.leaves):
            if t in tasks:  # the reference's graph reaches only these tasks' adapters
                if leaf.grad is None:
                    leaf.grad = p.grad[t].detach().clone()
                else:
                    leaf.grad.copy_(p.grad[t])
        self.opt.step()
        self._to_bank()

    @torch.no_grad()
    def _to_bank(self) -> None:
        for (p, t), leaf in zip(self.rows, self.leaves):
            p[t].copy_(leaf)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Adam's state, for adapters already loaded into the bank: the leaves take the bank's
        values, and every leaf Adam has stepped gets its zero gradient back."""
        with torch.no_grad():
            for (p, t), leaf in zip(self.rows, self.leaves):
                leaf.copy_(p[t])
                leaf.grad = None
        self.opt.load_state_dict(state)
        for leaf in self.leaves:
            if self.opt.state.get(leaf):
                leaf.grad = torch.zeros_like(leaf)


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


def _shaping(settings: dict) -> dict:
    """The settings that shape the adapters (how often they are checkpointed does not)."""
    return {k: v for k, v in settings.items() if k != "checkpoint_every"}


def training_settings(cfg: SurgeryConfig) -> dict:
    """``cfg`` as the adapters' provenance records it. The default ``joint`` schedule is left
    out, so adapters written before schedules existed (all joint) still match their settings."""
    settings = _shaping(asdict(cfg))
    if settings["schedule"] == "joint":
        del settings["schedule"]
    return settings


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
    if not isinstance(state["config"], dict) or _shaping(state["config"]) != _shaping(asdict(cfg)):
        return 0, f"it was written with other settings ({state['config']})"
    if state.get("inputs") != inputs:
        return 0, "it was written for another merged model, other targets or another data split"
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 < step < total:
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
    on_update: Callable[[int, AdapterBank], None] | None = None,
    extra_meta: dict | None = None,
    inputs: str | None = None,
    log: Callable[[str], None] = print,
    world: World | None = None,
    metrics: str | os.PathLike | None = None,
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
        on_step: called with each optimiser step's index and the loss it descended.
        on_update: called with the number of optimiser steps made so far and the adapters,
            after each update (the tuning sweep scores intermediate adapters through it).
        extra_meta: added to the adapter file's metadata (e.g. its provenance).
        inputs: the identity of what the adapters are trained from (the merged model, the
            targets, the data split), recorded in the checkpoint and checked on resume.
        log: receives what happened to a checkpoint that could not be resumed.
        world: the ranks of a distributed job (default: this process alone). ``cfg.batch_size``
            is the global batch per task; ``device`` must be this rank's.
        metrics: a metrics log (:class:`~surgery_edge.progress.MetricsLog`, ``.jsonl``) to
            append one row per step to: ``step`` (0-based, as ``on_step``), ``loss`` (the
            value ``on_step`` gets), ``loss_per_task`` (their sum is ``loss``), ``lr``.

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
    reference = cfg.schedule == "reference"
    if reference:
        opt = _ReferenceAdam(bank, cfg.lr)
    else:
        opt = torch.optim.Adam(bank.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    T = len(tasks)
    total = schedule_length(cfg, T)
    start = 0
    state_path = _state_path(out_path)
    if resume:
        resumed = None
        if world.is_writer and state_path.exists():
            start, why = _resume_from(state_path, bank, opt, cfg, inputs, device, total)
            if why is not None:
                log(f"not resuming from {state_path}: {why}; training from step 0.")
            elif world.distributed:
                resumed = (start, bank.state_dict(), opt.state_dict())
        resumed = world.broadcast(resumed, "sending the resumed checkpoint")
        if resumed is not None and not world.is_writer:
            start = resumed[0]
            bank.load_state_dict(resumed[1])
            opt.load_state_dict(resumed[2])

    v1 = bank.sites == ("final",)  # the adapter sits after the frozen backbone
    if v1 and merged_finals is None:
        merged_finals = _merged_finals(encoder, tasks, targets, device, world)
    rows = world.share(cfg.batch_size)  # this rank's rows of every task's batch
    local = len(rows)
    sizes = [len(targets[t].images) for t in tasks]
    last: dict = {}  # the last step's per-task losses, for the metrics log

    def loss_at(step: int) -> torch.Tensor:
        draws = [
            (i, tasks[i], j[rows.start : rows.stop]) for i, j in schedule_draws(cfg, step, sizes)
        ]
        # the batch is laid out by task: each task's adapters are applied once to its rows
        groups = TaskGroups(torch.tensor([i for i, _, _ in draws], device=device), local)
        tgt_final = torch.cat(
            [torch.from_numpy(np.asarray(targets[t].final[j])) for _, t, j in draws]
        ).to(device)
        if v1:
            z = torch.cat(
                [torch.from_numpy(np.asarray(merged_finals[t][j])) for _, t, j in draws]
            ).to(device)
            final, block_means, tgt_blocks = bank.correct("final", z, groups), [], None
        else:
            images = torch.cat(
                [to_model_input(targets[t].images[j], encoder.arch, device) for _, t, j in draws]
            )
            final, block_means = model.representations(images, groups)
            tgt_blocks = torch.cat(
                [torch.from_numpy(np.asarray(targets[t].blocks[j])) for _, t, j in draws]
            ).to(device)
        # per-task mean L1 over the global batch, summed over tasks (and over sites for V2);
        # scaled by the number of ranks, whose gradients DistributedDataParallel averages
        per_row = (final - tgt_final).abs().mean(dim=-1)
        for layer, m in enumerate(block_means):
            per_row = per_row + (m - tgt_blocks[:, layer]).abs().mean(dim=-1)
        per_task = per_row.view(len(draws), local).sum(dim=1) / cfg.batch_size
        last["per_task"] = ([t for _, t, _ in draws], per_task.detach())
        return per_task.sum() * world.size if world.distributed else per_task.sum()

    objective = world.wrap(_Objective(bank, loss_at))
    # The adapters that gave the last finite loss, copied before each update: a NaN stop
    # keeps exactly those (the update that follows them is the one that diverged).
    good = [p.detach().clone() for p in bank.parameters()]
    good_step: int | None = None
    writer = world.is_writer
    label = f"{cfg.method} rank {cfg.rank}" + (" (reference schedule)" if reference else "")
    with (
        progress_bar(total - start, label, show=writer) as bar,
        MetricsLog(
            metrics if writer else None,
            method=cfg.method,
            settings=training_settings(cfg),
            first_step=start,  # > 0: resumed from a checkpoint
        ) as metrics_log,
    ):
        for step in range(start, total):
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
            if reference:
                opt.step({i for i, _ in schedule_draws(cfg, step, sizes)})
            else:
                opt.step()
            bar.advance(loss=value)
            metrics_log.write(step, loss=value, loss_per_task=_task_losses(last, world), lr=cfg.lr)
            if on_step:
                on_step(step, value)
            done = step + 1
            if on_update:
                on_update(done, bank)
            due = cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total
            if due and writer:
                _save_state(state_path, bank, opt, done, cfg, inputs)
    if not all(bool(torch.isfinite(p).all()) for p in bank.parameters()):  # the last update
        raise TrainingError(
            f"The last update of step {total - 1} made the adapters non-finite. "
            + _stopped(out_path, bank, good, good_step, merge_recipe, extra_meta, writer)
            + f" Lower the learning rate (--lr, now {cfg.lr})."
        )
    if writer:
        bank.save(out_path, merge_recipe, extra_meta)
        state_path.unlink(missing_ok=True)
        last_good_path(out_path).unlink(missing_ok=True)
    world.barrier("saving the adapters")
    return bank


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

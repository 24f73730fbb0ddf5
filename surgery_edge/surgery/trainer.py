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
from surgery_edge.errors import TrainingError
from surgery_edge.io import atomic_path
from surgery_edge.models.encoder import ImageEncoder
from surgery_edge.progress import progress_bar
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.model import MultiTaskModel


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


@dataclass
class TaskTargets:
    """One task's training images and its expert's cached representations."""

    images: np.ndarray  # (N, H, W, 3) uint8
    final: np.ndarray  # (N, e) expert final features
    blocks: np.ndarray  # (N, L, d) expert block-output token means


def _batch_indices(seed: int, step: int, task: int, n: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + task) % (2**63))
    return torch.randint(0, n, (batch,), generator=g)


def _state_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".state.pt")


def _save_state(path: Path, bank: AdapterBank, opt, step: int, cfg: SurgeryConfig) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "bank": bank.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "config": asdict(cfg),
            },
            tmp,
        )


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
            ``targets[t].images``); computed here when missing.
        resume: continue from the ``.state.pt`` checkpoint if present.
        extra_meta: added to the adapter file's metadata (e.g. a cache fingerprint).

    Raises:
        TrainingError: if the loss becomes NaN/inf; the last good adapters are saved first.
    """
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
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state["config"] != asdict(cfg):
            raise TrainingError(
                f"Cannot resume from {state_path}: it was written with {state['config']}, "
                f"not {asdict(cfg)}. Use the same settings, or start again without --resume."
            )
        bank.load_state_dict(state["bank"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])

    T = len(tasks)
    v1 = bank.sites == ("final",)  # the adapter sits after the frozen backbone
    if v1 and merged_finals is None:
        merged_finals = {}
        with torch.no_grad():
            for t in tasks:
                imgs = targets[t].images
                merged_finals[t] = torch.cat(
                    [
                        encoder(to_model_input(imgs[i : i + 256], encoder.arch, device)).cpu()
                        for i in range(0, len(imgs), 256)
                    ]
                ).numpy()
    task_ids = torch.arange(T, device=device).repeat_interleave(cfg.batch_size)

    def loss_at(step: int) -> torch.Tensor:
        idx = [
            _batch_indices(cfg.seed, step, i, len(targets[t].images), cfg.batch_size).numpy()
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
        # per-task mean L1, summed over tasks (and over sites for V2)
        per_row = (final - tgt_final).abs().mean(dim=-1)
        for layer, m in enumerate(block_means):
            per_row = per_row + (m - tgt_blocks[:, layer]).abs().mean(dim=-1)
        return per_row.view(T, cfg.batch_size).mean(dim=1).sum()

    with progress_bar(cfg.steps - start, f"{cfg.method} rank {cfg.rank}") as bar:
        for step in range(start, cfg.steps):
            loss = loss_at(step)
            value = loss.item()
            if not math.isfinite(value):
                bank.save(out_path, merge_recipe, extra_meta)
                last = f"after step {step - 1}" if step else "the untrained initial ones"
                raise TrainingError(
                    f"Surgery loss became {value} at step {step}. The last good adapters "
                    f"({last}) were saved to {out_path}. Lower the learning rate (--lr, now "
                    f"{cfg.lr}) or check the expert checkpoints and images for NaNs."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.advance(loss=value)
            if on_step:
                on_step(step, value)
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _save_state(state_path, bank, opt, done, cfg)
    bank.save(out_path, merge_recipe, extra_meta)
    if state_path.exists():
        state_path.unlink()
    return bank

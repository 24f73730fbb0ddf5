"""Pretraining the small backbone and fine-tuning one expert per task.

Pretraining uses pretext labels only (which renderer drew an image, and by how much it was
rotated), never the eight tasks' labels: the stand-in for CLIP's broad pretraining. Each expert
then fine-tunes the whole encoder plus its own head, initialised from the class prototypes of
the pretrained features (the stand-in for a CLIP zero-shot head).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from surgery_edge.data.suite import Suite, TaskData, pretraining_corpus
from surgery_edge.data.transforms import to_model_input
from surgery_edge.errors import CheckpointError
from surgery_edge.io import HashCache, fingerprint, safe_name
from surgery_edge.models import (
    ArchSpec,
    ClassificationHead,
    ImageEncoder,
    build_encoder,
    load_encoder,
    load_head,
    prototype_head,
    save_encoder,
    save_head,
)
from surgery_edge.progress import MetricsLog, progress_bar
from surgery_edge.run.provenance import Checksums, check_replace, recorded


@dataclass(frozen=True)
class PretrainConfig:
    n_per_source: int = 1000
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    logit_scale: float = 20.0
    seed: int = 0


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def encode(
    encoder: ImageEncoder,
    images: np.ndarray,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:  # (N, embed_dim) on CPU
    """Features of uint8 images (N, H, W, 3) through ``encoder`` in eval mode."""
    encoder.eval()
    out = []
    for i in range(0, len(images), batch_size):
        out.append(encoder(to_model_input(images[i : i + batch_size], encoder.arch, device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, encoder.arch.embed_dim)


@torch.no_grad()
def accuracy(
    encoder: ImageEncoder,
    head: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy in percent."""
    feats = encode(encoder, images, device=device)
    pred = head.to("cpu")(feats).argmax(-1).numpy()
    return float((pred == labels).mean() * 100.0)


def _rotate_batch(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    for r in range(1, 4):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    return out


def _masked_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rows that have a target (target >= 0); 0 when none do."""
    keep = target >= 0
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], target[keep])


def pretrain(
    arch: ArchSpec, cfg: PretrainConfig, device: torch.device, metrics: Path | None = None
) -> dict[str, torch.Tensor]:
    """Pretrain an encoder on the task-label-free pretext mixture; return its state dict.

    ``metrics``: a metrics log (``.jsonl``) to append each step's loss and lr to.
    """
    torch.manual_seed(cfg.seed)
    corpus = pretraining_corpus(cfg.seed, cfg.n_per_source, arch.image_size)
    images = corpus.images
    encoder = build_encoder(arch).to(device)
    # one linear read-out per target kind: sources | rotation | letters
    sizes = [int(corpus.sources.max()) + 1, 4, int(corpus.letters.max()) + 1]
    pretext = nn.Linear(arch.embed_dim, sum(sizes)).to(device)
    params = list(encoder.parameters()) + list(pretext.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(images) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, total, total // 20))
    g = torch.Generator().manual_seed(cfg.seed)
    sources, letters = torch.from_numpy(corpus.sources), torch.from_numpy(corpus.letters)
    encoder.train()
    with (
        progress_bar(total, "pretraining") as bar,
        MetricsLog(metrics, stage="pretraining", settings=asdict(cfg)) as metrics_log,
    ):
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(images), generator=g)
            for s in range(steps_per_epoch):
                idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                rot = torch.randint(0, 4, (len(idx),), generator=g)
                x = _rotate_batch(to_model_input(images[idx.numpy()], arch, device), rot.to(device))
                outs = pretext(encoder(x)).split(sizes, dim=1)
                wanted = [sources[idx], rot, letters[idx]]
                loss = sum(_masked_ce(o, y.to(device)) for o, y in zip(outs, wanted))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                value = loss.item()
                bar.advance(loss=value)
                metrics_log.write(sched.last_epoch - 1, loss=value, lr=lr)
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}


def finetune_expert(
    arch: ArchSpec,
    pretrained: dict[str, torch.Tensor],
    task: TaskData,
    cfg: FinetuneConfig,
    device: torch.device,
    metrics: Path | None = None,
) -> tuple[dict[str, torch.Tensor], ClassificationHead]:
    """Fine-tune the whole encoder and a prototype-initialised head on ``task``'s train split.

    ``metrics``: a metrics log (``.jsonl``) to append each step's loss and lr to.
    """
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(arch)
    encoder.load_state_dict(pretrained)
    encoder.to(device)
    feats = encode(encoder, task.train_x, device=device)
    head = prototype_head(
        feats, torch.from_numpy(task.train_y), task.num_classes, cfg.logit_scale
    ).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(task.train_x) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, total, total // 10))
    g = torch.Generator().manual_seed(cfg.seed)
    labels = torch.from_numpy(task.train_y)
    encoder.train()
    with (
        progress_bar(total, f"expert {task.name}") as bar,
        MetricsLog(metrics, stage="expert", task=task.name, settings=asdict(cfg)) as metrics_log,
    ):
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(task.train_x), generator=g)
            for s in range(steps_per_epoch):
                idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                x = to_model_input(task.train_x[idx.numpy()], arch, device)
                loss = F.cross_entropy(head(encoder(x)), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                value = loss.item()
                bar.advance(loss=value)
                metrics_log.write(sched.last_epoch - 1, loss=value, lr=lr)
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    return state, head.cpu().eval()


@dataclass
class ExpertSet:
    """Paths of the pretrained checkpoint and of every task's expert and head."""

    pretrained: Path
    experts: dict[str, Path]
    heads: dict[str, Path]

    def fingerprint(self, hashes: HashCache) -> str:
        """Identity of every checkpoint's content, for the fingerprints of what is made from
        them (where the files are plays no part)."""
        paths = [self.pretrained, *self.experts.values(), *self.heads.values()]
        return fingerprint(*(hashes.digest(p) for p in paths))


def _reusable(path: Path, arch: ArchSpec, record: dict[str, Any]) -> bool | None:
    """True: ``path`` is a valid encoder recording ``record``; False: it exists but records
    something else (or is damaged); None: it does not exist."""
    if not path.exists():
        return None
    try:
        ckpt = load_encoder(path, arch)
    except CheckpointError:
        return False
    return all(ckpt.meta.get(k) == v for k, v in record.items())


def _head_fits(path: Path, arch: ArchSpec, task: str, provenance: dict) -> bool:
    try:
        head = load_head(path, arch)
    except CheckpointError:
        return False
    return head.task == task and head.meta.get("provenance") == provenance


def build_experts(
    out_dir: str | Path,
    suite: Suite,
    arch: ArchSpec,
    device: torch.device,
    pretrain_cfg: PretrainConfig = PretrainConfig(),
    finetune_cfg: FinetuneConfig = FinetuneConfig(),
    log=print,
    hashes: HashCache | None = None,
    overwrite: bool = False,
    logs: Path | None = None,
    checksums: Checksums | None = None,
) -> ExpertSet:
    """Pretrain and fine-tune every task's expert into ``out_dir``; finished work is reused.

    Layout: ``pretrained.safetensors``, ``experts/<task>.safetensors`` and
    ``heads/<task>.safetensors``. A checkpoint is reused only when it records the requested
    training config and provenance (for an expert and its head: the pretrained checkpoint's and
    the task's training split's content hashes, and the class names). ``logs``: a folder for
    the metrics logs of what is trained (``pretrain.jsonl``, ``expert-<task>.jsonl``).

    ``checksums`` (the run's record of what it made) records every checkpoint written; one
    that would be reused but whose content changed since is made again with ``overwrite``.

    Raises:
        ConfigError: a checkpoint made with other settings or inputs exists and ``overwrite``
            is False (it is never replaced silently).
        CheckpointError: a checkpoint's content is not what the run made, without ``overwrite``.
    """
    builder = _Builder(
        Path(out_dir),
        arch,
        device,
        pretrain_cfg,
        finetune_cfg,
        log,
        hashes or HashCache(),
        overwrite,
        logs,
        checksums,
    )
    pretrained = _pretrained(builder)
    pre_digest = builder.hashes.digest(builder.pretrained_path)
    experts, heads = {}, {}
    for task in suite.tasks:
        name = safe_name(task.name, "Task name")
        experts[name], heads[name] = _expert(builder, task, name, pretrained, pre_digest)
    return ExpertSet(builder.pretrained_path, experts, heads)


@dataclass(frozen=True)
class _Builder:
    """What every checkpoint of :func:`build_experts` shares: where it goes, how it is
    trained, and how a finished one is reused or replaced."""

    out: Path
    arch: ArchSpec
    device: torch.device
    pretrain_cfg: PretrainConfig
    finetune_cfg: FinetuneConfig
    log: Callable[[str], Any]
    hashes: HashCache
    overwrite: bool
    logs: Path | None  # the metrics logs' folder
    checksums: Checksums | None  # the run's record of what it made

    @property
    def pretrained_path(self) -> Path:
        return self.out / "pretrained.safetensors"

    def as_made(self, *paths: Path) -> bool:
        """Each of ``paths`` holds what the run made (or --overwrite redoes it)."""
        return self.checksums is None or all(
            self.checksums.reusable(p, self.hashes, self.overwrite, self.log) for p in paths
        )

    def made(self, *paths: Path) -> None:
        """Record ``paths``, just written, as the run's."""
        if self.checksums is not None:
            for p in paths:
                self.checksums.record(p, self.hashes)


def _pretrained(b: _Builder) -> dict[str, torch.Tensor]:
    """The pretrained encoder's state: reused when its checkpoint records the requested config
    (and is what the run made), else trained and saved."""
    pre_path = b.pretrained_path
    pre_cfg = {"pretrain": asdict(b.pretrain_cfg)}
    reuse = _reusable(pre_path, b.arch, {"train_config": pre_cfg})
    if reuse and b.as_made(pre_path):
        pretrained = load_encoder(pre_path, b.arch).state_dict
        b.log(f"reusing {pre_path}")
        return pretrained
    if reuse is False:
        check_replace(
            pre_path,
            "pretrained checkpoint",
            {"train_config": pre_cfg},
            b.overwrite,
            b.log,
            old=_train_record(pre_path),
        )
    pretrained = pretrain(b.arch, b.pretrain_cfg, b.device, _log_file(b.logs, "pretrain"))
    save_encoder(pre_path, b.arch, pretrained, task=None, train_config=pre_cfg)
    b.made(pre_path)
    return pretrained


def _expert(
    b: _Builder,
    task: TaskData,
    name: str,
    pretrained: dict[str, torch.Tensor],
    pre_digest: str,
) -> tuple[Path, Path]:
    """``task``'s expert and head (``name`` is its checked name): reused when both record the
    requested configs and provenance (and are what the run made), else fine-tuned from
    ``pretrained`` (whose content hash is ``pre_digest``) and saved. Returns their paths."""
    e_path = b.out / "experts" / f"{name}.safetensors"
    h_path = b.out / "heads" / f"{name}.safetensors"
    ft_cfg = {"pretrain": asdict(b.pretrain_cfg), "finetune": asdict(b.finetune_cfg)}
    provenance = {
        "pretrained": pre_digest,
        "train": fingerprint(task.digest("train_x"), task.digest("train_y")),
        "class_names": list(task.class_names),
    }
    record = {"train_config": ft_cfg, "provenance": provenance}
    reuse = _reusable(e_path, b.arch, record)
    fits = reuse and _head_fits(h_path, b.arch, name, provenance)
    if fits and b.as_made(e_path, h_path):
        b.log(f"reusing expert {name}")
        return e_path, h_path
    # (fits: changed since the run made it, and --overwrite said so: made again)
    if reuse is False:
        old = _train_record(e_path)
        check_replace(e_path, f"expert of {name!r}", record, b.overwrite, b.log, old=old)
    elif not fits and h_path.exists():
        meta = recorded(h_path)
        old = meta and {"task": meta.get("task"), "provenance": meta.get("provenance")}
        new = {"task": name, "provenance": provenance}
        check_replace(h_path, f"head of {name!r}", new, b.overwrite, b.log, old=old)
    metrics = _log_file(b.logs, f"expert-{name}")
    state, head = finetune_expert(b.arch, pretrained, task, b.finetune_cfg, b.device, metrics)
    save_head(h_path, b.arch, name, task.class_names, head, provenance=provenance)
    save_encoder(e_path, b.arch, state, task=name, train_config=ft_cfg, provenance=provenance)
    b.made(h_path, e_path)
    return e_path, h_path


def _log_file(logs: Path | None, stage: str) -> Path | None:
    return None if logs is None else logs / f"{stage}.jsonl"


def _train_record(path: Path) -> dict[str, Any] | None:
    meta = recorded(path)
    if meta is None:
        return None
    return {k: meta.get(k) for k in ("train_config", "provenance") if k in meta}

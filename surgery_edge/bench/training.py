"""Surgery training speed: steps per second for V1 and V2.

A step draws one batch of every task (T x batch rows) and makes one Adam update, exactly as
``surgery-edge train`` does. Weights and images are random: speed does not depend on them.

    python benchmarks/bench_training.py --arch tiny-vit-32 --tasks 8 \\
        --out benchmarks/results/cpu/training.json
    python benchmarks/bench_training.py --arch ViT-B-32 --tasks 8 --device cuda --steps 50 \\
        --out benchmarks/results/h200/training.json

The GPU target: SurgeryV2 on ViT-B/32 with eight tasks, 1,000 steps at batch 16, in at most
60 s on an H200 with the expert targets cached (>= 16.7 steps/s). The step times' median and
quartiles are reported; the targets are computed once, before the timed steps, as
``surgery-edge train`` caches them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from surgery_edge.bench.env import environment
from surgery_edge.bench.report import command_line, table, write_record
from surgery_edge.bench.timing import sync
from surgery_edge.models import ClassificationHead, build_encoder, get_arch
from surgery_edge.surgery.methods import surgery_names
from surgery_edge.surgery.targets import representations
from surgery_edge.surgery.trainer import SurgeryConfig, TaskTargets, TrainingHooks, train_surgery


@dataclass(frozen=True)
class TrainBenchConfig:
    """One timed training run."""

    arch: str
    tasks: int
    method: str
    rank: int
    batch_size: int
    steps: int
    warmup: int
    device: str


@dataclass(frozen=True)
class TrainBenchResult:
    """Its speed: the median step time, as steps per second and images per second."""

    config: TrainBenchConfig
    steps_per_s: float
    seconds_per_1000_steps: float
    images_per_s: float
    step_ms_q1: float
    step_ms_median: float
    step_ms_q3: float


def bench(cfg: TrainBenchConfig) -> TrainBenchResult:
    """Train ``cfg.warmup + cfg.steps`` steps on random targets; time the last ``cfg.steps``."""
    arch = get_arch(cfg.arch)
    device = torch.device(cfg.device)
    names = [f"task{i}" for i in range(cfg.tasks)]
    rng = np.random.default_rng(0)
    n = max(4 * cfg.batch_size, 64)
    images = rng.integers(0, 256, (n, arch.image_size, arch.image_size, 3), dtype=np.uint8)
    final, blocks = representations(build_encoder(arch).to(device), images, device, batch_size=32)
    targets = {t: TaskTargets(images, final, blocks) for t in names}
    heads = [ClassificationHead(torch.randn(10, arch.embed_dim)) for _ in names]
    times: list[float] = []

    def on_step(step: int, loss: float) -> None:
        sync(device)
        times.append(time.perf_counter())

    surgery_cfg = SurgeryConfig(
        method=cfg.method,
        rank=cfg.rank,
        steps=cfg.warmup + cfg.steps,
        batch_size=cfg.batch_size,
        checkpoint_every=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        train_surgery(
            build_encoder(arch),
            heads,
            names,
            targets,
            surgery_cfg,
            Path(tmp) / "a.safetensors",
            device,
            hooks=TrainingHooks(on_step=on_step),
        )
    measured = np.diff(times[cfg.warmup - 1 :]) if cfg.warmup else np.diff(times)
    q1, median, q3 = (float(np.percentile(measured, q)) * 1e3 for q in (25, 50, 75))
    sps = 1e3 / median
    return TrainBenchResult(
        cfg, sps, 1000.0 / sps, sps * cfg.tasks * cfg.batch_size, q1, median, q3
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The training benchmark's options."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-vit-32")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=surgery_names())
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="JSON path (default: print only)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> list[TrainBenchResult]:
    """Parse ``argv``, time each method, print the table and write ``--out``."""
    args = build_parser(prog).parse_args(argv)
    results = [
        bench(
            TrainBenchConfig(
                args.arch,
                args.tasks,
                m,
                args.rank,
                args.batch_size,
                args.steps,
                args.warmup,
                args.device,
            )
        )
        for m in args.methods
    ]
    env = environment(args.device)
    header = ["method", "arch", "tasks", "batch", "steps/s", "s per 1,000 steps", "images/s"]
    header.append("step ms (IQR)")
    rows = [
        [r.config.method, r.config.arch, str(r.config.tasks), str(r.config.batch_size)]
        + [f"{r.steps_per_s:.2f}", f"{r.seconds_per_1000_steps:.1f}", f"{r.images_per_s:.0f}"]
        + [f"{r.step_ms_median:.2f} ({r.step_ms_q1:.2f}–{r.step_ms_q3:.2f})"]
        for r in results
    ]
    lines = table(header, rows)
    print("\n".join([f"{lines[0]}  ({env['device_name']})", *lines[1:]]))
    if args.out:
        record = {
            **env,
            "device": env["device_name"],
            "command": command_line(argv, prog or f"{__name__}.main"),
            "results": [asdict(r) for r in results],
            "markdown": "\n".join(lines),
        }
        write_record(args.out, record)
    return results

"""Surgery training speed: steps per second for V1 and V2.

A step draws one batch of every task (T x batch rows) and makes one Adam update, exactly as
``surgery-edge train`` does. Weights and images are random: speed does not depend on them.

    python benchmarks/bench_training.py --arch tiny-vit-32 --tasks 8 \
        --out benchmarks/results/cpu/training.json
    python benchmarks/bench_training.py --arch ViT-B-32 --tasks 8 --device cuda --steps 50 \
        --out benchmarks/results/h100/training.json

The issue's GPU target: SurgeryV2 on ViT-B/32 with eight tasks, 1,000 steps at batch 16, in at
most 10 minutes on an H100 (>= 1.67 steps/s).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class TrainBenchConfig:
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
    config: TrainBenchConfig
    steps_per_s: float
    seconds_per_1000_steps: float
    images_per_s: float


def bench(cfg: TrainBenchConfig) -> TrainBenchResult:
    from surgery_edge.models import ClassificationHead, build_encoder, get_arch
    from surgery_edge.surgery.targets import representations
    from surgery_edge.surgery.trainer import SurgeryConfig, TaskTargets, train_surgery

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
        if device.type == "cuda":
            torch.cuda.synchronize()
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
            on_step=on_step,
        )
    measured = np.diff(times[cfg.warmup - 1 :]) if cfg.warmup else np.diff(times)
    sps = 1.0 / float(np.median(measured))
    return TrainBenchResult(cfg, sps, 1000.0 / sps, sps * cfg.tasks * cfg.batch_size)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-vit-32")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["surgery", "surgeryv2"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
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
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)"
    )
    header = "| method | arch | tasks | batch | steps/s | s per 1,000 steps | images/s |"
    print(f"{header}  ({device_name})")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        c = r.config
        print(
            f"| {c.method} | {c.arch} | {c.tasks} | {c.batch_size} | {r.steps_per_s:.2f} | "
            f"{r.seconds_per_1000_steps:.0f} | {r.images_per_s:.0f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "device": device_name,
                    "torch": torch.__version__,
                    "python": sys.version.split()[0],
                    "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

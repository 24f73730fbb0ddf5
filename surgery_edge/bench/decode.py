"""How fast a dataset on disk is decoded into the run's image cache (the first run's cost).

Writes ``--images`` JPEGs of ``--width`` x ``--height`` pixels (SUN397-like photos: smooth
gradients plus noise) as a folder task, then times :func:`surgery_edge.data.disk.load_disk_task`
decoding its test split at ``--size`` px (CLIP's eval transform), and a second call that only
opens the cache.

    python benchmarks/bench_decode.py --images 2000 --size 224 \\
        --out benchmarks/results/cpu/decode-224.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from surgery_edge.bench.env import cpu_name
from surgery_edge.bench.report import command_line, write_record
from surgery_edge.data.disk import DiskTask, load_disk_task


def write_images(root: Path, n: int, width: int, height: int, classes: int = 10) -> int:
    """Write ``n`` JPEGs under ``root/test/class_<k>/``; returns their total bytes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    total = 0
    for i in range(n):
        folder = root / "test" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx / width, b * yy / height, c + 0 * xx], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        total += path.stat().st_size
    return total


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The decoding benchmark's options."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", type=Path, help="JSON path (default: print only)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Parse ``argv``, time the decoding and the cached re-open, print and write the result."""
    args = build_parser(prog).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "task"
        jpeg_bytes = write_images(root, args.images, args.width, args.height)
        task = DiskTask("bench", "folder", root)
        t0 = time.perf_counter()
        data = load_disk_task(task, args.size, Path(tmp) / "cache", workers=args.workers)
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_disk_task(task, args.size, Path(tmp) / "cache", workers=args.workers)
        cached_s = time.perf_counter() - t0
        assert data.test_x.shape == (args.images, args.size, args.size, 3)
    result = {
        "device": f"CPU ({cpu_name()}, {os.cpu_count()} cores)",
        "images": args.images,
        "source_px": [args.width, args.height],
        "size": args.size,
        "jpeg_mb": round(jpeg_bytes / 1e6, 1),
        "cache_mb": round(data.test_x.nbytes / 1e6, 1),
        "decode_s": round(decode_s, 2),
        "images_per_s": round(args.images / decode_s, 1),
        "cached_open_s": round(cached_s, 3),
        "command": command_line(argv, prog or f"{__name__}.main"),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_record(args.out, result)
    return result

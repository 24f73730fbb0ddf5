"""ONNX file sizes of the multi-task engines against one expert (the "one backbone" claim).

    python benchmarks/onnx_sizes.py --arch ViT-B-32 \\
        --out benchmarks/results/cpu/onnx-sizes-vit-b32.json

Random weights (sizes only), eight tasks with the paper datasets' class counts, rank 16.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from surgery_edge.bench.env import environment
from surgery_edge.bench.flops import PAPER_CLASSES
from surgery_edge.bench.report import command_line, write_record
from surgery_edge.export.onnx import export_onnx
from surgery_edge.models import ClassificationHead, build_encoder, get_arch
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.model import MultiTaskModel


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ONNX size benchmark's options."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", type=Path, help="JSON path (default: print only)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Parse ``argv``, export one expert and the V1 and V2 engines, compare their sizes."""
    args = build_parser(prog).parse_args(argv)
    arch = get_arch(args.arch)
    torch.manual_seed(0)
    encoder = build_encoder(arch).eval()
    tasks = [f"task{i}" for i in range(len(PAPER_CLASSES))]
    heads = [ClassificationHead(torch.randn(c, arch.embed_dim)) for c in PAPER_CLASSES]
    engines = {
        "single-expert": (MultiTaskModel(encoder, heads[:1], tasks[:1]), "routed"),
        "surgery-all-tasks": (
            MultiTaskModel(encoder, heads, tasks, AdapterBank(tasks, arch, "surgery", args.rank)),
            "all-tasks",
        ),
        "surgeryv2-routed": (
            MultiTaskModel(encoder, heads, tasks, AdapterBank(tasks, arch, "surgeryv2", args.rank)),
            "routed",
        ),
    }
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, mode) in engines.items():
            t0 = time.perf_counter()
            path = export_onnx(model, Path(tmp) / f"{name}.onnx", mode, check=False)
            files[name] = {
                "bytes": path.stat().st_size,
                "mode": mode,
                "export_s": round(time.perf_counter() - t0, 1),
            }
    single = files["single-expert"]["bytes"]
    for entry in files.values():
        entry["x_single_expert"] = round(entry["bytes"] / single, 4)
    env = environment("cpu")
    result = {
        "arch": arch.name,
        "tasks": len(tasks),
        "rank": args.rank,
        "classes": list(PAPER_CLASSES),
        "weights": "random (sizes only)",
        "torch": env["torch"],
        "surgery_edge": env["surgery_edge"],
        "command": command_line(argv, prog or f"{__name__}.main"),
        "files": files,
    }
    for name, entry in files.items():
        print(f"{name:18s} {entry['bytes'] / 1e6:8.1f} MB  {entry['x_single_expert']:.3f}x")
    if args.out:
        write_record(args.out, result)
    return result

"""ONNX file sizes of the multi-task engines against one expert (the "one backbone" claim).

    python benchmarks/onnx_sizes.py --arch ViT-B-32 \
        --out benchmarks/results/cpu/onnx-sizes-vit-b32.json

Random weights (sizes only), eight tasks with the paper datasets' class counts, rank 16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD
PAPER_CLASS_COUNTS = (397, 196, 45, 10, 10, 43, 10, 47)


def main(argv: list[str] | None = None) -> dict:
    import surgery_edge
    from surgery_edge.export.onnx import export_onnx
    from surgery_edge.models import ClassificationHead, build_encoder, get_arch
    from surgery_edge.surgery.adapters import AdapterBank
    from surgery_edge.surgery.model import MultiTaskModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    arch = get_arch(args.arch)
    torch.manual_seed(0)
    encoder = build_encoder(arch).eval()
    tasks = [f"task{i}" for i in range(len(PAPER_CLASS_COUNTS))]
    heads = [ClassificationHead(torch.randn(c, arch.embed_dim)) for c in PAPER_CLASS_COUNTS]
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
    result = {
        "arch": arch.name,
        "tasks": len(tasks),
        "rank": args.rank,
        "classes": list(PAPER_CLASS_COUNTS),
        "weights": "random (sizes only)",
        "torch": torch.__version__,
        "surgery_edge": surgery_edge.__version__,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "files": files,
    }
    for name, entry in files.items():
        print(f"{name:18s} {entry['bytes'] / 1e6:8.1f} MB  {entry['x_single_expert']:.3f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

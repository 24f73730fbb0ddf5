"""ONNX file sizes of the multi-task engines against one expert (the "one backbone" claim).

    python benchmarks/onnx_sizes.py --arch ViT-B-32 \\
        --out benchmarks/results/cpu/onnx-sizes-vit-b32.json
    python benchmarks/onnx_sizes.py --arch ViT-B-32 --int8 \\
        --out benchmarks/results/cpu/onnx-sizes-vit-b32-int8.json

Random weights (sizes only), eight tasks with the paper datasets' class counts, rank 16.
``--int8`` also quantises every engine with the ONNX Runtime int8 recipe
(:func:`surgery_edge.export.quantize.default_recipe`) and records its size against the fp32
engine and its top-1 agreement with the fp32 engine on random inputs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery_edge.bench.env import environment
from surgery_edge.bench.flops import PAPER_CLASSES
from surgery_edge.bench.report import command_line, write_record
from surgery_edge.engine_format import EngineMode, Precision, read_onnx_metadata
from surgery_edge.export.gate import Calibration
from surgery_edge.export.onnx import export_onnx
from surgery_edge.export.quantize import Target, default_recipe, quantize_engine
from surgery_edge.models import ClassificationHead, build_encoder, get_arch
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.methods import SINGLE_EXPERT, method_engines
from surgery_edge.surgery.model import MultiTaskModel


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ONNX size benchmark's options."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--int8", action="store_true", help="also the int8 engines (ONNX Runtime)")
    p.add_argument("--images", type=int, default=64, help="random inputs for --int8 agreement")
    p.add_argument("--out", type=Path, help="JSON path (default: print only)")
    return p


def _int8(fp32: Path, model: MultiTaskModel, n: int) -> dict[str, Any]:
    """Quantise ``fp32`` with the ONNX Runtime int8 recipe; its size and agreement with fp32 on
    ``n`` random inputs (random weights give near-tied answers: measured, not required)."""
    s = model.encoder.arch.image_size
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2 * n, 3, s, s, generator=gen).numpy()
    ids = (np.arange(2 * n) % model.num_tasks).astype(np.int64)
    calibration = Calibration(images[:n], ids[:n], images[n:], ids[n:], {"inputs": "random"})
    out = fp32.with_name(fp32.stem + "-int8.onnx")
    t0 = time.perf_counter()
    recipe = default_recipe(Precision.INT8, Target.ONNXRUNTIME)
    quantize_engine(fp32, out, recipe, calibration, check=False)
    check = read_onnx_metadata(out)["quantization"]["check"]
    return {
        "bytes": out.stat().st_size,
        "x_fp32": round(out.stat().st_size / fp32.stat().st_size, 4),
        "argmax_agreement": check["argmax_agreement"],
        "random_inputs": check["images"],
        "recipe": recipe.to_dict(),
        "quantize_s": round(time.perf_counter() - t0, 1),
    }


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Parse ``argv``, export one expert and the V1 and V2 engines, compare their sizes."""
    args = build_parser(prog).parse_args(argv)
    arch = get_arch(args.arch)
    torch.manual_seed(0)
    encoder = build_encoder(arch).eval()
    tasks = [f"task{i}" for i in range(len(PAPER_CLASSES))]
    heads = [ClassificationHead(torch.randn(c, arch.embed_dim)) for c in PAPER_CLASSES]
    engines = {
        SINGLE_EXPERT: (MultiTaskModel(encoder, heads[:1], tasks[:1]), EngineMode.ROUTED),
        **{
            name: (
                MultiTaskModel(encoder, heads, tasks, AdapterBank(tasks, arch, method, args.rank)),
                mode,
            )
            for name, (method, mode) in method_engines().items()
        },
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
            if args.int8:
                files[name]["int8"] = _int8(path, model, args.images)
    single = files[SINGLE_EXPERT]["bytes"]
    for entry in files.values():
        entry["x_single_expert"] = round(entry["bytes"] / single, 4)
        if "int8" in entry:
            entry["int8"]["x_single_expert_int8"] = round(
                entry["int8"]["bytes"] / files[SINGLE_EXPERT]["int8"]["bytes"], 4
            )
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
        line = f"{name:18s} {entry['bytes'] / 1e6:8.1f} MB  {entry['x_single_expert']:.3f}x"
        if "int8" in entry:
            i8 = entry["int8"]
            line += f"  int8 {i8['bytes'] / 1e6:6.1f} MB ({i8['x_fp32']:.3f}x fp32)"
            line += f", argmax agreement {i8['argmax_agreement']:.1f}%"
        print(line)
    if args.out:
        write_record(args.out, result)
    return result

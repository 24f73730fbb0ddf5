"""The engine benchmark's names and defaults, without torch: its configurations, modes, paths
and dtypes, and what each option defaults to on CUDA, on the CPU and with ``--quick``.

``surgery-edge bench --help`` lists them from here, so the command line stays light; the
benchmark itself (:mod:`~surgery_edge.bench.workloads`, :mod:`~surgery_edge.bench.engine`) reads
the same names.
"""

from __future__ import annotations

from surgery_edge.engine_format import EngineMode
from surgery_edge.surgery.methods import SURGERY_METHODS

ALL_TASKS, ROUTED = EngineMode.ALL_TASKS.value, EngineMode.ROUTED.value
MODES = (ALL_TASKS, ROUTED)
MERGED = "merged"
ONE_EXPERT = "one-expert"
ONE_GRAPH = "experts-one-graph"  # the eight experts as one model (ONNX Runtime, TensorRT)
BASELINES = ("experts", ONE_GRAPH, "experts-concurrent", "experts-vmap")
ENGINES = tuple(SURGERY_METHODS)  # one engine per registered surgery method
CONFIGS = (*BASELINES, ONE_EXPERT, MERGED, *ENGINES)
PATHS = ("eager", "fused", "compile", "cuda-graph", "onnxruntime", "tensorrt")
MEMORY_PATHS = ("eager", "onnxruntime")  # the paths whose peak memory a child process measures
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # -> torch's names
# an option left out: (on CUDA, on the CPU, with --quick)
DEFAULTS = {
    "archs": (("tiny-vit-32", "ViT-B-32", "ViT-L-14"), ("tiny-vit-32",), ("micro-vit-16",)),
    "batches": ((1, 8, 32, 64, 128), (1, 8, 32), (1, 4)),
    "paths": (PATHS, PATHS, ("eager", "onnxruntime")),
    "rounds": (10, 7, 3),
    "block_seconds": (0.05, 0.1, 0.01),
    "memory_paths": (("eager",), MEMORY_PATHS, ()),
}


def default_help(name: str) -> str:
    """What option ``name`` defaults to, for its help text."""

    def text(value) -> str:
        return ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)

    cuda, cpu, quick = (text(v) for v in DEFAULTS[name])
    where = cuda if cuda == cpu else f"{cuda} on CUDA, {cpu} on the CPU"
    return f"Default: {where}; {quick or 'none'} with --quick."

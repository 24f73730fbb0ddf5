"""Peak memory per configuration, each measured in a process of its own.

A process's peak RSS never goes down, and a CUDA caching allocator keeps what earlier
configurations freed: measured inside the timing process, every configuration would inherit the
peak of the ones before it. So each (configuration, mode, path) runs in a fresh Python process
(``python -m surgery_edge.bench.memory SPEC``) that builds only its own model (random weights,
the benchmark's seed), runs its batch sizes in increasing order, and prints one JSON line:

* on the CPU the peak resident set size after each batch, since the model was built (the
  kernel's high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs``; ``ru_maxrss``, the
  lifetime peak, where that is not available), and the RSS (psutil) after the imports, before
  any model was built (``baseline_bytes``);
* on the GPU ``torch.cuda.max_memory_allocated`` after each batch, reset before it (it includes
  the resident weights).

The ONNX Runtime path opens the engines the timing process exported, and imports neither torch
nor the training code: its RSS is that of a serving process (numpy, onnxruntime, the engine).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from surgery_edge.bench.proc import PeakRSS

RSS, CUDA = "rss", "cuda-max-allocated"


@dataclass(frozen=True)
class MemorySpec:
    """One child process's work: one configuration in one mode on one path."""

    arch: str
    config: str
    mode: str
    path: str  # "eager" or "onnxruntime"
    batches: tuple[int, ...]
    device: str
    dtype: str
    num_tasks: int
    rank: int
    threads: int
    seed: int
    onnx_files: tuple[str, ...] = ()  # the ONNX Runtime path: the engines to open
    concurrent_workers: int = 1  # the ONNX Runtime path: sessions run at once


def measure_onnx(spec: MemorySpec) -> dict[str, Any]:
    """Peak RSS of ONNX Runtime sessions over the engines in ``spec.onnx_files`` (no torch)."""
    import numpy as np  # deferred: the child imports only what this path needs

    from surgery_edge.runtime.backends import OnnxBackend  # deferred: as numpy

    rss = PeakRSS()
    baseline = rss.now()
    threads = 1 if spec.concurrent_workers > 1 else spec.threads
    backends = [OnnxBackend(f, device="cpu", threads=threads) for f in spec.onnx_files]
    held = rss.now()
    rss.reset()  # from here: the peak while serving, not while opening the sessions
    size = backends[0].meta.preprocessing.image_size
    pool = ThreadPoolExecutor(spec.concurrent_workers) if spec.concurrent_workers > 1 else None
    peaks = []
    for batch in sorted(spec.batches):
        images = np.random.default_rng(batch).standard_normal((batch, 3, size, size), np.float32)
        ids = np.arange(batch) % spec.num_tasks
        if len(backends) == 1:  # one engine: the workload's own, or one expert alone
            calls = [(backends[0], images, ids)]
        elif spec.mode == "routed":
            calls = [(backends[t], images[ids == t], None) for t in np.unique(ids)]
        else:
            calls = [(b, images, None) for b in backends]
        for _ in range(2):
            if pool is None:
                for b, x, i in calls:
                    b.run(x, i)
            else:
                list(pool.map(lambda c: c[0].run(c[1], c[2]), calls))
        peaks.append({"batch": batch, "peak_bytes": rss.peak()})
    record = _record(RSS, baseline, held, rss.since_reset, peaks)
    return record | {"imported_torch": "torch" in sys.modules}  # a serving process has none


def measure_torch(spec: MemorySpec) -> dict[str, Any]:
    """Peak memory of one configuration built and run eagerly by PyTorch."""
    import tempfile

    import torch

    # deferred: the child that measures PyTorch alone imports the model stack (and torch)
    from surgery_edge.bench.runners import ArchBench, Workload
    from surgery_edge.bench.workloads import DTYPES, Inputs, Parts, build_all
    from surgery_edge.models import get_arch

    torch.set_num_threads(spec.threads)
    device, dtype = torch.device(spec.device), DTYPES[spec.dtype]
    gpu = device.type == "cuda"
    rss = PeakRSS()
    baseline = torch.cuda.memory_allocated(device) if gpu else rss.now()
    arch = get_arch(spec.arch)
    parts = Parts.random(arch, spec.num_tasks, spec.seed)
    model = build_all(parts, [spec.config], {spec.config: spec.rank}, device, dtype)[spec.config]
    tasks = parts.tasks
    del parts  # the fp32 master copy the models were built from
    gc.collect()
    held = torch.cuda.memory_allocated(device) if gpu else rss.now()
    rss.reset()  # from here: the peak while running, not while building
    peaks = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        bench = ArchBench(arch, tasks, device, dtype, Path(tmp), spec.threads, max(spec.batches))
        work = Workload(bench, model, spec.config, spec.mode, spec.rank)
        for batch in sorted(spec.batches):
            x = Inputs.make(arch, batch, spec.num_tasks, device, dtype)
            if gpu:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            fn = work.prepare(spec.path, x)
            for _ in range(2):
                fn()
            if gpu:
                torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) if gpu else rss.peak()
            peaks.append({"batch": batch, "peak_bytes": peak})
        bench.close()
    return _record(CUDA if gpu else RSS, baseline, held, gpu or rss.since_reset, peaks)


def _record(
    kind: str, baseline: int, held: int, while_running: bool, peaks: list[dict[str, int]]
) -> dict[str, Any]:
    return {
        "kind": kind,
        "baseline_bytes": baseline,  # after the imports, before any model
        "held_bytes": held,  # with the model built (or the sessions open)
        "peak_while_running": while_running,  # False: the process's lifetime peak
        "batches": peaks,
    }


def measure(spec: MemorySpec) -> dict[str, Any]:
    """This process's peak memory for ``spec`` (call it in a fresh process)."""
    return measure_onnx(spec) if spec.path == "onnxruntime" else measure_torch(spec)


def run_children(
    specs: Sequence[MemorySpec], jobs: int = 1, timeout_s: float = 600.0
) -> list[dict[str, Any]]:
    """Run each spec in its own process, ``jobs`` at a time; one record per spec, with
    ``status`` ``ok`` or ``failed`` (and the child's last error line)."""

    def one(spec: MemorySpec) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "surgery_edge.bench.memory", json.dumps(asdict(spec))]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy()
            )
        except subprocess.TimeoutExpired:
            return {"spec": asdict(spec), "status": "failed", "reason": f"over {timeout_s:.0f} s"}
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            errors = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            reason = errors[-1][:300] if errors else f"exit code {done.returncode}"
            return {"spec": asdict(spec), "status": "failed", "reason": reason}
        return {"spec": asdict(spec), "status": "ok", **json.loads(lines[-1])}

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(one, specs))


def main(argv: Sequence[str] | None = None) -> None:
    """The child: ``python -m surgery_edge.bench.memory '<MemorySpec as JSON>'``."""
    args = list(sys.argv[1:] if argv is None else argv)
    raw = json.loads(args[0])
    spec = MemorySpec(
        **{
            **raw,
            "batches": tuple(raw["batches"]),
            "onnx_files": tuple(raw.get("onnx_files", ())),
        }
    )
    print(json.dumps(measure(spec)))


if __name__ == "__main__":
    main()

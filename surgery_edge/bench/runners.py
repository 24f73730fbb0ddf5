"""The paths a workload runs through: eager, fused (Triton), ``torch.compile``, CUDA graphs,
ONNX Runtime (through the runtime's :class:`~surgery_edge.runtime.backends.OnnxBackend`) and
TensorRT, for the engines and for the eight-expert baselines alike.

The experts run on every path the engines run on: on ONNX Runtime and TensorRT as eight engines
of their own (each expert exported as a one-task engine), one after another or concurrently.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from surgery_edge import kernels
from surgery_edge.bench.choices import ALL_TASKS, ONE_EXPERT, ONE_GRAPH
from surgery_edge.bench.one_graph import compose_experts
from surgery_edge.bench.timing import cuda_graph
from surgery_edge.bench.workloads import (
    Inputs,
    SeparateExperts,
    compiled_expert_runner,
    expert_as_engine,
    run_expert,
    vmappable_attention,
)
from surgery_edge.engine_format import EngineMode, Precision
from surgery_edge.export.onnx import export_onnx
from surgery_edge.models import ArchSpec
from surgery_edge.runtime.backends import OnnxBackend
from surgery_edge.surgery.fused import fuse_
from surgery_edge.surgery.model import MultiTaskModel

EXPERT_CONFIGS = ("experts", "experts-concurrent", ONE_EXPERT)  # hold SeparateExperts' modules


def unavailable_reason(path: str, device: torch.device, interpreter_ok: bool = False) -> str | None:
    """Why ``path`` cannot run on ``device`` at all (None: it can). ``interpreter_ok`` lets the
    fused path run under the Triton CPU interpreter (to check the benchmark, not to time)."""
    if path in ("fused", "fused+cuda-graph"):
        if device.type != "cuda" and not (interpreter_ok and kernels.can_launch(device)):
            return "the Triton path is timed on CUDA only (the CPU interpreter is for tests)"
        if device.type == "cuda" and kernels.triton_interpreter_enabled():
            return "TRITON_INTERPRET is set: unset it to time compiled kernels"
    if path in ("cuda-graph", "fused+cuda-graph") and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if path == "onnxruntime":
        for module in ("onnx", "onnxruntime"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        if device.type == "cuda":
            import onnxruntime as ort  # deferred: heavy, and only the ONNX path needs it

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if path == "tensorrt":
        if device.type != "cuda":
            return "TensorRT runs on NVIDIA GPUs only"
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed (pip install 'surgery-edge[trt]')"
    return None


class Concurrent:
    """Runs independent calls at once.

    On the CPU: a pool of ``workers`` threads, each running its calls with one intra-op thread
    (so ``workers`` threads use the cores an engine with ``workers`` intra-op threads uses), in
    inference mode. On the GPU: one CUDA stream per call, forked from and joined back to the
    current stream (a CUDA graph captures the fork and the join as parallel branches).
    """

    def __init__(self, device: torch.device, workers: int):
        self.device, self.workers = device, workers
        self.streams: list[torch.cuda.Stream] = []
        self.pool: ThreadPoolExecutor | None = None
        if device.type == "cuda":
            self.streams = [torch.cuda.Stream(device) for _ in range(workers)]
            return
        threads = torch.get_num_threads()
        started = threading.Barrier(workers)
        # set_num_threads in a thread sets that thread's count (and the global one, restored
        # below once every worker has started)
        self.pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
        for f in [self.pool.submit(started.wait) for _ in range(workers)]:
            f.result()
        torch.set_num_threads(threads)

    def run(self, calls: Sequence[Callable[[], Any]]) -> list[Any]:
        """Every call's result, in order."""
        if self.pool is not None:
            return [f.result() for f in [self.pool.submit(_inference, call) for call in calls]]
        main = torch.cuda.current_stream(self.device)
        outputs = []
        for call, stream in zip(calls, self.streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outputs.append(call())
        # Outputs made on a side stream are read on the main one: safe without record_stream,
        # because every stream waits on the main stream before its next call allocates again.
        for stream in self.streams[: len(calls)]:
            main.wait_stream(stream)
        return outputs

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _inference(call: Callable[[], Any]) -> Any:
    with torch.inference_mode():  # inference mode is per thread
        return call()


class OnnxRunner:
    """One ONNX engine opened by ``OnnxBackend`` with ``threads`` intra-op threads.

    Only the logits are compared and, on the GPU, computed (a routed engine also outputs
    probabilities), as PyTorch computes them.
    """

    def __init__(self, path: Path, device: torch.device, threads: int):
        self.path = path
        self.backend = OnnxBackend(path, device=str(device), threads=threads)
        self.logits = [n for n in self.backend.meta.outputs if n.startswith("logits")]

    def prepare(self, images: torch.Tensor, task_ids: torch.Tensor | None) -> Callable[[], Any]:
        """A callable that runs the engine once on this batch (device-resident on CUDA)."""
        images_np = images.detach().float().cpu().numpy()
        ids_np = None if task_ids is None else task_ids.detach().cpu().numpy()
        return self.backend.bind(images_np, ids_np, self.logits)


def precision_of(dtype: torch.dtype) -> Precision:
    """The engine precision of a model in ``dtype``: fp16 for half, else fp32."""
    return Precision.FP16 if dtype == torch.float16 else Precision.FP32


class TensorRTRunner:
    """One engine built by ``build_engine`` from its ONNX file, run from device buffers bound
    once per batch size (``execute_async_v3`` on the current stream)."""

    def __init__(self, onnx_path: Path, precision: Precision, max_batch: int):
        # deferred: TensorRT is optional, and only this path needs the builder
        from surgery_edge.export.tensorrt import build_engine
        from surgery_edge.runtime.backends import TensorRTBackend

        engine = build_engine(
            onnx_path,
            onnx_path.with_suffix(".plan"),
            precision,
            min_batch=1,
            opt_batch=max(1, min(8, max_batch)),
            max_batch=max_batch,
            timing_cache=onnx_path.parent / "timing.cache",
        )
        self.backend = TensorRTBackend(engine, device="cuda")

    def prepare(self, images: torch.Tensor, task_ids: torch.Tensor | None) -> Callable[[], Any]:
        """A callable that runs the engine on this batch from device buffers bound once, in an
        execution context of its own (contestants sharing an engine do not rebind each other's
        buffers). It reads the backend's engine, tensor dtypes and output names."""
        b = self.backend
        context = b.engine.create_execution_context()
        feeds = {"images": images.float()}
        if b.meta.mode is EngineMode.ROUTED:
            feeds["task_ids"] = task_ids
        buffers = {}  # live as long as the callable
        for name, t in feeds.items():
            buffers[name] = t.to("cuda", b._torch_dtype(name)).contiguous()
            context.set_input_shape(name, tuple(buffers[name].shape))
            context.set_tensor_address(name, buffers[name].data_ptr())
        for name in b._outputs:
            shape = tuple(context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=b._torch_dtype(name), device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        logits = [buffers[n] for n in b.meta.outputs if n.startswith("logits")]

        def run() -> list[torch.Tensor]:
            if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {b.path}")
            return logits

        run.buffers, run.context = buffers, context
        return run


class ArchBench:
    """What the configurations of one architecture share: the random weights, the eight
    experts' one-task engines, the compiled expert encoder and the concurrent runners."""

    def __init__(
        self,
        arch: ArchSpec,
        tasks: Sequence[str],
        device: torch.device,
        dtype: torch.dtype,
        folder: Path,
        threads: int,
        max_batch: int,
        compile_backend: str = "inductor",
    ):
        self.arch, self.tasks, self.device, self.dtype = arch, list(tasks), device, dtype
        self.folder, self.threads, self.max_batch = folder, threads, max_batch
        self.compile_backend = compile_backend
        self.workers = len(self.tasks) if device.type == "cuda" else threads
        self._compiled_expert: Callable | None = None
        self._concurrent: Concurrent | None = None
        self._expert_onnx: dict[bool, list[OnnxRunner]] = {}  # concurrent? -> runners
        self._expert_trt: list[TensorRTRunner] | None = None

    def compiled_expert(self) -> Callable:
        """One ``torch.compile`` of the expert encoder, shared by every expert configuration."""
        if self._compiled_expert is None:
            self._compiled_expert = compiled_expert_runner(self.compile_backend)
        return self._compiled_expert

    def concurrent(self) -> Concurrent:
        if self._concurrent is None:
            self._concurrent = Concurrent(self.device, self.workers)
        return self._concurrent

    def expert_files(self, experts: SeparateExperts) -> list[Path]:
        """The eight experts, each exported once as a one-task all-tasks ONNX engine."""
        paths = []
        for t in range(len(experts.encoders)):
            path = self.folder / f"expert-{t}.onnx"
            if not path.exists():
                model = expert_as_engine(self.tasks[t], experts, t, self.dtype)
                export_onnx(model, path, ALL_TASKS, precision_of(self.dtype), check=False)
            paths.append(path)
        return paths

    def expert_onnx(self, experts: SeparateExperts, concurrent: bool) -> list[OnnxRunner]:
        """Eight ONNX Runtime sessions: with the engine's intra-op threads (one after another),
        or one thread each (concurrent, one session per worker thread)."""
        if concurrent not in self._expert_onnx:
            threads = 1 if concurrent and self.device.type == "cpu" else self.threads
            self._expert_onnx[concurrent] = [
                OnnxRunner(p, self.device, threads) for p in self.expert_files(experts)
            ]
        return self._expert_onnx[concurrent]

    def expert_trt(self, experts: SeparateExperts) -> list[TensorRTRunner]:
        if self._expert_trt is None:
            self._expert_trt = [
                TensorRTRunner(p, precision_of(self.dtype), self.max_batch)
                for p in self.expert_files(experts)
            ]
        return self._expert_trt

    def close(self) -> None:
        if self._concurrent is not None:
            self._concurrent.close()


class Workload:
    """One (configuration, mode) of one built model: its eager call, and the compiled function
    and exported engines built on first use and shared by the batch sizes."""

    def __init__(self, bench: ArchBench, model: nn.Module, config: str, mode: str, rank: int):
        self.bench, self.model, self.config, self.mode, self.rank = bench, model, config, mode, rank
        self.arch, self.device = bench.arch, bench.device
        self._compiled: Callable[[Inputs], Any] | None = None
        self.onnx: OnnxRunner | None = None
        self.trt: TensorRTRunner | None = None
        self.sticky_error: dict[str, str] = {}  # path -> why every further batch is skipped

    @property
    def workers(self) -> int:
        """Experts run at once (1: one after another, or a single model)."""
        return self.bench.workers if self.config == "experts-concurrent" else 1

    @property
    def threads(self) -> int:
        """Torch intra-op threads while timed: one per worker for concurrent CPU experts."""
        concurrent_cpu = self.config == "experts-concurrent" and self.device.type == "cpu"
        return 1 if concurrent_cpu else self.bench.threads

    def call(self, run: Callable = run_expert) -> Callable[[Inputs], Any]:
        """The workload as a function of the inputs; ``run`` runs one of the experts."""
        model, routed = self.model, self.mode != ALL_TASKS
        if self.config == "experts-concurrent":
            pool = self.bench.concurrent()
            if routed:
                return lambda x: pool.run(model.calls_routed(x.images, x.groups, run=run))
            return lambda x: pool.run(model.calls_all_tasks(x.images, run=run))
        if self.config in EXPERT_CONFIGS and routed:
            return lambda x: model.forward_routed(x.images, x.groups, run=run)
        if self.config in EXPERT_CONFIGS:
            return lambda x: model.forward_all_tasks(x.images, run=run)
        if self.config == "experts-vmap":
            return lambda x: _vmapped(model, x.images)
        if routed:
            return lambda x: model(x.images, x.task_ids)
        return lambda x: model.forward_all_tasks(x.images)

    def compiled(self) -> Callable[[Inputs], Any]:
        """``torch.compile`` (mode default) of the whole call; for the experts, of the expert
        encoder that all eight share."""
        if self._compiled is None:
            if self.config in EXPERT_CONFIGS:
                self._compiled = self.call(self.bench.compiled_expert())
            elif self.config == "experts-vmap":
                stacked = torch.compile(self.model, backend=self.bench.compile_backend)
                self._compiled = lambda x: _vmapped(stacked, x.images)
            else:
                self._compiled = torch.compile(self.call(), backend=self.bench.compile_backend)
        return self._compiled

    def _engine_runners(self, path: str) -> list:
        """The exported engines this workload runs on ``path``: eight expert engines (or the
        first, for one expert), or the workload's own."""
        bench = self.bench
        if self.config in EXPERT_CONFIGS:
            model = self.model
            experts = model if isinstance(model, SeparateExperts) else model.experts[0]
            if path == "tensorrt":
                runners = bench.expert_trt(experts)
            else:
                runners = bench.expert_onnx(experts, self.config == "experts-concurrent")
            return runners[:1] if self.config == ONE_EXPERT else runners
        if path == "onnxruntime":
            if self.onnx is None:
                self.onnx = OnnxRunner(self.onnx_file(), self.device, bench.threads)
            return [self.onnx]
        if self.trt is None:
            self.trt = TensorRTRunner(self.onnx_file(), precision_of(bench.dtype), bench.max_batch)
        return [self.trt]

    def onnx_file(self) -> Path:
        """The workload's model exported once by ``export_onnx`` (in its dtype); for the
        experts as one graph, their engines composed."""
        path = self.bench.folder / f"{self.config}-{self.mode}.onnx"
        if self.config == ONE_GRAPH and not path.exists():
            files = self.bench.expert_files(self.model)
            compose_experts(dict(zip(self.bench.tasks, files)), path)
        if not path.exists():
            precision = precision_of(next(self.model.parameters()).dtype)
            export_onnx(self.model, path, self.mode, precision, check=False)  # checked later
        return path

    def _prepare_engines(self, path: str, x: Inputs) -> Callable[[], Any]:
        runners = self._engine_runners(path)
        routed = self.mode != ALL_TASKS
        if self.config not in EXPERT_CONFIGS:
            return runners[0].prepare(x.images, x.task_ids if routed else None)
        if routed:  # each expert's engine on its own task's images
            calls = [runners[t].prepare(x.images.index_select(0, idx), None) for t, idx in x.groups]
        else:
            calls = [r.prepare(x.images, None) for r in runners]
        if self.config == "experts-concurrent":
            pool = self.bench.concurrent()
            return lambda: pool.run(calls)
        return lambda: [call() for call in calls]

    def prepare(self, path: str, x: Inputs) -> Callable[[], Any]:
        """A no-argument callable that runs ``path`` once on ``x``. The model stays on its
        reference path in between: the fused call switches the Triton path on for its own
        calls only, and the fused graph is captured with it on."""
        eager = self.call()
        if path == "fused":
            return _fused(self.model, lambda: eager(x))
        if path == "eager":
            return lambda: eager(x)
        if path == "compile":
            compiled = self.compiled()
            return lambda: compiled(x)
        if path == "cuda-graph":
            return cuda_graph(lambda images: eager(dataclasses.replace(x, images=images)), x.images)
        if path == "fused+cuda-graph":
            captured = lambda images: eager(dataclasses.replace(x, images=images))  # noqa: E731
            return _fused(self.model, lambda: cuda_graph(captured, x.images))()
        if path in ("onnxruntime", "tensorrt"):
            return self._prepare_engines(path, x)
        raise ValueError(f"unknown path {path!r}")


def _fused(model: MultiTaskModel, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with the model's fused (Triton) path on, switched off again after each call
    (so that eager and compiled contestants of the same model, interleaved with it, run the
    reference path)."""
    fuse_(model)  # raises, naming the device, where the kernels cannot run
    model.fused = False

    def call() -> Any:
        model.fused = True
        try:
            return fn()
        finally:
            model.fused = False

    return call


def _vmapped(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    with vmappable_attention():
        return model(images)


def _flatten(out: Any) -> torch.Tensor:
    if hasattr(out, "copy_outputs_to_cpu"):  # an ONNX Runtime I/O binding
        out = out.copy_outputs_to_cpu()
    if isinstance(out, (list, tuple)):
        return torch.cat([_flatten(o) for o in out])
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    return out.detach().float().flatten().cpu()


def max_abs_err(got: Any, want: Any) -> float | None:
    """Largest |got - want| over the finite reference entries; None if the layouts differ."""
    g, w = _flatten(got), _flatten(want)
    if g.shape != w.shape:
        return None
    finite = torch.isfinite(w)
    return float((g[finite] - w[finite]).abs().max()) if finite.any() else 0.0

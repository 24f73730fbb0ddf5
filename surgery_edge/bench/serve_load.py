"""The serving benchmark's load: which models answer one request in each configuration, the
requests prepared once, closed-loop gRPC clients, and the server's engine-call counters.

A configuration is a list of calls per request (``route``): the V1 engine or the eight experts
as one graph answer every task in one call, the eight expert models in eight calls sent
together (the request is answered when the last one is); a mixed-task stream sends one call,
routed by task id or to the task's expert.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import Callable

import numpy as np

from surgery_edge.bench.choices import ONE_GRAPH
from surgery_edge.engine_format import EngineMetadata, EngineMode
from surgery_edge.runtime.triton_models import STACKED_OUTPUT

# the configurations of each workload, compared with each other at every concurrency
WORKLOADS = {
    "all-tasks": ("v1", ONE_GRAPH, "experts"),
    "mixed": ("v2", "merged", "experts"),
}
Route = Callable[[np.random.Generator], list[tuple[str, int]]]  # -> [(model, task id)]


class Requests:
    """The requests of one configuration: inputs prepared once per task, sent over gRPC."""

    def __init__(self, grpc, metas: dict[str, EngineMetadata], image: np.ndarray):
        self._grpc, self._metas, self._cache, self._outputs = grpc, metas, {}, {}
        self._image = image  # (1, 3, S, S) float32

    def outputs(self, model: str):
        """The one output each model is asked for: a routed engine's ``logits``, an expert's
        logits, an all-tasks engine's stacked ``logits`` (every task in one tensor, not eight:
        the V1 engine and the experts' one graph alike)."""
        if model not in self._outputs:
            meta = self._metas[model]
            if meta.mode is EngineMode.ROUTED:
                name = "logits"
            else:
                name = meta.outputs[0] if len(meta.outputs) == 1 else STACKED_OUTPUT
            self._outputs[model] = [self._grpc.InferRequestedOutput(name)]
        return self._outputs[model]

    def inputs(self, model: str, task: int):
        """The inputs of one call to ``model`` for task ``task``, made once and reused."""
        key = (model, task)
        if key not in self._cache:
            first = self._grpc.InferInput("images", list(self._image.shape), "FP32")
            first.set_data_from_numpy(self._image)
            inputs = [first]
            if self._metas[model].mode is EngineMode.ROUTED:
                ids = self._grpc.InferInput("task_ids", [1, 1], "INT64")
                ids.set_data_from_numpy(np.full((1, 1), task, np.int64))
                inputs.append(ids)
            self._cache[key] = inputs
        return self._cache[key]


def plan(workload: str, config: str, tasks: list[str]) -> tuple[list[str], Route]:
    """The models a configuration uses, and ``route(rng) -> [(model, task id)]``: the calls
    that answer one request."""
    experts = [f"expert-{t}" for t in tasks]
    if workload == "all-tasks":
        if config == "experts":
            return experts, lambda rng: [(m, 0) for m in experts]
        return [config], lambda rng: [(config, 0)]  # v1, or the experts' one graph
    if config == "experts":
        return experts, lambda rng: [(experts[int(rng.integers(len(tasks)))], 0)]
    return [config], lambda rng: [(config, int(rng.integers(len(tasks))))]


async def load(
    url: str,
    requests: Requests,
    route: Route,
    concurrency: int,
    until: float,
    seed: int,
    stop: threading.Event | None = None,
) -> list[tuple[float, float, bool]]:
    """Closed-loop clients until ``until`` (monotonic) or, with ``stop``, until it is set,
    whichever comes first (a load whose length is not known in advance, such as a version
    roll's, passes ``until=math.inf``); returns (start, end, ok) per request. Each client
    finishes the request it has in flight."""
    import tritonclient.grpc.aio as aio  # deferred: optional, the serve extra

    stop = stop or threading.Event()  # never set: the time alone ends the load
    done: list[tuple[float, float, bool]] = []
    async with aio.InferenceServerClient(url) as client:

        async def user(k: int) -> None:
            rng = np.random.default_rng(seed * 1000 + k)
            while time.monotonic() < until and not stop.is_set():
                calls = route(rng)
                start = time.monotonic()
                try:
                    await asyncio.gather(
                        *(
                            client.infer(m, requests.inputs(m, t), outputs=requests.outputs(m))
                            for m, t in calls
                        )
                    )
                    ok = True
                except Exception:  # a failed request is counted, the load goes on
                    ok = False
                done.append((start, time.monotonic(), ok))

        await asyncio.gather(*(user(k) for k in range(concurrency)))
    return done


def counters(metrics_url: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of the Prometheus counter ``name`` at ``metrics_url``."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {labels: float(v) for labels, v in re.findall(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M)}


def label(labels: str, key: str) -> str:
    """The value of ``key`` in a Prometheus label set (``a="x",b="y"``)."""
    return re.search(rf'{key}="([^"]*)"', labels)[1]

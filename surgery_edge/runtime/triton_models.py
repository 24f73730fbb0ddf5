"""The Python-backend models that ``surgery-edge serve`` runs inside Triton Inference Server.

Triton runs each model of a Python-backend repository in a stub process, through the class
``TritonPythonModel`` of ``MODEL/1/model.py``; the repository that
:mod:`surgery_edge.runtime.serving` writes has one-line ``model.py`` files that import the
classes below, so the logic lives here, in the installed package:

- :class:`EngineModel`: one engine behind Triton's dynamic batcher. The batcher hands it the
  requests that arrived together, from any task; it checks each request on its own, runs the
  valid ones as **one** engine call (so a routed engine answers several tasks in one call) and
  answers every request separately: a bad request gets its own error, the others their logits.
- :class:`TaskModel`: one task, for clients that have image files: encoded bytes (PNG, JPEG,
  ...) in, the top-k class names and probabilities out. It decodes with the engine's own
  preprocessing (bounded by ``max_pixels``) and asks the engine model through Triton's
  business-logic scripting (BLS), so its requests join the engine's cross-task batches.

The request handling (:class:`EngineRequests`, :class:`TaskRequests`) is plain numpy, tested
without a server; the two Triton classes only move tensors in and out. They also export
Prometheus metrics: every engine call by its rows and distinct tasks
(``surgery_edge_engine_calls_total``), rows per task, and rejected requests by reason.
"""

from __future__ import annotations

import contextlib
import json
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surgery_edge.engine_format import EngineMetadata, EngineMode, engine_kind, validate_metadata
from surgery_edge.errors import ExportError
from surgery_edge.runtime.backends import Backend, OnnxBackend, open_backend
from surgery_edge.runtime.predictor import softmax
from surgery_edge.runtime.preprocess import normalise, open_image, resize_crop


@dataclass(frozen=True)
class Rejected:
    """Why one request gets an error instead of an answer; ``reason`` labels the metric."""

    message: str
    reason: str


Inputs = dict[str, np.ndarray]
Answer = dict[str, np.ndarray] | Rejected


STACKED_OUTPUT = "logits"  # every task's logits of an all-tasks engine, (B, T, C_max)
TASK_PARAMETER = "task"  # a request parameter: the task, by name (what task models send)
VERSION_PARAMETER = "engine_version"  # and the engine version the asking task model is for


def loading_message(task: str, version: int, serving: int, tasks: Sequence[str]) -> str:
    """What a client asking for ``task`` hears while engine version ``version``, which serves
    it, loads to replace version ``serving``."""
    return (
        f"task {task!r} is served by engine version {version}, which is loading; version "
        f"{serving} answers now and serves {', '.join(tasks)}. Retry once version {version} is "
        "ready."
    )


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """``arrays`` concatenated along the batch; one array is returned as it is (no copy)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


class EngineRequests:
    """One engine answering batches of requests, each request checked on its own.

    A request holds ``images`` (B, 3, S, S) float32 and, for a routed engine, ``task_ids``
    (B, 1) or (B,) int64; Triton has already checked names, dtypes and the non-batch shape.
    A request may instead name its task (:data:`TASK_PARAMETER`): every row is that task's.

    Args:
        backend: the engine.
        version: its version in the model repository (named in errors).
        newer: the versions of the same model now loading (named in errors).
    """

    def __init__(self, backend: Backend, version: int = 1, newer: Callable[[], list[int]] = list):
        self.backend, self.meta = backend, backend.meta
        self.version, self.newer = version, newer
        self.routed = self.meta.mode is EngineMode.ROUTED
        self.inputs = list(self.meta.inputs)
        self.outputs = list(self.meta.outputs)
        # an all-tasks engine also answers every task in one tensor, when a request asks for it
        self.stacked = None if self.routed else STACKED_OUTPUT
        # the last engine call: its rows, and (routed) the task of each row
        self.last_rows, self.last_tasks = 0, np.zeros(0, np.int64)

    def check(
        self, inputs: Inputs, task: str | None = None, asking: int | None = None
    ) -> Rejected | tuple[np.ndarray, np.ndarray | None]:
        """A request's images and task ids, or why it is refused.

        Args:
            inputs: the request's tensors.
            task: the task the request names, if it names one (then its ``task_ids`` are
                not read: they index the tasks of the version the asker was made for).
            asking: the engine version the asker was made for (named in errors).
        """
        images = inputs["images"]
        s = self.meta.preprocessing.image_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s) or images.dtype != np.float32:
            return Rejected(
                f"images must be (B, 3, {s}, {s}) float32, got {images.shape} {images.dtype}.",
                "shape",
            )
        if len(images) == 0:
            return Rejected("the request holds no images (an empty batch).", "empty")
        if not np.isfinite(images).all():
            return Rejected("images hold NaN or infinite values.", "non_finite")
        if task is not None and task not in self.meta.tasks:
            return self._absent(task, asking)
        if not self.routed:
            return images, None
        if task is not None:
            return images, np.full(len(images), self.meta.tasks.index(task), np.int64)
        ids = np.asarray(inputs["task_ids"]).reshape(-1)
        if len(ids) != len(images):
            return Rejected(f"{len(images)} images but {len(ids)} task ids.", "shape")
        bad = ids[(ids < 0) | (ids >= len(self.meta.tasks))]
        if len(bad):
            known = ", ".join(f"{i}={t}" for i, t in enumerate(self.meta.tasks))
            newer = self.newer()
            loading = (
                f" Version {newer[-1]} of this model is loading: retry once it is ready."
                if newer
                else ""
            )
            return Rejected(
                f"task id {int(bad[0])} is out of range: this engine (version {self.version}) "
                f"serves {known}.{loading}",
                "task_id",
            )
        return images, ids.astype(np.int64)

    def _absent(self, task: str, asking: int | None) -> Rejected:
        """The refusal of a task this version lacks: one that a newer version (which the
        asker was made for) is loading, or one that this version dropped."""
        if asking is not None and asking > self.version:
            return Rejected(loading_message(task, asking, self.version, self.meta.tasks),
                            "loading")  # fmt: skip
        return Rejected(
            f"task {task!r} is not served by engine version {self.version}, which answers now "
            f"and serves {', '.join(self.meta.tasks)}.",
            "task",
        )

    def run(
        self, requests: Sequence[Inputs], named: Sequence[tuple[str | None, int | None]] = ()
    ) -> list[Answer]:
        """Answer each request: its outputs (rows of one engine call), or its rejection.

        ``named``: per request, the task it names and the version its asker was made for
        (:meth:`check`); none by default."""
        named = list(named) or [(None, None)] * len(requests)
        checked = [self.check(r, *n) for r, n in zip(requests, named)]
        good = [i for i, c in enumerate(checked) if not isinstance(c, Rejected)]
        answers: list[Answer] = [c if isinstance(c, Rejected) else {} for c in checked]
        self.last_rows, self.last_tasks = 0, np.zeros(0, np.int64)
        if not good:
            return answers
        # one request (one client's) or one engine call: its arrays as they are, not copied
        images = _joined([checked[i][0] for i in good])
        ids = _joined([checked[i][1] for i in good]) if self.routed else None
        step = max(1, int(self.backend.max_batch))
        parts = [
            self.backend.run(images[k : k + step], None if ids is None else ids[k : k + step])
            for k in range(0, len(images), step)
        ]
        outputs = [_joined([p[o] for p in parts]) for o in range(len(self.outputs))]
        self.last_rows = len(images)
        self.last_tasks = ids if ids is not None else self.last_tasks
        start = 0
        for i in good:
            rows = len(checked[i][0])
            answers[i] = {
                name: np.ascontiguousarray(out[start : start + rows])
                for name, out in zip(self.outputs, outputs)
            }
            start += rows
        return answers

    def stack(self, answer: dict[str, np.ndarray]) -> np.ndarray:
        """An all-tasks answer as one (B, T, C_max) float32 tensor, ``-inf`` beyond each task's
        classes (as the routed engine pads): one output to send instead of T."""
        first = answer[self.outputs[0]]
        out = np.full((len(first), len(self.outputs), max(self.meta.class_counts)), -np.inf,
                      np.float32)  # fmt: skip
        for t, name in enumerate(self.outputs):
            out[:, t, : answer[name].shape[1]] = answer[name]
        return out


class TaskRequests:
    """One task of an engine, for encoded images: decode, then turn the logits into top-k.

    Args:
        meta: the engine's metadata (preprocessing, tasks, class names).
        task: this model's task.
        top_k: classes returned when a request does not ask (``parameters: {"top_k": k}``).
        max_pixels: the most pixels an encoded image may declare.
    """

    def __init__(self, meta: EngineMetadata, task: str, top_k: int, max_pixels: int):
        if task not in meta.tasks:
            raise ExportError(f"Task {task!r} is not one of the engine's {list(meta.tasks)}.")
        self.meta, self.task, self.task_id = meta, task, meta.tasks.index(task)
        self.class_names = meta.class_names[self.task_id]
        self.top_k = min(int(top_k), len(self.class_names))
        self.max_pixels = max_pixels
        self.output = "logits" if meta.mode is EngineMode.ROUTED else f"logits_{task}"

    def decode(self, encoded: np.ndarray) -> np.ndarray | Rejected:
        """(B, 1) or (B,) encoded images -> (B, 3, S, S) float32 engine input."""
        pre = self.meta.preprocessing
        rows = encoded.reshape(-1)
        if len(rows) == 0:
            return Rejected("the request holds no images (an empty batch).", "empty")
        arrays = []
        for k, data in enumerate(rows):
            if not isinstance(data, bytes) or not data:
                return Rejected(f"image {k} of the request is empty.", "decode")
            try:
                image = open_image(data, self.max_pixels)
                arrays.append(resize_crop(image, pre.image_size, pre.resize, pre.interpolation))
            except ExportError as e:
                reason = "too_large" if "max_pixels" in str(e) else "decode"
                return Rejected(f"image {k} of the request: {e}", reason)
        return normalise(np.stack(arrays), pre.mean, pre.std)

    def requested_top_k(self, parameters: dict[str, Any]) -> int | Rejected:
        k = parameters.get("top_k", self.top_k)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self.class_names):
            return Rejected(
                f"top_k must be an integer from 1 to {len(self.class_names)}, got {k!r}.", "top_k"
            )
        return k

    def answer(self, logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """(B, >= C) logits -> the top ``k`` class names (bytes), probabilities, indices."""
        probs = softmax(np.asarray(logits[:, : len(self.class_names)], np.float64))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        names = np.array(
            [[self.class_names[c].encode("utf-8") for c in row] for row in order], dtype=object
        )
        top = np.take_along_axis(probs, order, axis=1).astype(np.float32)
        return {"labels": names, "probs": top, "classes": order.astype(np.int64)}


# --- inside Triton ---------------------------------------------------------------------------


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model's config, as strings, from the stub's ``args``."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def check_interpreter(params: dict[str, str]) -> None:
    """The stub must run the server's Python: a stub that loaded another libpython (same minor
    version, other patch level) fails later in obscure ways, so fail here, clearly."""
    want, have = params.get("python_version"), platform.python_version()
    if want and want != have:
        raise ExportError(
            f"Triton's Python backend stub runs Python {have}, but the server was started by "
            f"Python {want}: the stub loaded another libpython. Start the server from an "
            "interpreter whose shared libpython is on LD_LIBRARY_PATH (surgery-edge serve "
            "sets this itself)."
        )


FLUSH_S = 0.05  # how often a model's counters are sent to the server


class _Metrics:
    """Prometheus counters of one model (Triton serves them on its metrics port).

    Each increment of a Python-backend metric is a round trip from the stub to the
    tritonserver process: about 0.2 ms on the 2-core CPU, longer while the server is busy, and
    one per task of a mixed batch; on the request path that is a tenth of an engine call. So
    :meth:`add` only sums, and the sums are sent at most every ``flush_s``: by the model's own
    thread at the end of an ``execute`` (:meth:`executing`), and, once the model has been idle
    for ``flush_s``, by a background thread, so the last requests' counts do not wait for the
    next request. Under load only the model's thread sends, so the stub's IPC is never used by
    two threads at once on the request path (a short A/B on the 2-core CPU with the background
    thread sending during load gave 1.2-1.5x lower request rates, on a noisy machine).
    The counters trail the requests by up to about ``flush_s``; :meth:`close` sends the rest.
    """

    def __init__(self, pb_utils, model: str, flush_s: float = FLUSH_S):
        family = pb_utils.MetricFamily
        self._pb, self._model, self._metrics = pb_utils, model, {}
        self._families = {
            "calls": family(
                name="surgery_edge_engine_calls_total",
                description="Engine calls by the rows they held and the distinct tasks among them",
                kind=family.COUNTER,
            ),
            "rows": family(
                name="surgery_edge_engine_rows_total",
                description="Image rows the engine answered, by task",
                kind=family.COUNTER,
            ),
            "rejected": family(
                name="surgery_edge_rejected_requests_total",
                description="Requests answered with an error, by reason",
                kind=family.COUNTER,
            ),
        }
        self._pending: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock, self._sending = threading.Lock(), threading.Lock()  # sums; sending them
        self._flush_s, self._sent = flush_s, time.monotonic()
        self._busy, self._last = False, time.monotonic()  # in execute; when it last ended
        self._stop = threading.Event()
        self._failed = False
        self._thread = threading.Thread(target=self._run, name=f"{model}-metrics", daemon=True)
        self._thread.start()

    def add(self, family: str, value: float = 1.0, **labels: str) -> None:
        if family not in self._families:
            raise KeyError(f"no metric family {family!r}")
        key = (family, tuple(sorted(labels.items())))
        with self._lock:
            self._pending[key] = self._pending.get(key, 0.0) + value

    @contextlib.contextmanager
    def executing(self) -> Iterator[None]:
        """Around an ``execute``: afterwards, send the sums if ``flush_s`` has passed."""
        with self._lock:
            self._busy = True
        try:
            yield
        finally:
            now = time.monotonic()
            with self._lock:
                self._busy, self._last = False, now
            if now - self._sent >= self._flush_s:
                self._send()

    def flush(self) -> None:
        """Send the sums gathered since the last flush."""
        with self._sending:
            with self._lock:
                pending, self._pending = self._pending, {}
            self._sent = time.monotonic()
            for key, value in pending.items():
                if key not in self._metrics:
                    family, labels = key
                    all_labels = {"model": self._model, **dict(labels)}
                    self._metrics[key] = self._families[family].Metric(labels=all_labels)
                self._metrics[key].increment(value)

    def close(self) -> None:
        """Stop the thread and send what is left."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()

    def _send(self) -> None:
        try:
            self.flush()
        except Exception as e:  # never fail a request or the model for a counter; say so once
            if not self._failed:
                self._failed = True
                self._pb.Logger.log_warn(f"{self._model}: metrics not sent: {e}")

    def _run(self) -> None:
        while not self._stop.wait(self._flush_s):
            with self._lock:
                idle = not self._busy and time.monotonic() - self._last >= self._flush_s
                due = idle and bool(self._pending)
            if due:
                self._send()


def _error(pb_utils, rejected: Rejected):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(rejected.message, pb_utils.TritonError.INVALID_ARG)
    )


class EngineModel:
    """Triton Python model: the engine (parameters: ``engine``, ``device``, ``threads``)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils  # deferred: exists only in Triton's stub

        params = model_parameters(args)
        check_interpreter(params)
        path, device = params["engine"], params.get("device", "auto")
        threads = int(params["threads"]) if params.get("threads") else None
        if engine_kind(path) == "onnx":
            backend = OnnxBackend(path, device=device, threads=threads)
        else:
            backend = open_backend(path, device=device)
        version, folder = int(args["model_version"]), Path(args["model_repository"])

        def newer() -> list[int]:  # the versions written beside this one: loading now
            found = (p.name for p in folder.iterdir() if p.name.isdigit())
            return sorted(n for n in map(int, found) if n > version)

        self.pb, self.engine = pb_utils, EngineRequests(backend, version, newer)
        self.metrics = _Metrics(pb_utils, args["model_name"])

    def execute(self, requests: list) -> list:
        with self.metrics.executing():
            return self._execute(requests)

    def _execute(self, requests: list) -> list:
        pb = self.pb
        inputs = [
            {n: pb.get_input_tensor_by_name(r, n).as_numpy() for n in self.engine.inputs}
            for r in requests
        ]
        try:
            answers = self.engine.run(inputs, [_named(r) for r in requests])
        except Exception as e:  # the engine itself failed: every request of this call is told
            failure = Rejected(
                f"the engine failed on this batch: {type(e).__name__}: {e}", "engine"
            )
            answers = [failure] * len(requests)
        engine = self.engine
        if engine.last_rows:
            mix = str(len(np.unique(engine.last_tasks))) if engine.routed else "all"
            self.metrics.add("calls", rows=str(engine.last_rows), tasks=mix)
            for t, n in zip(*np.unique(engine.last_tasks, return_counts=True)):
                self.metrics.add("rows", float(n), task=engine.meta.tasks[int(t)])
        responses = []
        for request, answer in zip(requests, answers):
            if isinstance(answer, Rejected):
                self.metrics.add("rejected", reason=answer.reason)
                responses.append(_error(pb, answer))
                continue
            wanted = set(request.requested_output_names()) or set(answer)
            tensors = [pb.Tensor(n, v) for n, v in answer.items() if n in wanted]
            if engine.stacked in wanted:
                tensors.append(pb.Tensor(engine.stacked, engine.stack(answer)))
            responses.append(pb.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.metrics.close()


def _named(request) -> tuple[str | None, int | None]:
    """The task a request names, and the engine version its asker was made for."""
    try:
        params = json.loads(request.parameters() or "{}")
    except json.JSONDecodeError:
        return None, None
    task, version = params.get(TASK_PARAMETER), params.get(VERSION_PARAMETER)
    return (
        task if isinstance(task, str) else None,
        version if isinstance(version, int) and not isinstance(version, bool) else None,
    )


class TaskModel:
    """Triton Python model: one task over encoded images (parameters: ``engine_model``,
    ``task``, ``top_k``, ``max_pixels``, ``surgery_edge``: the engine's metadata)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils  # deferred: exists only in Triton's stub

        params = model_parameters(args)
        check_interpreter(params)
        meta = validate_metadata(json.loads(params["surgery_edge"]), args["model_name"])
        self.pb, self.engine_model = pb_utils, params["engine_model"]
        self.engine_version = int(params.get("engine_version", "1"))
        self.task = TaskRequests(
            meta, params["task"], int(params["top_k"]), int(params["max_pixels"])
        )
        self.routed = meta.mode is EngineMode.ROUTED
        self.metrics = _Metrics(pb_utils, args["model_name"])

    def execute(self, requests: list) -> list:
        with self.metrics.executing():
            return self._execute(requests)

    def _execute(self, requests: list) -> list:
        pb = self.pb
        decoded = [self._decode(r) for r in requests]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, Rejected)]
        answers: list[Answer] = [d if isinstance(d, Rejected) else {} for d in decoded]
        if good:
            logits = self._engine(np.concatenate([decoded[i][0] for i in good]))
            start = 0
            for i in good:
                images, k = decoded[i]
                rows = (
                    logits if isinstance(logits, Rejected) else logits[start : start + len(images)]
                )
                answers[i] = rows if isinstance(rows, Rejected) else self.task.answer(rows, k)
                start += len(images)
        responses = []
        for answer in answers:
            if isinstance(answer, Rejected):
                self.metrics.add("rejected", reason=answer.reason)
                responses.append(_error(pb, answer))
            else:
                tensors = [pb.Tensor(n, v) for n, v in answer.items()]
                responses.append(pb.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.metrics.close()

    def _decode(self, request) -> tuple[np.ndarray, int] | Rejected:
        """A request's images as engine input, and how many classes it asks for."""
        try:
            params = json.loads(request.parameters() or "{}")
        except json.JSONDecodeError:
            params = {}
        k = self.task.requested_top_k(params)
        if isinstance(k, Rejected):
            return k
        images = self.task.decode(self.pb.get_input_tensor_by_name(request, "image").as_numpy())
        return images if isinstance(images, Rejected) else (images, k)

    def _engine(self, images: np.ndarray) -> np.ndarray | Rejected:
        """One BLS request to the engine model: it joins the engine's dynamic batches."""
        pb = self.pb
        inputs = [pb.Tensor("images", images)]
        if self.routed:
            ids = np.full((len(images), 1), self.task.task_id, np.int64)
            inputs.append(pb.Tensor("task_ids", ids))
        # by name: another version of the engine may answer, whose ids are other tasks'
        named = {TASK_PARAMETER: self.task.task, VERSION_PARAMETER: self.engine_version}
        request = pb.InferenceRequest(
            model_name=self.engine_model,
            inputs=inputs,
            requested_output_names=[self.task.output],
            parameters=named,
        )
        response = request.exec()
        if response.has_error():
            message = response.error().message()
            if "unexpected inference output" in message:  # an all-tasks version without it
                return Rejected(
                    f"the engine version answering now does not serve task {self.task.task!r} "
                    f"(this task model belongs to engine version {self.engine_version}); the "
                    "served version is changing: retry once it is done.",
                    "loading",
                )
            if "is served by engine version" in message:  # the version with it is loading
                return Rejected(message, "loading")
            if "is not served by engine version" in message:  # the version serving dropped it
                return Rejected(message, "task")
            return Rejected(f"the engine model failed: {message}", "engine")
        return pb.get_output_tensor_by_name(response, self.task.output).as_numpy()

"""Small multi-task engines built as ONNX graphs in milliseconds, with a NumPy reference.

The Predictor and the quantiser read any engine in the project's format: a graph with the
engine's inputs and outputs, its metadata and its digest. These graphs have the layers the
quantiser groups (a patch-embedding Conv, a constant-weight MatMul, a LayerNormalization, the
gathered per-task adapter and head tables, the Softmax) but no transformer, so the tests that
need an engine do not need the tiny run or a minute of tracing, and :class:`LinearEngine`
computes what every answer must be.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from surgery_edge.engine_format import FORMAT_VERSION, META_KEY, EngineMode, io_names
from surgery_edge.export.onnx import write_engine

PATCH = 4
WIDTH = 8  # channels of the patch embedding
HIDDEN = 6
PREPROCESSING = {
    "image_size": 8,
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.25, 0.3],
    "resize": "shortest",
    "interpolation": "bicubic",
}


@dataclass
class LinearEngine:
    """The weights of one engine and what it answers, in NumPy (float64)."""

    tasks: list[str]
    classes: list[int]
    conv: np.ndarray  # (WIDTH, 3, PATCH, PATCH)
    linear: np.ndarray  # (WIDTH * n_patches, HIDDEN)
    adapters: np.ndarray  # (T, HIDDEN, HIDDEN)
    heads: np.ndarray  # (T, HIDDEN, C_max)
    bias: np.ndarray  # (T, C_max), -inf beyond each task's classes

    def features(self, x: np.ndarray) -> np.ndarray:  # (B, 3, S, S) -> (B, HIDDEN)
        b, _, s, _ = x.shape
        g = s // PATCH
        patches = x.reshape(b, 3, g, PATCH, g, PATCH).astype(np.float64)
        emb = np.einsum("bcipjq,ocpq->boij", patches, self.conv)  # (B, WIDTH, g, g)
        z = emb.reshape(b, -1) @ self.linear
        return (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)

    def logits(self, x: np.ndarray, t: int) -> np.ndarray:  # (B, 3, S, S) -> (B, C_t)
        z = self.features(x)
        z = z + z @ self.adapters[t]
        return (z @ self.heads[t] + self.bias[t])[:, : self.classes[t]]


def _init(name: str, a: np.ndarray):
    return numpy_helper.from_array(np.array(a, order="C"), name)  # keeps 0-d


def build_engine(
    path: str | Path,
    mode: str = "routed",
    tasks: tuple[str, ...] = ("digits", "shapes", "colours"),
    classes: tuple[int, ...] = (3, 5, 2),
    seed: int = 0,
    preprocessing: dict | None = None,
    extra: dict | None = None,
    linear_op: str = "MatMul",
) -> LinearEngine:
    """Write a sealed fp32 engine of ``mode`` to ``path``; returns its reference.

    ``linear_op``: ``MatMul`` or ``Gemm`` for the constant-weight layer (exporters emit both).
    """
    pre = {**PREPROCESSING, **(preprocessing or {})}
    size, T, C = pre["image_size"], len(tasks), max(classes)
    rng = np.random.default_rng(seed)
    f32 = np.float32
    ref = LinearEngine(
        list(tasks),
        list(classes),
        conv=rng.normal(0, 0.3, (WIDTH, 3, PATCH, PATCH)).astype(f32),
        linear=rng.normal(0, 0.3, (WIDTH * (size // PATCH) ** 2, HIDDEN)).astype(f32),
        adapters=rng.normal(0, 0.3, (T, HIDDEN, HIDDEN)).astype(f32),
        heads=rng.normal(0, 1.0, (T, HIDDEN, C)).astype(f32),
        bias=np.array([[0.0 if c < n else -np.inf for c in range(C)] for n in classes], f32),
    )
    inits = [
        _init("conv.w", ref.conv),
        _init("linear.w", ref.linear),
        _init("ln.scale", np.ones(HIDDEN, f32)),
        _init("ln.bias", np.zeros(HIDDEN, f32)),
        _init("adapter_table", ref.adapters),
        _init("head_table", ref.heads),
        _init("head_bias", ref.bias),
        _init("axis1", np.array([1], np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "conv.w"], ["emb"], "patch", strides=[PATCH] * 2),
        helper.make_node("Flatten", ["emb"], ["flat"], "flatten"),
        helper.make_node(linear_op, ["flat", "linear.w"], ["lin"], "linear"),
        helper.make_node(
            "LayerNormalization", ["lin", "ln.scale", "ln.bias"], ["z"], "ln", axis=-1
        ),
        helper.make_node("Unsqueeze", ["z", "axis1"], ["z3"], "z3"),
    ]
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])
    inputs, outputs = io_names(EngineMode(mode), tasks)
    graph_in, graph_out = [images], []
    if mode == "routed":
        graph_in.append(helper.make_tensor_value_info("task_ids", TensorProto.INT64, ["batch"]))
        nodes += [
            helper.make_node("Gather", ["adapter_table", "task_ids"], ["a"], "a.gather"),
            helper.make_node("MatMul", ["z3", "a"], ["za3"], "a.matmul"),  # (B, 1, H)
            helper.make_node("Squeeze", ["za3", "axis1"], ["za"], "a.squeeze"),
            helper.make_node("Add", ["z", "za"], ["z2"], "a.add"),
            helper.make_node("Unsqueeze", ["z2", "axis1"], ["z23"], "h.unsqueeze"),
            helper.make_node("Gather", ["head_table", "task_ids"], ["h"], "h.gather"),
            helper.make_node("MatMul", ["z23", "h"], ["l3"], "h.matmul"),  # (B, 1, C)
            helper.make_node("Squeeze", ["l3", "axis1"], ["l"], "h.squeeze"),
            helper.make_node("Gather", ["head_bias", "task_ids"], ["hb"], "hb.gather"),
            helper.make_node("Add", ["l", "hb"], ["logits"], "logits"),
            helper.make_node("Softmax", ["logits"], ["probs"], "probs", axis=-1),
        ]
        for name in outputs:
            graph_out.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", C]))
    else:
        for t, (task, n) in enumerate(zip(tasks, classes)):
            inits += [_init(f"t{t}", np.array(t, np.int64)), _init(f"n{t}", np.array([n]))]
            nodes += [
                helper.make_node("Gather", ["adapter_table", f"t{t}"], [f"a{t}"], f"a{t}.gather"),
                helper.make_node("MatMul", ["z", f"a{t}"], [f"za{t}"], f"a{t}.matmul"),
                helper.make_node("Add", ["z", f"za{t}"], [f"z{t}"], f"a{t}.add"),
                helper.make_node("Gather", ["head_table", f"t{t}"], [f"h{t}"], f"h{t}.gather"),
                helper.make_node("MatMul", [f"z{t}", f"h{t}"], [f"l{t}"], f"h{t}.matmul"),
                helper.make_node("Gather", ["head_bias", f"t{t}"], [f"b{t}"], f"b{t}.gather"),
                helper.make_node("Add", [f"l{t}", f"b{t}"], [f"lb{t}"], f"b{t}.add"),
                helper.make_node(
                    "Slice", [f"lb{t}", "zero", f"n{t}", "axis1"], [f"logits_{task}"], f"s{t}"
                ),
            ]
            graph_out.append(
                helper.make_tensor_value_info(f"logits_{task}", TensorProto.FLOAT, ["batch", n])
            )
        inits.append(_init("zero", np.array([0], np.int64)))
    graph = helper.make_graph(nodes, "linear-engine", graph_in, graph_out, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "engine",
        "package_version": "test",
        "tasks": list(tasks),
        "class_names": [[f"{task}-{c}" for c in range(n)] for task, n in zip(tasks, classes)],
        "preprocessing": pre,
        "method": "surgery",
        "rank": HIDDEN,
        "merge_recipe": {},
        "mode": mode,
        "precision": "fp32",
        "inputs": inputs,
        "outputs": outputs,
        "format": "onnx",
        "opset": 18,
        "task_tables": {"heads": ["head_table"], "adapters": ["adapter_table"]},
        **(extra or {}),
    }
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    onnx.checker.check_model(proto, full_check=True)
    write_engine(proto, path)
    return ref

"""The quantised graph's parts: node groups a recipe keeps in higher precision, and the per-task
tables (each task's adapters and head, gathered by task id) stored weight-only.

Used by :mod:`surgery_edge.export.quantize`; reads and edits ONNX protos only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Node groups a recipe may keep in higher precision (see :func:`node_groups`).
GROUPS = (
    "patch_embedding",  # the Conv that embeds patches
    "linear",  # constant-weight MatMul / Gemm of the backbone (attention in/out, MLP, proj)
    "attention",  # activation x activation MatMuls (Q.K^T, attention.V)
    "adapters",  # the products with the gathered adapter tables
    "heads",  # the product with the gathered head table
    "layernorm",
    "softmax",
)
TABLE_STORAGE = ("int8", "fp16", "fp32")


# --- the graph: node groups and per-task tables ----------------------------------------------

# Ops that move or reshape a tensor without computing on it: a weight seen through them is
# still that weight.
_PASS_THROUGH = {
    "Transpose",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "Identity",
    "Expand",
    "Slice",
    "Gather",
    "GatherND",
    "Flatten",
}


def _roots(name: str, producers: dict, initializers: set[str], depth: int = 0) -> set[str]:
    """The initializers that tensor ``name`` is only a reshaped or gathered view of."""
    if name in initializers:
        return {name}
    node = producers.get(name)
    if node is None or node.op_type not in _PASS_THROUGH or depth > 12:
        return set()
    data = (
        node.input[:1]
        if node.op_type in ("Gather", "GatherND", "Slice", "Expand")
        else [node.input[0]]
    )
    out: set[str] = set()
    for i in data:
        out |= _roots(i, producers, initializers, depth + 1)
    return out


def node_groups(proto: onnx.ModelProto, tables: dict[str, list[str]]) -> dict[str, list[str]]:
    """The names of the nodes in each of :data:`GROUPS`.

    Args:
        proto: the fp32 engine.
        tables: the engine metadata's ``task_tables`` (``{"heads": [...], "adapters": [...]}``).
    """
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    heads, adapters = set(tables.get("heads", [])), set(tables.get("adapters", []))
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for node in graph.node:
        op = node.op_type
        if op == "Conv":
            groups["patch_embedding"].append(node.name)
        elif op == "LayerNormalization":
            groups["layernorm"].append(node.name)
        elif op == "Softmax":
            groups["softmax"].append(node.name)
        elif op in ("MatMul", "Gemm", "Einsum"):
            roots = [_roots(i, producers, initializers) for i in node.input[:2]]
            every = set().union(*roots)
            if every & heads:
                groups["heads"].append(node.name)
            elif every & adapters:
                groups["adapters"].append(node.name)
            elif any(roots):
                groups["linear"].append(node.name)
            else:
                groups["attention"].append(node.name)
    return groups


def store_tables(proto: onnx.ModelProto, names: list[str], storage: str) -> tuple[list[str], int]:
    """Store the per-task tables ``names`` as ``storage``, in place.

    Returns the tables stored so (those a quantiser has not already taken as a layer's
    constant weight, as V1's all-tasks graph offers its final adapters) and the bytes saved.

    ``int8``: symmetric, one scale per row of the flattened ``(T * R, K)`` table (per task and
    output channel), ``DequantizeLinear`` then ``Reshape`` back to ``(T, R, K)``; the gathers
    that read the table are unchanged. ``fp16``: the table stored in half, cast back on load.
    """
    if storage == "fp32" or not names:
        return [], 0
    graph = proto.graph
    by_name = {t.name: t for t in graph.initializer}
    saved, new_nodes, stored_names = 0, [], []
    for name in names:
        init = by_name.get(name)
        if init is None or init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        stored_names.append(name)
        w = numpy_helper.to_array(init)
        dtype = w.dtype
        graph.initializer.remove(init)
        if storage == "fp16":
            stored = numpy_helper.from_array(w.astype(np.float16), f"{name}.fp16")
            graph.initializer.append(stored)
            new_nodes.append(
                helper.make_node(
                    "Cast", [stored.name], [name], name=f"{name}.load", to=init.data_type
                )
            )
            saved += w.nbytes - w.size * 2
            continue
        rows = w.reshape(-1, w.shape[-1]).astype(np.float32)
        scale = np.abs(rows).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}.int8"),
                numpy_helper.from_array(scale.astype(dtype), f"{name}.scale"),
                numpy_helper.from_array(np.array(w.shape, np.int64), f"{name}.shape"),
            ]
        )
        new_nodes += [
            helper.make_node(
                "DequantizeLinear",
                [f"{name}.int8", f"{name}.scale"],
                [f"{name}.rows"],
                name=f"{name}.dequantize",
                axis=0,
            ),
            helper.make_node(
                "Reshape", [f"{name}.rows", f"{name}.shape"], [name], name=f"{name}.reshape"
            ),
        ]
        saved += w.nbytes - q.nbytes - scale.size * dtype.itemsize
    for node in reversed(new_nodes):  # inputs are initializers: any position is topological
        graph.node.insert(0, node)
    return stored_names, saved

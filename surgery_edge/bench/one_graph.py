"""The fairest baseline of the benchmarks: the eight experts as **one model**, one ONNX graph
that takes an image once and answers every task, made from the experts' own engines.

Each expert's graph is copied in whole under a prefix of its own (``e<t>/``), every copy reads
the one ``images`` input, and the copies' outputs become ``logits_<task>`` (an all-tasks
engine's outputs): the same operators on the same weights, so the answers are the eight
models' answers, bit for bit. What it saves against eight models is everything around the
graph (eight requests, eight queues, eight input copies), not any computation: the engines'
margin over it is what sharing the backbone buys, and nothing else.

Torch-free (``onnx`` only), so it composes a run's exported experts as well as the benchmarks'
random ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import onnx
from onnx import compose, helper

from surgery_edge.bench.choices import ONE_GRAPH
from surgery_edge.engine_format import META_KEY, EngineMode, io_names
from surgery_edge.errors import ConfigError
from surgery_edge.io import atomic_path

# a proto over this holds its weights in a .data file beside it (protobuf's 2 GiB limit)
EXTERNAL_DATA_BYTES = 1 << 30


def _expert(path: Path) -> tuple[onnx.ModelProto, dict]:
    proto = onnx.load(str(path))  # external data, if any, is read in
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props.get(META_KEY, "null") or "null")
    inputs = [i.name for i in proto.graph.input]
    if not isinstance(meta, dict) or len(meta.get("tasks", [])) != 1 or inputs[:1] != ["images"]:
        raise ConfigError(
            f"{path} is not one expert's engine (one task, read from 'images'): export the "
            "experts with `surgery-edge export`, or give an empty folder to build them."
        )
    return proto, meta


def _zero_ids(nodes: list) -> str:
    """The name of a (B,) int64 tensor of zeros, B the images' batch, made once in ``nodes``."""
    if not any(n.output[0] == "zero_task_ids" for n in nodes):
        nodes.append(helper.make_node("Shape", ["images"], ["batch_size"], start=0, end=1))
        zero = helper.make_tensor("zero", onnx.TensorProto.INT64, [1], [0])
        nodes.append(
            helper.make_node("ConstantOfShape", ["batch_size"], ["zero_task_ids"], value=zero)
        )
    return "zero_task_ids"


def compose_experts(experts: Mapping[str, str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write the expert engines ``experts`` (``{task: engine}``: one task each, all-tasks mode,
    in task order) as one all-tasks engine answering those tasks at ``out``, sealed as an engine
    is; returns ``out``."""
    from surgery_edge.export.onnx import check_onnx, write_engine  # deferred: imports torch

    if not experts:
        raise ConfigError("No expert engine to compose.")
    out = Path(out)
    nodes, inits, value_info, functions, opsets, tasks, names = [], [], [], [], {}, [], []
    first_meta: dict = {}
    output_types = []
    for t, (task, path) in enumerate(experts.items()):
        proto, meta = _expert(Path(path))
        first_meta = first_meta or meta
        prefixed = compose.add_prefix(proto, prefix=f"e{t}/")
        g = prefixed.graph
        nodes.append(helper.make_node("Identity", ["images"], [g.input[0].name]))
        if len(g.input) > 1:  # a routed one-task expert: every row is its task, id 0
            nodes.append(helper.make_node("Identity", [_zero_ids(nodes)], [g.input[1].name]))
        nodes += g.node
        inits += g.initializer
        value_info += g.value_info
        functions += prefixed.functions  # the exporter's local functions, renamed too
        for o in prefixed.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        tasks.append(task)
        names += meta["class_names"]
        # the logits: an all-tasks expert's one output, a routed one's first (``logits``: its
        # one task's classes, no padding)
        nodes.append(helper.make_node("Identity", [g.output[0].name], [f"logits_{task}"]))
        output_types.append(g.output[0].type)
    _, outputs = io_names(EngineMode.ALL_TASKS, tasks)
    first = onnx.load(str(next(iter(experts.values()))), load_external_data=False)
    image = first.graph.input[0]  # images (B, 3, S, S) float32, as every expert reads it
    graph = helper.make_graph(
        nodes,
        "experts_one_graph",
        [image],
        [onnx.ValueInfoProto(name=n, type=ty) for n, ty in zip(outputs, output_types)],
        initializer=inits,
        value_info=value_info,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        functions=functions,
    )
    proto.ir_version = first.ir_version
    meta = {
        **{k: v for k, v in first_meta.items() if k != "integrity"},
        "mode": EngineMode.ALL_TASKS.value,
        "inputs": ["images"],
        "tasks": tasks,
        "class_names": names,
        "outputs": outputs,
        "baseline": f"{len(tasks)} expert engines composed into one graph ({ONE_GRAPH})",
    }
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    big = sum(init.ByteSize() for init in inits) > EXTERNAL_DATA_BYTES
    if big:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_engine(proto, out, external_data=True)  # two files: not atomic (benchmark scratch)
        check_onnx(out)
        return out
    with atomic_path(out) as tmp:
        write_engine(proto, tmp)
        check_onnx(tmp)
    return out

"""Each fact about an engine, and each name, is defined once: read from the source (``ast``).

The engine format (``surgery_edge/engine_format.py``) owns the modes and precisions, the reader
of each file kind, the inputs and outputs an engine's metadata implies, the effective precision
of a TensorRT build and the device names; ``runtime/triton_config.py`` owns Triton's batching;
the surgery-method registry (``surgery/methods.py``) owns the method and engine names. A second
definition elsewhere fails here, naming the file and line.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "surgery_edge", ROOT / "kernels", ROOT / "cli"]


Nodes = list[tuple[str, ast.AST]]  # (innermost enclosing function or class, node)


def flatten(tree: ast.Module) -> Nodes:
    """Every node of ``tree`` with the qualified name of the innermost function or class that
    encloses it (``""`` at module level), in one traversal: the checks below only iterate."""
    out: Nodes = []
    stack = [(tree, "")]
    while stack:
        node, where = stack.pop()
        for child in ast.iter_child_nodes(node):
            out.append((where, child))
            named = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            stack.append((child, f"{where}.{child.name}".lstrip(".") if named else where))
    return out


# A file that holds none of these cannot break a check below: only those that do are parsed
# (a third of the package; parsing is most of this file's time).
NEEDLES = re.compile(
    r"Precision|EngineMode|read_pt2_metadata|read_sidecar|parse_metadata|META_KEY|TensorSpec"
    r"|[\"']fp16[\"']|cuda\(:|max_queue_delay_microseconds|preferred_batch_size|--preferred-batch"
    r"|[\"'](surgery|surgeryv2|surgery-all-tasks|surgeryv2-routed|merged-routed"
    r"|merged-all-tasks|single-expert)[\"']"
)


@pytest.fixture(scope="module")
def sources() -> dict[str, Nodes]:
    texts = {
        path.relative_to(ROOT).as_posix(): path.read_text()
        for folder in SOURCES
        for path in sorted(folder.rglob("*.py"))
    }
    return {file: flatten(ast.parse(text)) for file, text in texts.items() if NEEDLES.search(text)}


# --- precision and mode: parsed once, at the edge ------------------------------------------

# Where a precision or a mode may be parsed from a string, and why there.
PARSE_SITES = {
    ("surgery_edge/engine_format.py", "validate_metadata"): "metadata read from an engine file",
    ("cli/engine.py", "export"): "the CLI's options",
    ("surgery_edge/export/onnx.py", "export_onnx"): "the library's entry: a user's strings",
    ("surgery_edge/export/aoti.py", "export_aoti"): "the library's entry: a user's strings",
    ("surgery_edge/export/quantize.py", "QuantRecipe.__post_init__"): (
        "a recipe is a frozen config record, also built from a benchmark's table"
    ),
}


def parse_sites(sources: dict[str, Nodes]) -> dict[tuple[str, str], int]:
    """``{(file, function): first line}`` of every ``Precision.parse`` / ``EngineMode.parse``
    call and every ``Precision(...)`` / ``EngineMode(...)`` construction."""
    found: dict[tuple[str, str], int] = {}
    for file, nodes in sources.items():
        for where, node in nodes:
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "parse":
                func = func.value
            if isinstance(func, ast.Name) and func.id in ("Precision", "EngineMode"):
                found.setdefault((file, where), node.lineno)
    return found


def test_precision_and_mode_are_parsed_only_at_the_edges(sources):
    sites = parse_sites(sources)
    stray = {f"{file}:{line} ({where})" for (file, where), line in sites.items()}
    stray -= {f"{file}:{sites[(file, where)]} ({where})" for file, where in PARSE_SITES}
    assert sorted(stray) == [], "parse a precision or mode at the edge and pass it typed"
    assert set(PARSE_SITES) <= set(sites)  # the allow-list holds no stale entry


def test_the_parse_check_finds_a_parse():
    tree = ast.parse("def f(p):\n    return Precision.parse(p)\n")
    assert parse_sites({"x.py": flatten(tree)}) == {("x.py", "f"): 2}


# --- the engine format: readers, specs, effective precision, devices ----------------------

ENGINE_FORMAT = "surgery_edge/engine_format.py"
# the per-kind readers and the raw JSON parser: everything else calls read_metadata (or
# metadata_from_props with an ONNX Runtime session's properties)
READERS = {"read_pt2_metadata", "read_sidecar", "parse_metadata"}
# who stores the metadata under its key (writers): nobody else touches META_KEY
META_WRITERS = {
    ENGINE_FORMAT: "the format itself",
    "surgery_edge/export/onnx.py": "writes an ONNX engine's metadata",
    "surgery_edge/export/aoti.py": "writes a .pt2 package's metadata",
    "surgery_edge/export/quantize.py": "writes a quantised engine's metadata",
    "surgery_edge/bench/one_graph.py": "composes the experts' raw records into one graph's",
}


def _names(nodes: Nodes) -> Iterator[tuple[str, int]]:
    for _, node in nodes:
        if isinstance(node, ast.Name):
            yield node.id, node.lineno
        elif isinstance(node, ast.Attribute):
            yield node.attr, node.lineno
        elif isinstance(node, ast.alias):
            yield node.name, getattr(node, "lineno", 0)


def test_metadata_is_read_only_through_the_engine_format(sources):
    stray = []
    for file, nodes in sources.items():
        if file == ENGINE_FORMAT:
            continue
        stray += [f"{file}:{line} {name}" for name, line in _names(nodes) if name in READERS]
        for _, node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module == "surgery_edge.engine_format":
                if "META_KEY" in {a.name for a in node.names} and file not in META_WRITERS:
                    stray.append(f"{file}:{node.lineno} META_KEY")
    assert stray == []


def test_io_specs_and_the_effective_precision_are_defined_once(sources):
    """One TensorSpec; the only code that asks a TensorRT record whether it was built in fp16
    is effective_precision; the device grammar is written once."""
    specs, fp16, devices = [], [], []
    for file, nodes in sources.items():
        for where, node in nodes:
            if isinstance(node, ast.ClassDef) and node.name == "TensorSpec":
                specs.append(file)
            if _reads_trt_fp16(node):
                fp16.append(f"{file} ({where})")
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if "cuda(:" in node.value:
                    devices.append(file)
    assert specs == [ENGINE_FORMAT]
    assert fp16 == [f"{ENGINE_FORMAT} (effective_precision)"]
    assert devices == [ENGINE_FORMAT]


def _constant(node: ast.AST) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _reads_trt_fp16(node: ast.AST) -> bool:
    """``<a TensorRT record>.get("fp16")`` or ``<a TensorRT record>["fp16"]``."""
    if isinstance(node, ast.Subscript):
        key, record = node.slice, node.value
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
        if node.func.attr != "get":
            return False
        key, record = node.args[0], node.func.value
    else:
        return False
    source = ast.unparse(record)
    return _constant(key) == "fp16" and (
        "tensorrt" in source or "trt" in source or "built" in source
    )


def test_a_routed_engine_s_specs_come_from_its_metadata():
    from surgery_edge.engine_format import EngineMode, Precision, io_specs, validate_metadata

    meta = validate_metadata(
        {
            "kind": "engine",
            "tasks": ["a", "b"],
            "class_names": [["x", "y"], ["p", "q", "r"]],
            "preprocessing": {"image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3},
            "method": "none",
            "mode": EngineMode.ROUTED.value,
            "precision": Precision.FP32.value,
            "inputs": ["images", "task_ids"],
            "outputs": ["logits", "probs"],
        },
        "m.onnx",
    )
    inputs, outputs = io_specs(meta)
    assert [(s.name, s.dtype, s.shape) for s in inputs] == [
        ("images", "float32", ("batch", 3, 8, 8)),
        ("task_ids", "int64", ("batch",)),
    ]
    assert [(s.name, s.shape) for s in outputs] == [
        ("logits", ("batch", 3)),
        ("probs", ("batch", 3)),
    ]


# --- Triton's batching: one spec, one validator, one dynamic_batching ----------------------

TRITON_CONFIG = "surgery_edge/runtime/triton_config.py"


def test_the_batching_spec_is_written_once(sources):
    """Only triton_config writes ``dynamic_batching`` or checks the batching flags; the
    repository writer and the server both hold a :class:`Batching`."""
    keys = {"max_queue_delay_microseconds", "preferred_batch_size", "--preferred-batch"}
    stray = [
        f"{file}:{node.lineno} {node.value}"
        for file, nodes in sources.items()
        if file != TRITON_CONFIG
        for _, node in nodes
        if isinstance(node, ast.Constant)
        and node.value in keys
        and (file, node.value) != ("cli/serve.py", "--preferred-batch")  # the option itself
    ]
    assert stray == []
    from surgery_edge.export.triton import TritonOptions
    from surgery_edge.runtime.serve_options import ServeOptions
    from surgery_edge.runtime.triton_config import Batching

    for options in (TritonOptions(max_batch=8, preferred_batches=(4,)), ServeOptions(max_batch=8)):
        assert isinstance(options.batching, Batching) and options.batching.max_batch == 8


@pytest.mark.parametrize(
    ("batching", "match"),
    [
        ({"max_batch": 0}, "--max-batch must be an integer of at least 1, got 0"),
        ({"max_batch": 4, "preferred_batches": (8,)}, "--preferred-batch must be an integer from"),
        ({"max_queue_delay_us": -1}, "--max-queue-delay-us"),
        ({"max_batch": True}, "--max-batch"),
    ],
)
def test_one_validator_refuses_bad_batching_for_both(batching, match):
    from surgery_edge.errors import ExportError
    from surgery_edge.export.triton import TritonOptions
    from surgery_edge.runtime.serve_options import ServeOptions

    for options in (TritonOptions(**batching), ServeOptions(**batching)):
        with pytest.raises(ExportError, match=match):
            options.check()


def test_the_dynamic_batching_dict():
    from surgery_edge.runtime.triton_config import Batching

    assert Batching(16, (4, 16), 100).config() == {
        "max_batch_size": 16,
        "dynamic_batching": {"preferred_batch_size": [4, 16], "max_queue_delay_microseconds": 100},
    }
    assert Batching().config()["dynamic_batching"]["preferred_batch_size"] is None


# --- names only from their registries --------------------------------------------------------

REGISTRY = "surgery_edge/surgery/methods.py"
METHOD_NAMES = {"surgery", "surgeryv2"}
ENGINE_NAMES = {
    "surgery-all-tasks",
    "surgeryv2-routed",
    "merged-routed",
    "merged-all-tasks",
    "single-expert",
}
# Where a name may be written out anyway, and why. (None today: user-facing text names the
# methods inside longer sentences, which this check does not read.)
NAME_ALLOWED: dict[tuple[str, str], str] = {}


def name_literals(sources: dict[str, Nodes]) -> list[tuple[str, int, str]]:
    """``(file, line, name)`` of each method or engine name written as a string.

    ``"surgery"`` is also a field of report rows and of the config (``row["surgery"]``,
    ``{"surgery": ...}``): as a subscript, a dict key or the key of ``get`` it is a field,
    not the method, and is not counted. ``"surgeryv2"`` and the engine names count anywhere.
    """
    found = []
    for file, nodes in sources.items():
        keys = set()
        for _, node in nodes:
            if isinstance(node, ast.Subscript):
                keys.add(id(node.slice))
            elif isinstance(node, ast.Dict):
                keys.update(id(k) for k in node.keys if k is not None)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get", "pop", "setdefault")
                and node.args
            ):
                keys.add(id(node.args[0]))
        for _, node in nodes:
            value = _constant(node)
            if value == "surgery" and id(node) in keys:
                continue
            if value in METHOD_NAMES | ENGINE_NAMES:
                found.append((file, node.lineno, value))
    return sorted(found)


def test_method_and_engine_names_come_from_the_registry(sources):
    stray = [
        f"{file}:{line} {name!r}"
        for file, line, name in name_literals(sources)
        if file != REGISTRY and (file, name) not in NAME_ALLOWED
    ]
    assert stray == [], "use surgery.methods (SURGERY, SURGERY_V2, engine_name, method_engines)"


def test_the_name_check_finds_a_name_and_skips_a_field():
    tree = ast.parse('x = row["surgery"]\ny = {"surgery": 1}\nz = "surgeryv2-routed"\n')
    assert name_literals({"x.py": flatten(tree)}) == [("x.py", 3, "surgeryv2-routed")]


def test_the_registry_names_each_method_s_engine():
    from surgery_edge.engine_format import EngineMode
    from surgery_edge.surgery.methods import SURGERY, SURGERY_V2, engine_name, method_engines

    assert method_engines() == {
        "surgery-all-tasks": (SURGERY, EngineMode.ALL_TASKS),
        "surgeryv2-routed": (SURGERY_V2, EngineMode.ROUTED),
    }
    assert engine_name(None, EngineMode.ROUTED) == "merged-routed"
    assert engine_name(SURGERY, EngineMode.ROUTED) == "surgery-routed"

"""The package's architecture: no import cycles, one-way layers, a runtime without torch.

The import graph is read from the source (``ast``), module-level imports, those inside
functions and those under ``if TYPE_CHECKING:`` alike: a type hint that points up a layer or
closes a circle ties the modules together as surely as an import that runs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the package's folders: kernels/ and cli/ install as surgery_edge.kernels / surgery_edge.cli
SOURCES = {
    "surgery_edge": ROOT / "surgery_edge",
    "surgery_edge.kernels": ROOT / "kernels",
    "surgery_edge.cli": ROOT / "cli",
}

# Which top-level parts of the package each part may import (besides itself). Everything
# points down: the base, then the torch-free runtime, models and data, merging, kernels and
# surgery, evaluation and export, the benchmarks and runs, and the CLI on top. ``distributed``
# (torch.distributed: the ranks of a torchrun job) sits beside ``device`` under the parts that
# learn: merging (AdaMerging), surgery (targets, training), runs and the CLI.
BASE = {
    "__init__",
    "errors",
    "io",
    "progress",
    "engine_format",
    "engine_digest",
    "engine_preprocessing",
}
ALLOWED = {
    **{m: BASE for m in BASE},
    "device": BASE,
    # the ranks of a torchrun job; the learning parts (AdaMerging, surgery) split their work
    "distributed": BASE,
    "runtime": BASE,
    "models": BASE,
    "data": BASE | {"runtime", "models"},
    "merging": BASE | {"distributed"},
    "kernels": BASE,  # the adapter's formula is kernels/reference.py: surgery builds on it
    "surgery": BASE | {"models", "data", "kernels", "runtime", "distributed"},
    # engine accuracy is measured through the runtime (what a user deploys is what is measured)
    "evaluation": BASE | {"runtime", "models", "data", "surgery"},
    "export": BASE | {"runtime", "models", "data", "surgery"},
    # bench.quantize measures a finished run's own engines: it reads the run through run/
    "bench": BASE
    | {"runtime", "models", "data", "surgery", "kernels", "export", "evaluation", "run"},
    "run": BASE
    | {
        "device",
        "distributed",
        "runtime",
        "models",
        "data",
        "merging",
        "surgery",
        "evaluation",
        "export",
    },
    # cli -> export: `triton-repo` turns an existing engine file into a Triton repository
    "cli": BASE
    | {"run", "runtime", "models", "data", "surgery", "merging", "evaluation", "bench", "export"}
    | {"distributed"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "surgery_edge" and parts[:1] in (["kernels"], ["cli"]):
                continue
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports (resolved to the longest existing module)."""

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(filter(None, (resolve(a.name) for a in child.names)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                for alias in child.names:
                    found.add(resolve(f"{base}.{alias.name}") or "")
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard("")
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_graph_is_read_from_every_module(graph):
    assert len(graph) > 50
    assert "surgery_edge.engine_format" in graph["surgery_edge.runtime.backends"]
    assert "surgery_edge.kernels.reference" in graph["surgery_edge.kernels.surgery_correction"]
    # function-local imports count too: the CLI imports the pipeline inside its commands
    assert "surgery_edge.run.pipeline" in graph["surgery_edge.cli.pipeline"]
    # and those for type hints only (`if TYPE_CHECKING:`)
    assert "surgery_edge.models.archs" in graph["surgery_edge.surgery.methods"]


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles(graph):
    assert _cycles(graph) == []


def test_the_pipeline_is_the_top_of_the_runs(graph):
    """The stages and the benchmarks take the run's state from run/state.py; only the CLI calls
    the whole flow (run/pipeline.py)."""
    importers = sorted(m for m, targets in graph.items() if "surgery_edge.run.pipeline" in targets)
    assert importers == ["surgery_edge.cli.pipeline"]


def test_layers_point_one_way(graph):
    def part(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "__init__"

    wrong = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if part(t) != part(m) and part(t) not in ALLOWED[part(m)]
    )
    assert wrong == []


def test_the_runtime_serves_an_onnx_engine_without_torch(engines, tmp_path):
    """A serving process needs numpy, pillow and onnxruntime: torch cannot even be imported."""
    from PIL import Image

    image = tmp_path / "square.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        from surgery_edge import runtime
        routed = runtime.load({str(engines["dir"] / "surgeryv2-routed.onnx")!r}, device="cpu")
        every = runtime.load({str(engines["dir"] / "surgery-all-tasks.onnx")!r}, device="cpu")
        (a,) = routed.predict({str(image)!r}, task="shapes")
        (b,) = every.predict({str(image)!r}, all_tasks=True)
        assert a.ok and b.ok and [p.task for p in b.predictions] == routed.tasks
        heavy = ("torch", "triton", "onnx")
        loaded = sorted(m for m, v in sys.modules.items() if v and m.split(".")[0] in heavy)
        print(a["shapes"].label, len(b.predictions), loaded)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    label, count, loaded = done.stdout.split(maxsplit=2)
    assert label in routed_shapes(engines) and int(count) == 3
    assert loaded.strip() == "[]"  # neither torch nor triton nor the onnx package


def routed_shapes(engines) -> list[str]:
    from surgery_edge.engine_format import read_onnx_metadata

    meta = read_onnx_metadata(engines["dir"] / "surgeryv2-routed.onnx")
    return list(meta.class_names[meta.tasks.index("shapes")])

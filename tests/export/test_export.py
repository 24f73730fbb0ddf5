"""Export: ONNX and AOTInductor parity with PyTorch, one backbone, metadata, TensorRT's pure parts.

Everything runs on the tiny run (micro-vit-16, three tasks). The ONNX engines come from the demo
hook (``export_and_check``), made once per session (``engines`` in conftest.py); the one
AOTInductor compile (the slow part) is made once, through ``surgery-edge export --aoti``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from cli_checks import user_error
from surgery_edge.cli.app import app
from typer.testing import CliRunner

from surgery_edge.engine_format import EngineMode, Precision
from surgery_edge.errors import ConfigError, ExportError

runner = CliRunner()
MERGE = "task_arithmetic"


@pytest.fixture(scope="session")
def models(run):
    return {m: run.layout.export_model(MERGE, m) for m in ("surgery", "surgeryv2")}


@pytest.fixture(scope="session")
def split(run):
    from surgery_edge.run.engines import suite_test_split

    return suite_test_split(run.suite, run.tasks)


@pytest.fixture(scope="session")
def pt2(tiny_run, tmp_path_factory):
    """SurgeryV2, routed, fp32, compiled by AOTInductor through the CLI (once: ~30 s on CPU)."""
    path = tmp_path_factory.mktemp("aoti") / "v2.pt2"
    args = ["export", "--run", str(tiny_run[0]), "--surgery", "surgeryv2", "--aoti", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"pt2: {path}" in result.stdout
    return path


@pytest.mark.parametrize("command", ["export", "predict"])
def test_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


# --- the demo hook and parity -----------------------------------------------------------------


def test_demo_hook_reports_sizes_and_parity(engines, run):
    report = engines["report"]
    json.dumps(report)  # JSON-able
    assert report["tasks"] == run.tasks and report["test_images"] == 48
    v1, v2 = report["engines"]["surgery-all-tasks"], report["engines"]["surgeryv2-routed"]
    assert (v1["mode"], v2["mode"]) == ("all-tasks", "routed")
    assert v1["onnx"]["parity"]["rows"] == 3 * 48  # every image for every task
    for entry in (v1["onnx"], v2["onnx"]):
        assert entry["parity"]["max_abs_diff"] <= 1e-4
        assert entry["parity"]["argmax_agreement"] == 100.0
    assert v2["onnx-fp16"]["parity"]["argmax_agreement"] >= 99.5
    assert v2["onnx-fp16"]["bytes"] < 0.7 * v2["onnx"]["bytes"]
    assert "pt2" not in v1  # only the routed V2 engine is compiled as a .pt2
    assert v2["pt2"]["parity"]["max_abs_diff"] <= 1e-4
    assert v2["pt2"]["parity"]["argmax_agreement"] == 100.0
    files = ("single-expert.onnx", "surgery-all-tasks.onnx", "surgeryv2-routed-fp16.onnx")
    for name in (*files, "surgeryv2-routed.pt2"):
        assert (engines["dir"] / name).is_file()


@pytest.mark.parametrize("batch_size", [1, 37])
def test_onnx_matches_pytorch(engines, models, split, batch_size):
    from surgery_edge.export import check_forward

    images, task_ids, _ = split
    d, v2, v1 = engines["dir"], models["surgeryv2"][0], models["surgery"][0]
    routed = check_forward(v2, d / "surgeryv2-routed.onnx", images, task_ids, batch_size)
    all_tasks = check_forward(v1, d / "surgery-all-tasks.onnx", images, None, batch_size)
    for parity in (routed, all_tasks):
        assert parity.max_abs_diff <= 1e-4 and parity.argmax_agreement == 100.0
    fp16 = check_forward(v2, d / "surgeryv2-routed-fp16.onnx", images, task_ids, batch_size)
    assert fp16.argmax_agreement >= 99.5
    assert fp16.max_abs_diff <= 0.05  # half precision at |logit| ~ 20: ~1e-3 relative


def _weights(path) -> dict[str, int]:
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}


def test_one_copy_of_the_backbone(engines, models):
    """The engine holds the backbone once: beyond a single expert's file it adds only the
    adapters and the other tasks' heads."""
    d = engines["dir"]
    single = (d / "single-expert.onnx").stat().st_size
    v1 = (d / "surgery-all-tasks.onnx").stat().st_size
    assert v1 <= 1.1 * single, (v1, single)
    for method, name in (("surgery", "surgery-all-tasks"), ("surgeryv2", "surgeryv2-routed")):
        model = models[method][0]
        adapters = sum(p.numel() * 4 for p in model.bank.parameters())
        other_heads = (model.num_tasks - 1) * model.head_weight[0].numel() * 4
        extra = sum(_weights(d / f"{name}.onnx").values()) - sum(
            _weights(d / "single-expert.onnx").values()
        )
        assert abs(extra - adapters - other_heads) <= 2048, (extra, adapters, other_heads)
        size = (d / f"{name}.onnx").stat().st_size
        assert size <= 1.1 * (single + adapters + other_heads), (size, single)


def test_onnx_file_is_valid_with_metadata(engines, run):
    from surgery_edge import __version__
    from surgery_edge.engine_format import read_onnx_metadata
    from surgery_edge.models.checkpoint import load_tensors

    path = engines["dir"] / "surgeryv2-routed.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    meta = read_onnx_metadata(path)
    assert meta["tasks"] == run.tasks == ["digits", "shapes", "colours"]
    assert meta["class_names"] == [run.suite.task(t).class_names for t in run.tasks]
    assert meta["preprocessing"]["image_size"] == 16
    assert meta["preprocessing"]["mean"] == list(run.arch.mean)
    assert meta["preprocessing"]["std"] == list(run.arch.std)
    assert meta["architecture"] == run.arch.to_dict()
    assert (meta["method"], meta["rank"], meta["mode"]) == ("surgeryv2", 4, "routed")
    assert (meta["precision"], meta["package_version"]) == ("fp32", __version__)
    recipe = load_tensors(run.out / "merged" / f"{MERGE}.safetensors")[1]["recipe"]
    assert meta["merge_recipe"] == recipe and meta["merge"] == MERGE
    assert meta["exporter"] == "torch.onnx (dynamo)" and meta["opset"] >= 18

    def dims(value):
        t = value.type.tensor_type
        return t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    ins = {i.name: dims(i) for i in model.graph.input}
    outs = {o.name: dims(o) for o in model.graph.output}
    assert ins == {
        "images": (onnx.TensorProto.FLOAT, ["batch", 3, 16, 16]),
        "task_ids": (onnx.TensorProto.INT64, ["batch"]),
    }
    assert outs == {
        "logits": (onnx.TensorProto.FLOAT, ["batch", 10]),
        "probs": (onnx.TensorProto.FLOAT, ["batch", 10]),
    }
    all_tasks = onnx.load(str(engines["dir"] / "surgery-all-tasks.onnx"))
    assert [o.name for o in all_tasks.graph.output] == [f"logits_{t}" for t in run.tasks]
    counts = [o.type.tensor_type.shape.dim[1].dim_value for o in all_tasks.graph.output]
    assert counts == [10, 6, 8]


def test_routed_graph_gathers_instead_of_looping(engines, models):
    """Task ids only index the stacked (T, ...) adapter and head tensors: no loop over tasks."""
    model = onnx.load(str(engines["dir"] / "surgeryv2-routed.onnx"))
    assert not {n.op_type for n in model.graph.node} & {"If", "Loop", "Scan"}
    weights = {t.name for t in model.graph.initializer}
    gathers, frontier = [], ["task_ids"]
    while frontier:
        name = frontier.pop()
        for node in (n for n in model.graph.node if name in n.input):
            if node.op_type in ("Unsqueeze", "Reshape", "Cast"):  # shaping the indices
                frontier.extend(node.output)
            else:
                gathers.append(node)
    assert {n.op_type for n in gathers} <= {"Gather", "GatherND"}, gathers
    assert all(n.input[0] in weights for n in gathers)
    sites = len(models["surgeryv2"][0].bank.sites)
    assert len(gathers) == 2 * sites + 2  # down and up per site, head weight and bias


def test_fp16_engine_holds_half_weights_and_float32_io(engines):
    model = onnx.load(str(engines["dir"] / "surgeryv2-routed-fp16.onnx"))
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 64]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    io = list(model.graph.input) + list(model.graph.output)
    elem = {v.name: v.type.tensor_type.elem_type for v in io}
    assert elem == {
        "images": onnx.TensorProto.FLOAT,
        "task_ids": onnx.TensorProto.INT64,
        "logits": onnx.TensorProto.FLOAT,
        "probs": onnx.TensorProto.FLOAT,
    }


def test_all_tasks_surgeryv2_with_external_data(models, split, tmp_path, monkeypatch):
    """V2 all-tasks expands the batch to T x B rows inside the graph (a regression test for
    torch.onnx mis-exporting repeat_interleave), here with weights in a ``.data`` file."""
    import surgery_edge.export.onnx as onnx_export
    from surgery_edge.export import check_forward, export_onnx

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    model, extra = models["surgeryv2"]
    path = export_onnx(model, tmp_path / "v2-all.onnx", "all-tasks", metadata=extra)
    assert (tmp_path / "v2-all.onnx.data").stat().st_size > 100_000
    assert path.stat().st_size < 50_000
    images, _, _ = split
    for batch_size in (1, 37):
        parity = check_forward(model, path, images, None, batch_size)
        assert parity.max_abs_diff <= 1e-4 and parity.argmax_agreement == 100.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2-all.onnx", "v2-all.onnx.data"]


def test_torchscript_fallback(models, split, tmp_path, monkeypatch):
    import surgery_edge.export.onnx as onnx_export
    from surgery_edge.engine_format import read_onnx_metadata
    from surgery_edge.export import check_forward, export_onnx

    def fail(*args, **kwargs):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(onnx_export, "_trace_dynamo", fail)
    model, extra = models["surgeryv2"]
    with pytest.warns(UserWarning, match="exporter broke"):
        path = export_onnx(model, tmp_path / "ts.onnx", "routed", metadata=extra)
    assert read_onnx_metadata(path)["exporter"] == "torch.onnx (torchscript)"
    images, task_ids, _ = split
    parity = check_forward(model, path, images, task_ids, 37)
    assert parity.max_abs_diff <= 1e-4 and parity.argmax_agreement == 100.0


def test_failed_check_writes_nothing(models, tmp_path, monkeypatch):
    """An engine that disagrees with PyTorch never replaces the file at ``path``."""
    import surgery_edge.export.onnx as onnx_export
    import surgery_edge.export.parity as parity_mod
    from surgery_edge.export import Parity, export_onnx

    def fail(*args, **kwargs):
        raise RuntimeError("use the fast exporter")

    monkeypatch.setattr(onnx_export, "_trace_dynamo", fail)
    monkeypatch.setattr(parity_mod, "check_forward", lambda *a, **k: Parity(3, 1.0, 0.0, 1.0))
    path = tmp_path / "engine.onnx"
    path.write_bytes(b"previous engine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ExportError, match="disagrees with PyTorch"):
            export_onnx(models["surgery"][0], path)
    assert path.read_bytes() == b"previous engine"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.onnx"]


def test_bad_export_options(models, tmp_path):
    from surgery_edge.export import export_aoti, export_onnx

    model = models["surgery"][0]
    with pytest.raises(ExportError, match="routed"):
        export_onnx(model, tmp_path / "x.onnx", mode="every-task")
    with pytest.raises(ExportError, match="opset 12"):
        export_onnx(model, tmp_path / "x.onnx", opset=12)
    with pytest.raises(ExportError, match=r"\.pt2"):
        export_aoti(model, tmp_path / "x.so")
    assert not list(tmp_path.iterdir())


def test_cli_export_bad_input(tiny_run, tmp_path):
    out = str(tiny_run[0])
    onnx = ["--onnx", str(tmp_path / "a")]
    msg = user_error(["export", "--run", out, "--surgery", "surgeryv3", *onnx])
    assert "surgeryv3" in msg and "surgeryv2" in msg
    onnx = ["--onnx", str(tmp_path / "b.onnx")]
    msg = user_error(["export", "--run", out, "--merge", "nope", *onnx])
    assert "nope" in msg and "task_arithmetic" in msg
    msg = user_error(["export", "--run", out, "--mode", "sideways"])
    assert "sideways" in msg and "all-tasks" in msg
    assert not list(tmp_path.iterdir())


# --- magnitude checks: finite garbage is not exported --------------------------------------


def test_trained_weights_pass_the_magnitude_checks(models):
    """The bound leaves room: trained adapters and heads stay far inside it, in fp16 too."""
    from surgery_edge.export.modules import MAGNITUDE_FACTOR, check_magnitudes

    for model, _ in models.values():
        check_magnitudes(model, half=True)
        backbone = max(float(p.detach().abs().max()) for p in model.encoder.parameters())
        adapters = max(float(p.detach().abs().max()) for p in model.bank.parameters())
        heads = max(
            float(model.head_weight[t, :c].abs().max()) for t, c in enumerate(model.class_counts)
        )
        assert max(adapters, heads) < MAGNITUDE_FACTOR * backbone / 50


def test_finite_garbage_is_named_by_file_and_tensor(models):
    import copy

    from surgery_edge.export.modules import WeightFiles, check_magnitudes

    files = WeightFiles("merged.safetensors", "adapters.safetensors", ["d.st", "s.st", "c.st"])
    model = copy.deepcopy(models["surgeryv2"][0])
    with torch.no_grad():
        model.bank.weights("block.1")[1][2] *= 1e30  # colours' up projection of block 1
    with pytest.raises(ExportError, match=r"adapters.safetensors: tensor colours/block.1/up holds"):
        check_magnitudes(model, files=files)
    model = copy.deepcopy(models["surgery"][0])
    with torch.no_grad():
        model.head_bias[1, 0] = 3e6  # shapes' head: finite, far beyond any trained head
    with pytest.raises(ExportError, match=r"s.st: tensor bias holds values up to 3e\+06"):
        check_magnitudes(model, files=files)
    model = copy.deepcopy(models["surgery"][0])
    with torch.no_grad():  # a backbone weight fp16 cannot hold: fine at fp32, not at fp16
        model.encoder.visual.proj[0, 0] = 1e5
    check_magnitudes(model, files=files)
    with pytest.raises(
        ExportError, match=r"merged.safetensors: tensor visual.proj .*beyond what fp16"
    ):
        check_magnitudes(model, half=True, files=files)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cli_export_refuses_adapters_scaled_by_1e30(tiny_run, tmp_path, precision):
    import shutil

    from surgery_edge.models.checkpoint import load_tensors, save_tensors
    from surgery_edge.run.layout import RunLayout

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir, ignore=shutil.ignore_patterns("engines", "*.png"))
    adapters = run_dir / "adapters" / MERGE / "surgeryv2.safetensors"
    tensors, meta = load_tensors(adapters)
    meta.pop("format_version")
    save_tensors(adapters, {k: v * 1e30 for k, v in tensors.items()}, meta)
    layout = RunLayout.open(run_dir)  # recorded as the run's own: as if training had made them
    layout.checksums.record(adapters, layout.hashes)
    out = tmp_path / "x.onnx"
    args = ["export", "--run", str(run_dir), "--onnx", str(out), "--precision", precision]
    msg = " ".join(user_error(args).split())
    assert f"{adapters}: tensor digits/block.0/down holds values up to" in msg
    assert "no engine was exported" in msg and not out.exists()


# --- AOTInductor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 37])
def test_pt2_matches_pytorch(pt2, models, split, batch_size):
    from surgery_edge.export import check_forward

    images, task_ids, _ = split
    parity = check_forward(models["surgeryv2"][0], pt2, images, task_ids, batch_size)
    assert parity.max_abs_diff <= 1e-4 and parity.argmax_agreement == 100.0


def test_pt2_loads_without_project_code(pt2):
    code = (
        "import json, sys, torch\n"
        f"m = torch._inductor.aoti_load_package({str(pt2)!r})\n"
        "meta = json.loads(m.get_metadata()['surgery_edge'])\n"
        "logits, probs = m(torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1]))\n"
        "assert logits.shape == (5, 10) and torch.isinf(logits[1, 6:]).all()\n"
        "assert torch.allclose(probs.sum(-1), torch.ones(5))\n"
        "assert not [k for k in sys.modules if k.startswith('surgery_edge')]\n"
        "print(meta['mode'], meta['method'], meta['format'], meta['device'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["routed", "surgeryv2", "pt2", "cpu"]


# --- TensorRT: the parts that need no TensorRT -------------------------------------------------


def test_profile_shapes():
    from surgery_edge.export import profile_shapes

    shapes = profile_shapes(16, EngineMode.ROUTED, 1, 8, 32)
    assert shapes == {
        "images": ((1, 3, 16, 16), (8, 3, 16, 16), (32, 3, 16, 16)),
        "task_ids": ((1,), (8,), (32,)),
    }
    assert set(profile_shapes(224, EngineMode.ALL_TASKS, 4, 4, 4)) == {"images"}
    for args, match in [
        ((0, 8, 32), "--min-batch must be at least 1"),
        ((1, 8, -2), "--max-batch must be at least 1"),
        ((4, 2, 32), "min <= opt <= max"),
        ((1, 64, 32), "--opt-batch 64, --max-batch 32"),
        ((1, 2.5, 32), "--opt-batch must be an integer"),
    ]:
        with pytest.raises(ConfigError, match=match):
            profile_shapes(16, EngineMode.ROUTED, *args)


def test_builder_input_checks_the_onnx(engines, tmp_path):
    from surgery_edge.export import builder_input
    from surgery_edge.export.onnx import write_engine

    good = engines["dir"] / "surgeryv2-routed.onnx"
    meta = builder_input(good)
    assert meta["mode"] == "routed" and meta["inputs"] == ["images", "task_ids"]

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ExportError, match="truncated.onnx"):
        builder_input(truncated)

    model = onnx.load(str(good))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    with pytest.raises(ExportError, match="no surgery-edge engine metadata"):
        builder_input(tmp_path / "foreign.onnx")

    model = onnx.load(str(good))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 4  # a fixed batch
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    with pytest.raises(ExportError, match="changed or corrupted after export"):
        builder_input(tmp_path / "fixed.onnx")  # a changed ONNX is not built into an engine
    write_engine(model, tmp_path / "fixed.onnx")  # sealed as if it had been exported so
    with pytest.raises(ExportError, match="fixed batch size"):
        builder_input(tmp_path / "fixed.onnx")

    model = onnx.load(str(good))
    model.graph.node[0].input[0] = "nowhere"  # a dangling input fails the checker
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(ExportError, match="not a valid ONNX model"):
        builder_input(tmp_path / "broken.onnx")


def test_build_engine_without_tensorrt(engines, tmp_path, monkeypatch):
    from surgery_edge.export import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    engine = tmp_path / "v2.engine"
    with pytest.raises(ExportError, match=r"pip install 'surgery-edge\[trt\]'"):
        build_engine(engines["dir"] / "surgeryv2-routed.onnx", engine, timing_cache=tmp_path / "c")
    with pytest.raises(ConfigError, match="--opt-batch"):  # flags are checked first
        build_engine(engines["dir"] / "surgeryv2-routed.onnx", engine, opt_batch=0)
    with pytest.raises(ConfigError, match="--workspace-gb"):
        build_engine(engines["dir"] / "surgeryv2-routed.onnx", engine, workspace_gb=0)
    assert not list(tmp_path.iterdir())  # never a fake engine, sidecar or cache


def test_cli_trt_fails_fast_without_tensorrt(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    base = ["export", "--run", str(tiny_run[0]), "--trt", str(tmp_path / "m.engine")]
    msg = user_error(base)
    # The CLI prints messages as rich markup, which drops "[trt]"; the library test above
    # checks the exact install command.
    assert "pip install 'surgery-edge" in msg and "tensorrt" in msg and "NVIDIA GPU" in msg
    msg = user_error([*base, "--min-batch", "8", "--opt-batch", "4"])
    assert "min <= opt <= max" in msg
    assert not list(tmp_path.iterdir())  # failed before exporting anything


def _has_tensorrt_and_gpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_tensorrt_and_gpu(), reason="needs tensorrt and a CUDA GPU")
def test_tensorrt_engine_matches_pytorch(engines, models, split, tmp_path):
    from surgery_edge.export import build_engine, check_forward
    from surgery_edge.runtime import load

    model = models["surgeryv2"][0]
    images, task_ids, _ = split
    onnx_path = engines["dir"] / "surgeryv2-routed.onnx"
    for precision in (Precision.FP32, Precision.FP16):
        fp16 = precision is Precision.FP16
        engine = build_engine(
            onnx_path,
            tmp_path / f"v2-{fp16}.engine",
            precision,
            max_batch=64,
            timing_cache=tmp_path / "timing.cache",
        )
        predictor = load(engine)
        assert predictor.kind == "tensorrt" and predictor.meta["tensorrt"]["max_batch"] == 64
        parity = check_forward(model, predictor, images, task_ids, 37)
        if fp16:
            assert parity.argmax_agreement >= 99.5
        else:
            assert parity.max_abs_diff <= 1e-3 and parity.argmax_agreement == 100.0
    assert (tmp_path / "timing.cache").stat().st_size > 0


def test_info_reads_a_pt2_without_loading_it(pt2):
    """`info` reads the metadata compiled into the package (a zip) without torch."""
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from surgery_edge.runtime.describe import describe_engine\n"
        f"print(json.dumps(describe_engine({str(pt2)!r}).to_dict()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["kind"], data["mode"], data["method"]) == ("pt2", "routed", "surgeryv2")
    assert [i["name"] for i in data["inputs"]] == ["images", "task_ids"]
    assert data["io_source"] == "metadata" and data["metadata"]["device"] == "cpu"

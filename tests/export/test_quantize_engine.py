"""Quantising an engine, and the fp16 and int8 export paths, on small engines built in
milliseconds (``tests/engine_graphs.py``): the quantisers, the gate before publishing, the
record in the metadata and what is (not) written, without the tiny run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from engine_graphs import build_engine
from onnx import TensorProto, numpy_helper

import surgery_edge.export.quantize as q
from surgery_edge.engine_format import Precision, read_onnx_metadata
from surgery_edge.errors import ConfigError, ExportError
from surgery_edge.runtime import Predictor, load
from surgery_edge.runtime.backends import OnnxBackend

TASKS = ["digits", "shapes", "colours"]
CLASSES = [3, 5, 2]


def _calibration(per_task: int = 20, seed: int = 0) -> q.Calibration:
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(3), per_task)
    images = rng.normal(size=(3 * per_task, 3, 8, 8)).astype(np.float32)
    check = rng.normal(size=(3 * per_task, 3, 8, 8)).astype(np.float32)
    return q.Calibration(images, ids, check, ids.copy(), {"split": "adapt", "per_task": per_task})


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """{mode: the path of an fp32 engine}."""
    folder = tmp_path_factory.mktemp("fp32")
    for mode in ("routed", "all-tasks"):
        build_engine(folder / f"{mode}.onnx", mode)
    return {mode: folder / f"{mode}.onnx" for mode in ("routed", "all-tasks")}


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _assert_answers_as(path: Path, reference: Path, atol: float) -> None:
    x = _calibration(seed=9).check_images
    ids = np.tile(np.arange(3), len(x) // 3)
    got = load(path).routed_logits(x, ids)
    want = load(reference).routed_logits(x, ids)
    finite = np.isfinite(want)
    assert (np.isfinite(got) == finite).all()
    np.testing.assert_allclose(got[finite], want[finite], atol=atol)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("mode", ["routed", "all-tasks"])
def test_an_int8_engine_answers_as_fp32_and_records_how_it_was_made(fp32, mode, tmp_path):
    recipe, calibration = q.default_recipe(Precision.INT8, "onnxruntime"), _calibration()
    out = q.quantize_engine(fp32[mode], tmp_path / "int8.onnx", recipe, calibration)
    assert out == tmp_path / "int8.onnx" and sorted(tmp_path.iterdir()) == [out]
    _assert_answers_as(out, fp32[mode], atol=0.75)
    meta, source = read_onnx_metadata(out), read_onnx_metadata(fp32[mode])
    assert str(meta.precision) == "int8" and meta.mode == source.mode
    assert meta.tasks == source.tasks and meta.class_names == source.class_names
    record = meta["quantization"]
    tables = 1 if mode == "routed" else 3  # products with the gathered tables
    assert record["recipe"] == recipe.to_dict() and record["target"] == "onnxruntime"
    assert record["tool"] == "onnxruntime.quantization.quantize_dynamic"
    assert record["tool_version"] == onnxruntime.__version__
    # ONNX Runtime's integer MatMul needs a constant 2-D weight: the table products stay float
    assert record["kept_in_higher_precision"] == {"adapters": tables, "heads": tables}
    assert record["node_groups"] == {
        "patch_embedding": 1,
        "linear": 1,
        "attention": 0,
        "adapters": tables,
        "heads": tables,
        "layernorm": 1,
        "softmax": 1 if mode == "routed" else 0,
    }
    assert record["quantized_nodes"]["MatMulInteger"] == 1
    assert record["quantized_nodes"]["ConvInteger"] == 1
    assert record["tables"]["stored"] == ["adapter_table", "head_table"]
    assert record["tables"]["storage"] == "int8" and record["tables"]["bytes_saved"] > 300
    assert record["calibration"] == {
        "split": "adapt",
        "per_task": 20,
        "images": 60,
        "check_images": 60,
    }
    check = record["check"]
    assert check["images"] == 60 and check["agreement_avg"] >= 99.0
    # no disagreement among 20 images bounds the rate by 1 - 0.05 ** (1 / 20), 13.9%
    bound = round(100 * (1 - 0.05 ** (1 / 20)), 3)
    assert [e["disagreement_upper_95"] for e in check["per_task"].values()] == [bound] * 3
    assert record["recipe"]["calibration_method"] == "none"  # ort-dynamic does not calibrate
    assert check["floor"] == {"average": 99.0, "per_task": 98.0}
    assert set(check["per_task"]) == set(TASKS) and check["worst_task"] in TASKS
    assert meta["opset"] == 18 and record["seconds"] >= 0
    proto = onnx.load(str(out))
    assert proto.producer_name == "surgery-edge" and "int8" in proto.doc_string
    stored = _initializers(out)
    assert stored["head_table.int8"].dtype == np.int8 and "head_table" not in stored
    assert read_onnx_metadata(fp32[mode]).precision.value == "fp32"  # the source is unchanged


def test_the_quantisers_keep_the_node_groups_the_recipe_names(fp32, tmp_path):
    calibration = _calibration()
    kept = q.QuantRecipe("int8", "ort-dynamic", keep=("linear",), calibration_method="none")
    out = q.quantize_engine(fp32["routed"], tmp_path / "a.onnx", kept, calibration)
    record = read_onnx_metadata(out)["quantization"]
    assert record["kept_in_higher_precision"] == {"linear": 1, "adapters": 1, "heads": 1}
    assert "MatMulInteger" not in record["quantized_nodes"]
    assert record["quantized_nodes"]["ConvInteger"] == 1
    # per channel: one weight scale per output channel of the linear layer
    channel = q.QuantRecipe("int8", "ort-dynamic", per_channel=True, calibration_method="none")
    out = q.quantize_engine(fp32["routed"], tmp_path / "b.onnx", channel, calibration)
    scales = [a for n, a in _initializers(out).items() if n.startswith("linear.w") and "scale" in n]
    assert [a.shape for a in scales] == [(6,)]
    tables = q.QuantRecipe("int8", "ort-dynamic", tables="fp16", calibration_method="none")
    out = q.quantize_engine(fp32["routed"], tmp_path / "c.onnx", tables, calibration)
    assert _initializers(out)["head_table.fp16"].dtype == np.float16
    _assert_answers_as(out, fp32["routed"], atol=0.75)
    tables = q.QuantRecipe("int8", "ort-dynamic", tables="fp32", calibration_method="none")
    out = q.quantize_engine(fp32["routed"], tmp_path / "d.onnx", tables, calibration)
    assert _initializers(out)["head_table"].dtype == np.float32
    assert read_onnx_metadata(out)["quantization"]["tables"] == {
        "storage": "fp32",
        "stored": [],
        "bytes_saved": 0,
    }


def test_an_engine_without_adapters_is_quantised(tmp_path):
    """A plain merge's engine records head tables only."""
    build_engine(
        tmp_path / "plain.onnx", "routed", extra={"task_tables": {"heads": ["head_table"]}}
    )
    recipe = q.default_recipe(Precision.INT8, "onnxruntime")
    out = q.quantize_engine(tmp_path / "plain.onnx", tmp_path / "q.onnx", recipe, _calibration())
    assert read_onnx_metadata(out)["quantization"]["tables"]["stored"] == ["head_table"]


def test_a_gemm_layer_is_quantised_like_a_matmul(tmp_path):
    build_engine(tmp_path / "gemm.onnx", "routed", linear_op="Gemm")
    recipe = q.default_recipe(Precision.INT8, "onnxruntime")
    out = q.quantize_engine(tmp_path / "gemm.onnx", tmp_path / "q.onnx", recipe, _calibration())
    record = read_onnx_metadata(out)["quantization"]
    assert record["node_groups"]["linear"] == 1 and record["quantized_nodes"]["MatMulInteger"] == 1
    _assert_answers_as(out, tmp_path / "gemm.onnx", atol=0.75)


def test_node_groups_see_weights_only_through_ops_that_do_not_compute():
    """A product with a weight seen through a Transpose is a layer; through an Add it is not."""
    from onnx import helper

    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], "t"),
        helper.make_node("MatMul", ["x", "wt"], ["a"], "through_transpose"),
        helper.make_node("Add", ["w", "x"], ["s"], "add"),
        helper.make_node("MatMul", ["s", "x"], ["b"], "through_add"),
        helper.make_node("Gemm", ["x", "w"], ["c"], "gemm"),
        helper.make_node("Einsum", ["x", "w"], ["d"], "einsum", equation="ij,jk->ik"),
        helper.make_node("Gather", ["table", "i"], ["g"], "gather"),
        helper.make_node("MatMul", ["x", "g"], ["e"], "head"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [])
    inits = [
        numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"),
        numpy_helper.from_array(np.ones((3, 2, 2), np.float32), "table"),
    ]
    graph = helper.make_graph(nodes, "g", [x, i], [], inits)
    groups = q.node_groups(helper.make_model(graph), {"heads": ["table"]})
    assert groups["linear"] == ["through_transpose", "gemm", "einsum"]
    assert groups["attention"] == ["through_add"] and groups["heads"] == ["head"]


def test_tables_absent_or_not_float_are_left_alone():
    from onnx import helper

    inits = [numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(1, 2, 3), "ids")]
    proto = helper.make_model(helper.make_graph([], "g", [], [], inits))
    assert q.store_tables(proto, ["absent", "ids"], "int8") == ([], 0)
    assert [t.name for t in proto.graph.initializer] == ["ids"] and not proto.graph.node


def test_a_static_int8_engine_is_calibrated_qdq_or_refused_by_name(fp32, tmp_path):
    recipe = q.QuantRecipe("int8", "ort-static", calibration_method="minmax")
    with pytest.raises(ConfigError, match="ort-static calibrates with"):
        bad = q.QuantRecipe("int8", "ort-static", calibration_method="max")
        q.quantize_engine(fp32["routed"], tmp_path / "x.onnx", bad, _calibration())
    percentile = q.QuantRecipe("int8", "ort-static", calibration_method="percentile")
    for method in (recipe, percentile):  # both are ONNX Runtime's calibration methods
        try:
            q.quantize_engine(fp32["routed"], tmp_path / "p.onnx", method, _calibration())
        except ExportError as e:
            assert "could not quantise" in str(e)
    for p in tmp_path.iterdir():
        p.unlink()
    try:
        out = q.quantize_engine(fp32["routed"], tmp_path / "s.onnx", recipe, _calibration())
    except ExportError as e:
        # once ModelOpt is imported (it patches onnxruntime.quantization), ONNX Runtime finds
        # no quantisation parameters for the images input: the benchmark records this refusal
        assert "ort-static could not quantise" in str(e) and "images" in str(e)
        assert list(tmp_path.iterdir()) == []
        return
    record = read_onnx_metadata(out)["quantization"]
    assert record["tool"] == "onnxruntime.quantization.quantize_static"
    assert record["quantized_nodes"]["QuantizeLinear"] >= 2
    zero_points = [a for n, a in _initializers(out).items() if n.endswith("zero_point")]
    assert zero_points and all(a.dtype == np.int8 for a in zero_points)  # int8 activations
    _assert_answers_as(out, fp32["routed"], atol=0.75)


def test_modelopt_gets_the_recipe_and_the_routed_calibration_feeds(fp32, tmp_path, monkeypatch):
    from modelopt.onnx import quantization

    calls, real = [], quantization.quantize

    def spy(path, **kwargs):
        calls.append({**kwargs, "nodes_to_exclude": list(kwargs["nodes_to_exclude"])})
        return real(path, **kwargs)  # (which appends to nodes_to_exclude)

    monkeypatch.setattr(quantization, "quantize", spy)
    recipe = q.QuantRecipe("int8", "modelopt", keep=("patch_embedding",), high_precision="fp16")
    calibration = _calibration(per_task=4)
    out = q.quantize_engine(fp32["routed"], tmp_path / "m.onnx", recipe, calibration, "tensorrt")
    (kwargs,) = calls
    assert kwargs["quantize_mode"] == "int8" and kwargs["high_precision_dtype"] == "fp16"
    assert kwargs["calibration_method"] == "entropy"
    assert kwargs["calibration_shapes"] == "images:12x3x8x8,task_ids:12"
    assert sorted(kwargs["calibration_data"]) == ["images", "task_ids"]
    np.testing.assert_array_equal(kwargs["calibration_data"]["task_ids"], calibration.task_ids)
    assert kwargs["nodes_to_exclude"] == ["^patch$"]
    record = read_onnx_metadata(out)["quantization"]
    assert record["tool"] == "nvidia-modelopt" and record["target"] == "tensorrt"
    assert record["kept_in_higher_precision"] == {"patch_embedding": 1}
    conv = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv")
    producers = {o: n.op_type for n in onnx.load(str(out)).graph.node for o in n.output}
    assert producers.get(conv.input[0]) != "DequantizeLinear"  # the kept Conv takes fp32 images


def test_a_failing_quantisation_is_refused_and_nothing_is_written(fp32, tmp_path, monkeypatch):
    recipe, calibration = q.default_recipe(Precision.INT8, "onnxruntime"), _calibration()
    store = q.store_tables

    def damaged(proto, names, storage):  # task 1's head rows: scales negated
        stored = store(proto, names, storage)
        scale = next(t for t in proto.graph.initializer if t.name == "head_table.scale")
        values = numpy_helper.to_array(scale).copy()
        values[6:12] *= -1.0  # rows of task 1 (HIDDEN = 6 per task)
        scale.CopyFrom(numpy_helper.from_array(values, scale.name))
        return stored

    monkeypatch.setattr(q, "store_tables", damaged)
    out = tmp_path / "never.onnx"
    with pytest.raises(q.GateError, match=r"on [0-9.]+% of task 'shapes''s 20 held-out") as e:
        q.quantize_engine(fp32["routed"], out, recipe, calibration)
    assert "It was not written" in str(e.value)
    assert e.value.check["worst_task"] == "shapes" and e.value.record["recipe"] == recipe.to_dict()
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # measured, not gated: written with its agreement
    q.quantize_engine(fp32["routed"], out, recipe, calibration, check=False)
    check = read_onnx_metadata(out)["quantization"]["check"]
    assert check["gated"] is False and check["per_task"]["shapes"]["agree"] < 19
    assert check["argmax_agreement"] < 90.0 and "floor" not in check


def test_what_cannot_be_quantised_is_named(fp32, tmp_path, monkeypatch):
    recipe, calibration = q.default_recipe(Precision.INT8, "onnxruntime"), _calibration()
    half = tmp_path / "half.onnx"
    build_engine(half, "routed", extra={"precision": "fp16"})
    with pytest.raises(ExportError, match=r"half\.onnx is a fp16 engine; quantise the fp32"):
        q.quantize_engine(half, tmp_path / "x.onnx", recipe, calibration)
    changed = tmp_path / "changed.onnx"
    changed.write_bytes(fp32["routed"].read_bytes().replace(b"linear-engine", b"linear-engins"))
    with pytest.raises(ExportError, match="differ"):
        q.quantize_engine(changed, tmp_path / "x.onnx", recipe, calibration)

    def broken(src, out, recipe, exclude, calib, mode):
        print("calibrating\n\n step 7 of 7")
        raise RuntimeError("no kernel for MatMulInteger")

    monkeypatch.setattr(q, "_run_ort", broken)
    with pytest.raises(ExportError) as e:
        q.quantize_engine(fp32["routed"], tmp_path / "x.onnx", recipe, calibration)
    assert f"ort-dynamic could not quantise {fp32['routed']} to int8" in str(e.value)
    assert "RuntimeError: no kernel for MatMulInteger; log: calibrating |  step 7 of 7" in str(
        e.value
    )
    for passed in (ConfigError("bad recipe"), ExportError("named already")):

        def refuse(*args, error=passed):
            raise error

        monkeypatch.setattr(q, "_run_ort", refuse)
        with pytest.raises(type(passed), match=f"^{passed}$"):
            q.quantize_engine(fp32["routed"], tmp_path / "x.onnx", recipe, calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed.onnx", "half.onnx"]


def test_an_engine_onnx_runtime_cannot_run_is_not_written(fp32, tmp_path, monkeypatch):
    def cannot(*args):
        raise RuntimeError("NOT_IMPLEMENTED: ConvInteger(10)\nmore detail")

    monkeypatch.setattr(q, "_verify", cannot)
    recipe = q.default_recipe(Precision.INT8, "onnxruntime")
    with pytest.raises(ExportError, match=r"cannot run the int8 engine that ort-dynamic made") as e:
        q.quantize_engine(fp32["routed"], tmp_path / "x.onnx", recipe, _calibration())
    assert "ConvInteger(10))" in str(e.value) and "more detail" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_check_engine_gates_at_the_engines_own_precision(fp32, tmp_path):
    half = tmp_path / "half.onnx"
    build_engine(half, "routed", extra={"precision": "fp16"})  # the fp32 weights: agrees
    check = q.check_engine(half, fp32["routed"], _calibration())
    assert check["floor"] == {"average": 99.9, "per_task": 99.5}
    assert check["agreement_avg"] == 100.0 and check["images"] == 60
    other = tmp_path / "other.onnx"
    build_engine(other, "routed", seed=1, extra={"precision": "fp16"})
    with pytest.raises(q.GateError, match="The fp16 engine agrees"):
        q.check_engine(other, fp32["routed"], _calibration())


def _fake_export(calls: list, half_seed: int = 0):
    """``export_onnx`` that builds a small engine (seed 0; its fp16 one of ``half_seed``)."""

    def export(model, path, mode, precision=Precision.FP32, metadata=None):
        fp16 = precision is Precision.FP16
        calls.append((Path(path).name, str(mode), fp16, model, metadata))
        extra = {"precision": "fp16"} if fp16 else {}
        build_engine(path, str(mode), seed=half_seed if fp16 else 0, extra=extra)
        return Path(path)

    return export


def test_an_fp16_engine_is_published_only_when_it_agrees_with_fp32(tmp_path, monkeypatch):
    calls, model, extra = [], object(), {"merge_recipe": {"method": "ta"}}
    monkeypatch.setattr(q, "export_onnx", _fake_export(calls))
    out = tmp_path / "engines" / "v2-fp16.onnx"
    path, check = q.export_half(model, out, "routed", _calibration(), metadata=extra)
    assert path == out and str(read_onnx_metadata(out).precision) == "fp16"
    assert check["agreement_avg"] == 100.0 and check["floor"]["average"] == 99.9
    assert [(c[0], c[1], c[2]) for c in calls] == [
        ("fp32.onnx", "routed", False),
        ("fp16.onnx", "routed", True),
    ]
    assert all(c[3] is model and c[4] == extra for c in calls)
    assert sorted(p.name for p in out.parent.iterdir()) == ["v2-fp16.onnx"]  # no fp32 kept
    # an fp32 engine given is the reference: no second fp32 export
    calls.clear()
    reference = tmp_path / "fp32.onnx"
    build_engine(reference, "all-tasks")
    q.export_half(model, tmp_path / "all-fp16.onnx", "all-tasks", _calibration(), fp32=reference)
    assert [c[2] for c in calls] == [True]
    # a disagreeing fp16 export is refused and not written
    monkeypatch.setattr(q, "export_onnx", _fake_export([], half_seed=1))
    with pytest.raises(q.GateError, match="fp16 engine agrees"):
        q.export_half(model, tmp_path / "bad.onnx", "routed", _calibration())
    assert not (tmp_path / "bad.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "all-fp16.onnx",
        "engines",
        "fp32.onnx",
    ]


def test_quantize_model_exports_fp32_quantises_and_keeps_only_the_result(tmp_path, monkeypatch):
    calls, extra = [], {"merge_recipe": {"method": "ties"}}
    monkeypatch.setattr(q, "export_onnx", _fake_export(calls))
    out = tmp_path / "deep" / "int8.onnx"
    recipe = q.default_recipe(Precision.INT8, "onnxruntime")
    path = q.quantize_model("model", out, "all-tasks", recipe, _calibration(), extra, "tensorrt")
    assert path == out and [(c[0], c[1], c[2], c[4]) for c in calls] == [
        ("fp32.onnx", "all-tasks", False, extra)
    ]
    meta = read_onnx_metadata(out)
    assert str(meta.precision) == "int8" and str(meta.mode) == "all-tasks"
    assert meta["quantization"]["target"] == "tensorrt"
    assert sorted(p.name for p in out.parent.iterdir()) == ["int8.onnx"]
    Predictor(OnnxBackend(out, device="cpu")).check_finite()
    again = out.with_name("again.onnx")  # into a folder that exists
    q.quantize_model("model", again, "routed", recipe, _calibration(), extra)
    assert sorted(p.name for p in out.parent.iterdir()) == ["again.onnx", "int8.onnx"]


def test_helpers_name_versions_and_keep_the_end_of_a_log():
    assert q._version("onnxruntime") == onnxruntime.__version__
    assert q._version("no-such-package-here") == "unknown"
    log = "\n".join(f"line {i}" for i in range(10)) + "\n\n   \n"
    assert q._tail(log) == " | ".join(f"line {i}" for i in range(4, 10))
    assert q._tail(log, 2) == "line 8 | line 9"
    assert q._tail("x" * 700) == "x" * 600
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in (("com.microsoft", 1), ("", 17))]
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []), opset_imports=opsets)
    assert q._opset(proto) == 17
    del proto.opset_import[1]
    assert q._opset(proto) == 0
    proto.opset_import.append(onnx.helper.make_opsetid("ai.onnx", 19))
    assert q._opset(proto) == 19
    with pytest.raises(ConfigError) as e:
        q.QuantRecipe("int8", "ort-dynamic", keep=("mlp", "linear"))
    assert str(e.value) == (
        "Unknown node groups ['mlp']; use some of: patch_embedding, linear, attention, adapters, "
        "heads, layernorm, softmax."
    )

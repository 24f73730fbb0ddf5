"""The serving benchmark: a short real run on loopback, with the tiny run's engines standing
in for the benchmark's (the figures are not checked, what they are made of is)."""

from __future__ import annotations

import json
import os
import statistics

import pytest

pytest.importorskip("pytriton")


@pytest.fixture(scope="module")
def bench_engines(engines, tmp_path_factory):
    """The layout the benchmark reads, made of the tiny run's engines: V1 and V2 as they are,
    the V2 engine as the "merged" one and the single expert as every task's expert."""
    from surgery_edge.engine_format import read_onnx_metadata

    root = tmp_path_factory.mktemp("bench-engines")
    source = engines["dir"]
    (root / "v1.onnx").symlink_to(source / "surgery-all-tasks.onnx")
    (root / "merged.onnx").symlink_to(source / "surgeryv2-routed.onnx")
    for task in read_onnx_metadata(source / "surgeryv2-routed.onnx").tasks:
        (root / f"expert-{task}.onnx").symlink_to(source / "single-expert.onnx")
    (root / "v2.onnx").symlink_to(source / "surgeryv2-routed.onnx")
    return root


def test_a_short_serving_benchmark(bench_engines, tmp_path):
    from surgery_edge.bench.serve import main

    out = tmp_path / "out"
    args = ["--engines", str(bench_engines), "--concurrency", "2", "--seconds", "0.4"]
    args += ["--repeats", "2", "--instances", "2"]
    record = main([*args, "--warmup-s", "0.2", "--arch", "micro-vit-16", "--out", str(out)])
    results = record["results"]
    points = {(r["workload"], r["config"], r["concurrency"]) for r in results}
    assert len(points) == len(results) == 3 + 3  # two workloads, six configurations
    for r in results:
        assert r["errors"] == 0 and r["requests"] > 0, r
        assert r["p50_ms"] <= r["p99_ms"]
        assert len(r["rates"]) == 2 and r["seconds"] == pytest.approx(0.8)
        assert r["requests_per_s"] == pytest.approx(statistics.median(r["rates"]), abs=0.1)
        assert sum(r["rates"]) * 0.4 == pytest.approx(r["requests"], abs=1)
        # the engine calls the counters saw hold every request of the loads, once each
        calls_per_request = 3 if (r["workload"], r["config"]) == ("all-tasks", "experts") else 1
        rows = sum(int(k) * v for k, v in r["batch_histogram"].items())
        assert r["histogram_requests"] > r["requests"], r  # the warm-ups are counted too
        assert rows == r["histogram_requests"] * calls_per_request, r
        assert r["server_rss_mb"] > r["models_rss_mb"] > 10
        # CPU time: the server's processes and the clients both worked, no more cores were
        # busy than the machine has, and the rate is what those cores did per request
        server_ms, client_ms = r["server_cpu_ms_per_request"], r["client_cpu_ms_per_request"]
        assert server_ms > 0 and client_ms > 0, r
        assert 0 < r["cores_busy"] <= 1.1 * os.cpu_count(), r
        assert r["requests_per_s"] == pytest.approx(
            r["cores_busy"] / (server_ms + client_ms) * 1e3, rel=0.5
        )
        assert 0 <= r["cores_stolen"] <= os.cpu_count(), r
    v1 = next(r for r in results if r["config"] == "v1")
    assert v1["answers_per_request"] == 3 and set(v1["task_mix"]) == {"all"}
    names = [t["target"].split(" ")[:2] for t in record["targets"]]
    assert len(names) == 5 and {t["concurrency"] for t in record["targets"]} == {2}, names
    by_config = {(r["workload"], r["config"]): r for r in results}
    v1_target = record["targets"][0]
    experts = by_config[("all-tasks", "experts")]

    def cpu(r):
        return r["server_cpu_ms_per_request"] + r["client_cpu_ms_per_request"]

    assert v1_target["cpu_ratio"] == pytest.approx(cpu(experts) / cpu(v1), abs=1e-3)
    assert v1_target["cores_busy"] == [v1["cores_busy"], experts["cores_busy"]]
    # the one-model baseline's serving efficiency: the served ratio over the engines' own
    one = by_config[("all-tasks", "experts-one-graph")]
    alone = record["engines_alone_cpu_ms"]
    eff = next(
        t for t in record["targets"] if "efficiency of v1 against experts-one" in t["target"]
    )
    engines_ratio = alone["all-tasks/experts-one-graph"]["median"] / alone["all-tasks/v1"]["median"]
    assert eff["ratio"] == pytest.approx(cpu(one) / cpu(v1) / engines_ratio, abs=2e-3)
    assert eff["ceiling"] == 1.0 and eff["above_ceiling"] == (eff["ratio"] > 1.01)
    for t in record["targets"]:  # every ratio carries its ceiling
        assert "above_ceiling" in t and t["ceilings"], t
    hops = {(b["workload"], b["config"]): b for b in record["breakdown"]}
    assert len(hops) == 6 and hops[("all-tasks", "v1")]["engine_alone_ms"] > 0
    stored = json.loads((out / "serve-micro-vit-16.json").read_text())
    assert stored["loadavg_before"] and stored["command"].endswith(f"--out {out}")
    text = (out / "serve-micro-vit-16.md").read_text()
    assert "## Targets" in text and "V2 engine, routed" in text and "hop by hop" in text
    assert stored["config"]["instances"] == 2 and "2 instance(s) of each model" in text


def test_a_partial_engine_folder_is_refused(bench_engines, tmp_path):
    from surgery_edge.bench.serve import ServeBenchConfig, build_engines
    from surgery_edge.errors import ConfigError

    (tmp_path / "v2.onnx").symlink_to(bench_engines / "v2.onnx")
    with pytest.raises(ConfigError, match="merged.onnx"):
        build_engines(ServeBenchConfig(), tmp_path, print)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--instances", "0"], "must be positive"),
        (["--concurrency", "4", "0"], "must be positive"),
        (["--engines", "PARTIAL"], "merged.onnx"),
    ],
)
def test_bad_options_exit_2_with_one_line(bench_engines, tmp_path, capsys, args, says):
    from surgery_edge.bench.serve import main

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "v2.onnx").symlink_to(bench_engines / "v2.onnx")
    args = [str(partial) if a == "PARTIAL" else a for a in args]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_experts_as_one_graph_answer_as_the_experts_do(bench_engines, tmp_path):
    """The one-model baseline: the expert engines composed into one graph read the image once
    and give every expert's logits, bit for bit; a file that is no expert is refused."""
    import numpy as np
    import onnxruntime as ort

    from surgery_edge.bench.one_graph import compose_experts
    from surgery_edge.engine_format import read_onnx_metadata, verify_engine
    from surgery_edge.errors import ConfigError

    tasks = read_onnx_metadata(bench_engines / "v2.onnx").tasks
    experts = {t: bench_engines / f"expert-{t}.onnx" for t in tasks}
    one = compose_experts(experts, tmp_path / "one.onnx")
    meta = read_onnx_metadata(one)
    verify_engine(one, meta, "onnx")  # sealed as an exported engine is
    assert (meta.mode.value, meta.tasks, meta.inputs) == ("all-tasks", tasks, ("images",))
    s = meta.preprocessing.image_size
    x = np.random.default_rng(0).normal(size=(3, 3, s, s)).astype(np.float32)
    got = ort.InferenceSession(str(one)).run(list(meta.outputs), {"images": x})
    for t, task in enumerate(tasks):
        session = ort.InferenceSession(str(experts[task]))
        feeds = {"images": x, "task_ids": np.zeros(3, np.int64)}
        want = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
        assert np.array_equal(got[t], want), task
    # the ceilings per request: a merged-backbone engine has no surgery method ("none")
    from surgery_edge.bench.serve import ceilings

    files = {"v1": bench_engines / "v1.onnx", "v2": bench_engines / "v2.onnx"}
    files |= {f"expert-{t}": p for t, p in experts.items()}
    bounds = ceilings({**files, "merged": experts[tasks[0]], "experts-one-graph": one})
    assert 0.5 < bounds["mixed/merged/v2"]["FLOPs"] < 1.0  # V2's adapters: more FLOPs
    assert bounds["all-tasks/experts/v1"]["FLOPs"] > 2.5  # three tasks: three backbones
    with pytest.raises(ConfigError, match="v2.onnx is not one expert"):
        compose_experts({"a": bench_engines / "v2.onnx"}, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_the_engines_own_ratio_is_flagged_above_its_ceiling():
    """The serving efficiency divides by the engines' own CPU ratio, which the work bounds (the
    FLOP ceiling): a measured ratio above it (per-operator costs of tiny engines) is flagged,
    and the efficiency against the ceiling given beside it; recomputed from the committed
    record's measurements."""
    from pathlib import Path

    from surgery_edge.bench.serve_measure import ServeResult
    from surgery_edge.bench.serve_report import markdown, targets

    path = Path(__file__).parents[2] / "benchmarks/results/cpu/serve-tiny-vit-32.json"
    record = json.loads(path.read_text())
    results = [ServeResult(**r) for r in record["results"]]
    rows = targets(results, record["engines_alone_cpu_ms"], record["ceilings"])
    efficiency = [t for t in rows if t["id"].startswith("efficiency-")]
    assert len(efficiency) == 6
    for t in efficiency:
        flops = record["ceilings"][f"all-tasks/{t['id'].removeprefix('efficiency-')}/v1"]["FLOPs"]
        above = t["engines_alone_cpu_ratio"] > 1.01 * flops
        assert t["engines_alone_above_ceiling"] is above
        if above:
            assert t["ratio_at_ceiling"] == pytest.approx(t["served_cpu_ratio"] / flops, abs=2e-3)
            assert t["ratio_at_ceiling"] > t["ratio"]  # the flagged ratio understates it
        else:
            assert t["ratio_at_ceiling"] is None
    assert any(t["engines_alone_above_ceiling"] for t in efficiency)
    record["targets"] = rows
    assert "above ceiling of the work, FLOPs; against that ceiling" in markdown(record)

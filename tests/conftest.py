"""Shared fixtures: a tiny run (micro ViT, three tasks, a few steps) made once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("SURGERY_EDGE_QUIET", "1")
torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves

TINY_YAML = """\
arch: micro-vit-16
seed: 0
device: cpu
suite: {n_train: 40, n_adapt: 16, n_test: 16, tasks: [digits, shapes, colours]}
experts: {pretrain_n_per_source: 16, pretrain_epochs: 1, finetune_epochs: 1,
          finetune_batch_size: 16}
merge:
  params:
    adamerging_taskwise: {steps: 3, batch_size: 4}
    adamerging_layerwise: {steps: 3, batch_size: 4}
surgery:
  params: {surgery: {rank: 4, steps: 6}, surgeryv2: {rank: 4, steps: 3}}
  batch_size: 4
"""


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config_path):
    """A finished tiny demo run: returns (run directory, report path)."""
    from surgery_edge.run.config import load_config
    from surgery_edge.run.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:  # engine latencies: timed briefly, not read
        patch.setattr("surgery_edge.evaluation.engine.MIN_SECONDS", 0.02)
        report = run_pipeline(out, load_config(tiny_config_path), log=lambda *a: None)
    return out, report


@pytest.fixture(scope="session")
def run(tiny_run):
    """The tiny run re-opened with its experts loaded."""
    from surgery_edge.run.state import Run

    r = Run.open(tiny_run[0], log=lambda *a: None)
    r.require_experts()
    return r


@pytest.fixture(scope="session")
def engines(tiny_run):
    """The engines the tiny run's export stage made, read only: {"report": ..., "dir": Path}.

    The demo hook's summary (``engines/summary.json``) and its folder, so the suite exports
    them once; tests that change an engine work on copies.
    """
    import json

    folder = tiny_run[0] / "engines"
    return {"report": json.loads((folder / "summary.json").read_text()), "dir": folder}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m redteam` sees the marks
def pytest_collection_modifyitems(config, items):
    """Skip ``slow`` tests unless RUN_SLOW=1, ``gpu`` tests when CUDA is absent, and tests
    that need the tiny run under mutation testing; mark the red-team table's tests."""
    from redteam import node_ids

    redteam = node_ids()
    skip_slow = pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # under `make mutate` (SURGERY_EDGE_MUTATING=1) every mutant would
    # build the tiny run again: those tests are left to `make test`
    mutating = os.environ.get("SURGERY_EDGE_MUTATING") == "1"
    skip_mutating = pytest.mark.skip(reason="needs the tiny run: not run per mutant")
    for item in items:
        # the markers, not item.keywords: keywords also hold the names of the folders above
        # (a checkout in a folder named "gpu" would skip every test)
        if item.get_closest_marker("slow") and os.environ.get("RUN_SLOW") != "1":
            item.add_marker(skip_slow)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if mutating and "tiny_run" in item.fixturenames:
            item.add_marker(skip_mutating)
        if item.nodeid.removeprefix("tests/").split("[")[0] in redteam:
            item.add_marker(pytest.mark.redteam)

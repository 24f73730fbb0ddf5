"""The run configuration: per-method parameters from the registries, and 0.1's flat keys."""

from __future__ import annotations

import os
import re

import pytest

from surgery_edge.errors import ConfigError
from surgery_edge.run.config import RunConfig, load_config


def test_defaults_are_the_demos_over_the_registries():
    cfg = RunConfig()
    assert cfg.merge.params_for("ties_merging") == {"k": 0.2, "lam": 0.3}
    assert cfg.merge.params_for("adamerging_layerwise")["steps"] == 100  # the demo's budget
    # the demo's V1 rank, steps and learning rate: the tuning sweep's choice
    assert {m: (p.rank, p.steps) for m, p in cfg.surgery.params.items()} == {
        "surgery": (80, 2000),
        "surgeryv2": (16, 500),
    }
    assert (cfg.surgery.lr, cfg.surgery.schedule) == (3e-3, "joint")


def test_params_merge_onto_the_defaults_one_parameter_at_a_time():
    cfg = RunConfig.model_validate(
        {"merge": {"params": {"ties_merging": {"k": 0.5}, "adamerging_taskwise": {"lr": 0.01}}}}
    )
    assert cfg.merge.params_for("ties_merging") == {"k": 0.5, "lam": 0.3}
    assert cfg.merge.params_for("adamerging_taskwise")["steps"] == 100
    assert cfg.merge.params_for("adamerging_taskwise")["lr"] == 0.01


def test_a_method_can_have_its_own_learning_rate_and_the_schedule_reaches_the_trainer():
    from types import SimpleNamespace

    from surgery_edge.run.surgery import surgery_config

    cfg = RunConfig.model_validate(
        {
            "seed": 3,
            "surgery": {"lr": 0.002, "schedule": "reference", "params": {"surgery": {"lr": 0.01}}},
        }
    )
    run = SimpleNamespace(config=cfg)
    v1, v2 = surgery_config(run, "surgery"), surgery_config(run, "surgeryv2")
    assert (v1.lr, v2.lr) == (0.01, 0.002)
    assert v1.schedule == v2.schedule == "reference" and v1.seed == v2.seed == 3
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_one_rule_names_the_unlabelled_split():
    """AdaMerging, surgery, their checks and calibration take the split from one rule."""
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np

    from surgery_edge.run.state import adaptation_split, unlabelled_split

    plain, paper = RunConfig(), RunConfig.model_validate({"surgery": {"transductive": True}})
    assert (unlabelled_split(plain), unlabelled_split(paper)) == ("adapt", "test")
    assert (unlabelled_split(plain, True), unlabelled_split(paper, False)) == ("test", "adapt")
    no_images = SimpleNamespace(adapt_x=np.zeros((0, 8, 8, 3), np.uint8))
    run = SimpleNamespace(
        config=plain, tasks=["a"], suite=SimpleNamespace(task=lambda t: no_images)
    )
    with pytest.raises(ConfigError, match=r"Tasks \['a'\] have no adaptation images"):
        adaptation_split(run)
    assert adaptation_split(run, transductive=True) == "test"
    package = Path(__file__).resolve().parents[2] / "surgery_edge"
    # no other module decides it from the config (run_surgery passes it; the report says it)
    deciding = re.compile(r"if [\w.]*surgery\.transductive")
    copies = [p.name for p in package.rglob("*.py") if deciding.search(p.read_text())]
    assert copies == ["state.py"]


def test_the_flat_keys_of_earlier_releases_still_load():
    legacy = {
        "merge": {"task_arithmetic_lam": 0.4, "ties_k": 0.1, "adamerging_steps": 7},
        "surgery": {"rank": 4, "rank_v2": 2, "steps_v1": 6, "steps_v2": 3},
    }
    cfg = RunConfig.model_validate(legacy)
    m, s = cfg.merge, cfg.surgery
    assert m.params_for("task_arithmetic") == {"lam": 0.4}
    assert m.params_for("ties_merging")["k"] == 0.1
    assert m.params_for("adamerging_taskwise")["steps"] == 7
    assert m.params_for("adamerging_layerwise")["steps"] == 7
    assert (s.params["surgery"].rank, s.params["surgery"].steps) == (4, 6)
    assert (s.params["surgeryv2"].rank, s.params["surgeryv2"].steps) == (2, 3)
    again = RunConfig.model_validate(cfg.model_dump(mode="json"))  # config.json round trip
    assert again == cfg


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        ({"merge": {"methods": ["bogus"]}}, r"Unknown merge method 'bogus'.*task_arithmetic"),
        ({"merge": {"params": {"bogus": {"x": 1}}}}, "Unknown merge method 'bogus'"),
        ({"merge": {"params": {"ties_merging": {"kk": 1}}}}, r"'kk'.*accepts: k, lam"),
        ({"merge": {"params": {"ties_merging": {"k": 2}}}}, r"'k'.*\(0, 1\]"),
        (
            {"merge": {"ties_k": 0.1, "params": {"ties_merging": {"k": 0.3}}}},
            "ties_k and params.ties_merging.k both set k",
        ),
        ({"surgery": {"methods": ["surgeryv3"]}}, "Unknown surgery method 'surgeryv3'"),
        ({"surgery": {"params": {"surgeryv2": {"rank": 0}}}}, "rank"),
        ({"surgery": {"lr": float("nan")}}, "lr"),
        ({"surgery": {"params": {"surgery": {"lr": -1}}}}, "lr"),
        ({"surgery": {"schedule": "per-task"}}, "schedule"),
    ],
)
def test_bad_settings_fail_when_the_file_is_read(tmp_path, settings, pattern):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value)
    # one sentence per setting, named by its dotted key; none of pydantic's URLs or wording
    assert "pydantic.dev" not in str(info.value) and "Input should" not in str(info.value)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, n in zip("abcdefgh", "bcdefghi")
)  # 470 bytes that expanded to 14.7 GB before exiting 2


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda p: p.write_text(BOMB), r"line 2: the alias \*a is not allowed"),
        (lambda p: p.write_text("x: " + "y" * (1 << 20)), "a run config is a few kB"),
        (lambda p: os.mkfifo(p), r"is a FIFO \(named pipe\), not a file"),  # never opened
        (lambda p: os.symlink("/dev/null", p), "is a character device, not a file"),
        (lambda p: p.mkdir(), "is a folder, not a file"),
    ],
)
def test_a_config_is_checked_before_yaml_and_pydantic_read_it(tmp_path, make, pattern):
    from cli_checks import user_error

    path = tmp_path / "cfg.yaml"
    make(path)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)
    out = tmp_path / "never"
    assert re.search(pattern, user_error(["run", str(path), "--out", str(out)]).replace("\n", " "))
    assert not out.exists()


def test_every_shipped_recipe_loads_without_aliases():
    from surgery_edge.run.config import shipped_configs

    roots = {"data.root": "/data", "checkpoints.root": "/checkpoints"}
    for path in shipped_configs().values():
        assert load_config(path, roots).data.tasks

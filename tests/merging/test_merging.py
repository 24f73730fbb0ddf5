"""Tests for surgery_edge.merging: hand-computed merges, AdaMerging, registry, bad input."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery_edge.distributed import World, joined
from surgery_edge.errors import ConfigError, MergeError, TrainingError
from surgery_edge.merging import (
    MERGE_METHODS,
    AdaMergingContext,
    MergeResult,
    Param,
    available,
    check_compatible,
    get,
    register,
    task_vectors,
)
from surgery_edge.merging.adamerging import _Loss, _prepare, _Settings

ALL_METHODS = [
    "adamerging_layerwise",
    "adamerging_taskwise",
    "task_arithmetic",
    "ties_merging",
    "weight_averaging",
]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_state_close(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=lambda m, k=key: f"{k}: {m}")


# --- weight averaging / task arithmetic -------------------------------------------------------

# pretrained w = [1, 2], b = [0]
# task vectors: A w=[2, 0] b=[1];  B w=[0, 4] b=[-1];  C w=[1, 3] b=[3]
# sum: w=[3, 7] b=[3];  mean: w=[1, 7/3] b=[1]
PRE = {"w": t(1, 2), "b": t(0)}
EXPERTS = {
    "A": {"w": t(3, 2), "b": t(1)},
    "B": {"w": t(1, 6), "b": t(-1)},
    "C": {"w": t(2, 5), "b": t(3)},
}


def test_weight_averaging_averages_all_experts() -> None:
    result = get("weight_averaging")(PRE, EXPERTS)
    # pretrained + mean = w [2, 2 + 7/3], b [1]. Dropping the last task (the reference's zip bug)
    # would give w [2, 4], b [0].
    assert_state_close(result.state_dict, {"w": t(2, 13 / 3), "b": t(1)})
    assert result.recipe == {"method": "weight_averaging"}


def test_task_arithmetic_default_and_custom_lambda() -> None:
    result = get("task_arithmetic")(PRE, EXPERTS)
    # 0.3 * sum = w [0.9, 2.1], b [0.9]
    assert_state_close(result.state_dict, {"w": t(1.9, 4.1), "b": t(0.9)})
    assert result.recipe == {"method": "task_arithmetic", "lam": 0.3}
    result = get("task_arithmetic")(PRE, EXPERTS, lam=0.5)
    assert_state_close(result.state_dict, {"w": t(2.5, 5.5), "b": t(1.5)})
    assert result.recipe["lam"] == 0.5


# --- ties merging ------------------------------------------------------------------------------


def test_ties_trim_elect_disjoint_mean() -> None:
    # P = 6 entries (w: 4, b: 2), k = 0.5 -> keep the top 3 magnitudes of each whole task vector.
    pre = {"w": t(1, 1, 1, 1), "b": t(0, 0)}
    tvs = {
        "A": {"w": t(3, -1, 0.5, 2), "b": t(1.5, 0)},  # top 3: 3, 2, 1.5
        "B": {"w": t(-2, -4, 1, 0.5), "b": t(2.5, 0.1)},  # top 3: 4, 2.5, 2
        "C": {"w": t(1, 5, 0.2, -3), "b": t(0.5, 0.3)},  # top 3: 5, 3, 1
    }
    experts = {n: {k: pre[k] + v[k] for k in pre} for n, v in tvs.items()}
    # trimmed: A w=[3, 0, 0, 2] b=[1.5, 0];  B w=[-2, -4, 0, 0] b=[2.5, 0]
    #          C w=[1, 5, 0, -3] b=[0, 0]
    # w0: sum 3-2+1=2 -> +, agreeing A 3, C 1 -> mean 2 (B's -2 conflicts and is dropped)
    # w1: sum -4+5=1 -> +, only C 5 -> 5
    # w2: everything trimmed (0.5, 1, 0.2) -> 0
    # w3: sum 2-3=-1 -> -, only C -3 -> -3
    # b0: sum 1.5+2.5=4 -> +, A 1.5, B 2.5 -> 2 (C's 0.5 trimmed)
    # b1: everything trimmed -> 0
    merged_tv = {"w": t(2, 5, 0, -3), "b": t(2, 0)}
    result = get("ties_merging")(pre, experts, k=0.5, lam=1.0)
    assert_state_close(result.state_dict, {k: pre[k] + merged_tv[k] for k in pre})
    result = get("ties_merging")(pre, experts, k=0.5)  # lam 0.3
    assert_state_close(result.state_dict, {"w": t(1.6, 2.5, 1, 0.1), "b": t(0.6, 0)})
    assert result.recipe == {"method": "ties_merging", "k": 0.5, "lam": 0.3}


def test_ties_zero_sum_takes_majority_sign() -> None:
    # k = 1 keeps everything. A = [1, 2, -1], B = [-1, 3, 2].
    # sums: 0, 5, 1 -> signs 0, +, +; majority (sum of signs) is + so entry 0 is +: A's 1.
    pre = {"w": torch.zeros(3)}
    experts = {"A": {"w": t(1, 2, -1)}, "B": {"w": t(-1, 3, 2)}}
    result = get("ties_merging")(pre, experts, k=1.0, lam=1.0)
    assert_state_close(result.state_dict, {"w": t(1, 2.5, 2)})


def test_ties_keeps_ties_at_threshold_and_default_k() -> None:
    # k = 0.34 of P = 3 -> n_keep = 1; threshold = 2; both 2s are >= it and kept.
    pre = {"w": torch.zeros(3)}
    result = get("ties_merging")(pre, {"A": {"w": t(2, -2, 1)}}, k=0.34, lam=1.0)
    assert_state_close(result.state_dict, {"w": t(2, -2, 0)})
    # default k = 0.2 of P = 10 -> keep the 2 largest magnitudes (9 and -8).
    tv = t(1, -8, 3, 9, -2, 0.5, 4, -7, 6, 5)
    result = get("ties_merging")({"w": torch.zeros(10)}, {"A": {"w": tv}}, lam=1.0)
    assert_state_close(result.state_dict, {"w": t(0, -8, 0, 9, 0, 0, 0, 0, 0, 0)})


def test_ties_scalar_tensor_and_undecided_entry() -> None:
    # a 0-dim tensor whose trimmed values cancel: sign 0 -> majority sign.
    # P = 3 (s, v[0], v[1]), k = 1. A: s=1, v=[1, 1]; B: s=-1, v=[1, 1].
    # s: sum 0 -> majority: signs (0, +, +) -> + -> A's 1. v: mean 1.
    pre = {"s": torch.tensor(0.0), "v": torch.zeros(2)}
    experts = {
        "A": {"s": torch.tensor(1.0), "v": t(1, 1)},
        "B": {"s": torch.tensor(-1.0), "v": t(1, 1)},
    }
    result = get("ties_merging")(pre, experts, k=1.0, lam=1.0)
    assert_state_close(result.state_dict, {"s": torch.tensor(1.0), "v": t(1, 1)})


# --- AdaMerging --------------------------------------------------------------------------------

TASKS = ["cars", "dogs"]


def make_context(seed: int = 0, **overrides) -> tuple[dict, dict, AdaMergingContext, dict]:
    """A tiny AdaMerging problem: pretrained, experts, the context, and the method's params."""
    torch.manual_seed(0)
    encoder = nn.Linear(4, 3)
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    experts = {
        task: {k: v + 0.5 * torch.randn_like(v) for k, v in pretrained.items()} for task in TASKS
    }
    heads = {task: nn.Linear(3, 2) for task in TASKS}
    images = {task: torch.randn(32, 4) for task in TASKS}
    params = {"steps": 40, "batch_size": 16, "lr": 0.05, **overrides}
    return pretrained, experts, AdaMergingContext(encoder, heads, images, seed=seed), params


def task_entropies(state_dict: dict, context: AdaMergingContext) -> dict[str, float]:
    """task -> the mean entropy of its head's predictions on all of that task's images."""
    encoder = copy.deepcopy(context.encoder)
    encoder.load_state_dict(state_dict)
    entropies = {}
    with torch.no_grad():
        for task in TASKS:
            logits = context.heads[task](encoder(context.images[task]))
            p = logits.softmax(-1)
            entropies[task] = float(-(p * p.log()).sum(-1).mean())
    return entropies


def total_entropy(state_dict: dict, context: AdaMergingContext) -> float:
    """sum over tasks of the mean entropy on all of that task's images."""
    return sum(task_entropies(state_dict, context).values())


@pytest.mark.parametrize("method", ["adamerging_taskwise", "adamerging_layerwise"])
def test_adamerging_lowers_entropy_and_records_coefficients(method: str) -> None:
    pretrained, experts, context, params = make_context()
    steps_seen: list[int] = []
    context.progress = lambda step, loss: steps_seen.append(step)
    weights_before = copy.deepcopy(context.encoder.state_dict())
    result = get(method)(pretrained, experts, context=context, **params)

    # Coefficients all 0.3 is exactly task arithmetic with lam 0.3: that is the starting point.
    start = get("task_arithmetic")(pretrained, experts, lam=0.3).state_dict
    assert total_entropy(result.state_dict, context) < total_entropy(start, context) - 1e-3
    assert steps_seen == list(range(40))

    coefficients = result.recipe["coefficients"]
    assert list(coefficients) == TASKS
    if method == "adamerging_taskwise":
        values = list(coefficients.values())
        assert all(isinstance(v, float) for v in values)
        assert "keys" not in result.recipe
    else:
        assert result.recipe["keys"] == ["weight", "bias"]
        assert all(len(v) == 2 for v in coefficients.values())
        values = [x for v in coefficients.values() for x in v]
    assert max(abs(v - 0.3) for v in values) > 0.05
    json.dumps(result.recipe)

    # The merged weights are pretrained + sum_t lambda_t tau_t with the recorded coefficients.
    tvs = task_vectors(pretrained, experts)
    for i, key in enumerate(["weight", "bias"]):
        expected = pretrained[key].clone()
        for task in TASKS:
            c = coefficients[task] if method == "adamerging_taskwise" else coefficients[task][i]
            expected += c * tvs[task][key]
        torch.testing.assert_close(result.state_dict[key], expected)

    # The context's modules are left as they were: weights, grads, training mode.
    assert_state_close(context.encoder.state_dict(), weights_before)
    assert context.encoder.training
    assert all(p.grad is None for h in context.heads.values() for p in h.parameters())


@pytest.mark.parametrize("method", ["adamerging_taskwise", "adamerging_layerwise"])
def test_adamerging_is_deterministic(method: str) -> None:
    recipes = []
    for seed in (0, 0, 1):
        pretrained, experts, context, params = make_context(steps=10, seed=seed)
        recipes.append(get(method)(pretrained, experts, context=context, **params).recipe)
    assert recipes[0] == recipes[1]
    assert recipes[0]["coefficients"] != recipes[2]["coefficients"]


def test_adamerging_zero_steps_is_task_arithmetic() -> None:
    pretrained, experts, context, params = make_context(steps=0)
    result = get("adamerging_taskwise")(pretrained, experts, context=context, **params)
    assert result.recipe["coefficients"] == {"cars": pytest.approx(0.3), "dogs": pytest.approx(0.3)}
    expected = get("task_arithmetic")(pretrained, experts).state_dict
    assert_state_close(result.state_dict, expected)


@pytest.mark.parametrize("method", ["adamerging_taskwise", "adamerging_layerwise"])
def test_adamerging_needs_a_context(method: str) -> None:
    pretrained, experts, _, _ = make_context()
    with pytest.raises(ConfigError, match="unlabelled.*context"):
        get(method)(pretrained, experts)


def test_adamerging_context_missing_task_and_bad_values() -> None:
    pretrained, experts, context, params = make_context()
    del context.heads["dogs"]
    with pytest.raises(ConfigError, match="heads for task.*'dogs'"):
        get("adamerging_taskwise")(pretrained, experts, context=context, **params)
    pretrained, experts, context, params = make_context(lr=-1.0)
    with pytest.raises(ConfigError, match=r"'lr'.*> 0, got -1.0"):
        get("adamerging_taskwise")(pretrained, experts, context=context, **params)
    with pytest.raises(ConfigError, match=r"'steps'.*integer, got 2.5"):
        get("adamerging_taskwise")(pretrained, experts, context=context, steps=2.5)


class Recorder:
    """A metrics log that keeps its rows."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def write(self, step: int, **values) -> None:
        self.rows.append({"step": step, **values})


@pytest.mark.parametrize("method", ["adamerging_taskwise", "adamerging_layerwise"])
def test_adamerging_s_first_step_is_the_entropy_of_every_image(method: str) -> None:
    """With batches as large as the data, the first step's loss is the sum over tasks of the
    mean prediction entropy on every image at the initial coefficients (task arithmetic at
    lam = init), logged per task with the lr; Adam's first step moves every coefficient by lr."""
    pretrained, experts, context, params = make_context(steps=1, batch_size=32, init=0.4)
    seen: list[tuple[int, float]] = []
    context.progress = lambda step, loss: seen.append((step, loss))
    context.metrics = Recorder()
    result = get(method)(pretrained, experts, context=context, **params)

    start = get("task_arithmetic")(pretrained, experts, lam=0.4).state_dict
    expected = task_entropies(start, context)
    assert seen == [(0, pytest.approx(sum(expected.values()), rel=1e-5))]
    row = {"step": 0, "loss": seen[0][1], "loss_per_task": pytest.approx(expected, rel=1e-5)}
    assert context.metrics.rows == [{**row, "lr": 0.05}]
    values = result.recipe["coefficients"].values()
    moved = [abs(c - 0.4) for v in values for c in (v if isinstance(v, list) else [v])]
    assert moved == pytest.approx([0.05] * len(moved), rel=1e-3)


def test_two_ranks_shares_of_a_step_make_the_one_process_step() -> None:
    """In a distributed job each rank computes the loss of its share of the rows of the same
    batches, weighted so that the mean over the ranks (the logged loss; the gradient
    DistributedDataParallel averages) is the one-process loss and gradient, also when the
    shares differ in size (5 rows on 2 ranks: 3 and 2)."""
    pretrained, experts, context, _ = make_context()
    settings = _Settings("adamerging_layerwise", True, steps=1, batch_size=5, lr=0.05, init=0.3)

    def step(world: World) -> tuple[float, torch.Tensor, dict[str, float]]:
        problem = _prepare(pretrained, experts, context)
        coefficients = torch.full((len(TASKS), 2), 0.3, requires_grad=True)
        generator = torch.Generator().manual_seed(0)  # every rank draws the same batches
        loss = _Loss(problem, settings, context, world, coefficients, generator, per_task={})
        value = loss(0)
        value.backward()
        return value.item(), coefficients.grad, {t: v.item() for t, v in loss.per_task.items()}

    one = step(World.single())
    ranks = [step(World(rank, 2, rank, torch.device("cpu"), "gloo")) for rank in (0, 1)]
    assert (ranks[0][0] + ranks[1][0]) / 2 == pytest.approx(one[0], rel=1e-5)
    torch.testing.assert_close((ranks[0][1] + ranks[1][1]) / 2, one[1])
    for task in TASKS:  # the metrics log sums each task's term over the ranks
        assert ranks[0][2][task] + ranks[1][2][task] == pytest.approx(one[2][task], rel=1e-5)


def _rank(rank: int, port: int, out: str) -> None:
    """One rank of a two-process AdaMerging job (gloo) on the tiny problem: its log to a file."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ.update(LOCAL_RANK=str(rank), MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with joined(torch.device("cpu")) as world:
        pretrained, experts, context, params = make_context(steps=3, batch_size=5)
        context.world, context.metrics = world, Recorder()
        result = get("adamerging_layerwise")(pretrained, experts, context=context, **params)
    rows = context.metrics.rows
    Path(out, f"{rank}.json").write_text(json.dumps({"recipe": result.recipe, "rows": rows}))


@pytest.mark.slow  # two spawned processes: 5-20 s; the shares' arithmetic is checked above
def test_two_processes_learn_and_log_what_one_process_does(tmp_path) -> None:
    """A real two-process job (gloo): every rank ends with the coefficients one process learns
    and logs the same loss per task (each rank's share summed over the ranks), with batches of
    5 rows split 3 and 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    pretrained, experts, context, params = make_context(steps=3, batch_size=5)
    context.metrics = Recorder()
    one = get("adamerging_layerwise")(pretrained, experts, context=context, **params)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        for task in TASKS:
            learned = got["recipe"]["coefficients"][task]
            assert learned == pytest.approx(one.recipe["coefficients"][task], abs=1e-6)
        for row, expected in zip(got["rows"], context.metrics.rows, strict=True):
            assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5)
            assert row["loss_per_task"] == pytest.approx(expected["loss_per_task"], rel=1e-5)


def test_tasks_whose_images_differ_in_size_are_encoded_batch_by_batch() -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    experts = {t: {k: v + 0.5 * torch.randn_like(v) for k, v in pretrained.items()} for t in TASKS}
    heads = {t: nn.Linear(3, 2) for t in TASKS}
    images = {"cars": torch.randn(6, 3, 4, 4), "dogs": torch.randn(6, 3, 6, 6)}
    context = AdaMergingContext(encoder, heads, images)
    seen: list[float] = []
    context.progress = lambda step, loss: seen.append(loss)
    params = {"steps": 1, "batch_size": 6, "lr": 0.05}
    get("adamerging_taskwise")(pretrained, experts, context=context, **params)
    start = get("task_arithmetic")(pretrained, experts, lam=0.3).state_dict
    assert seen == [pytest.approx(total_entropy(start, context), rel=1e-5)]


class Shift(nn.Module):
    """An encoder without floating-point weights: (B, 4) -> (B, 3) plus an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([1, 2, 3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3] + self.shift


@pytest.mark.parametrize("method", ["adamerging_taskwise", "adamerging_layerwise"])
def test_adamerging_of_a_model_without_floating_point_weights_returns_it(method: str) -> None:
    pretrained = {"shift": torch.tensor([1, 2, 3])}
    experts = {t: {"shift": torch.tensor([1, 2, 3])} for t in TASKS}
    heads = {t: nn.Linear(3, 2) for t in TASKS}
    context = AdaMergingContext(Shift(), heads, {t: torch.randn(8, 4) for t in TASKS})
    result = get(method)(pretrained, experts, context=context, steps=3, batch_size=4, lr=0.05)
    assert torch.equal(result.state_dict["shift"], pretrained["shift"])
    unchanged = [] if method == "adamerging_layerwise" else pytest.approx(0.3)
    assert result.recipe["coefficients"] == {t: unchanged for t in TASKS}


class HalfScale(nn.Module):
    """A linear layer and a per-feature scale held in fp16; notes the scale's dtype it runs with."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float16))
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 3)
        self.seen.append(self.scale.dtype)
        return self.linear(x) * self.scale.float()


def test_adamerging_learns_on_the_merged_weights_in_their_own_dtype() -> None:
    """A half-precision tensor is merged in fp32, then rounded once: the encoder learns with it
    in fp16, as the merged model holds it."""
    torch.manual_seed(0)
    encoder = HalfScale()
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    experts = {
        t: {k: (v.float() + 0.5 * torch.randn(v.shape)).to(v.dtype) for k, v in pretrained.items()}
        for t in TASKS
    }
    heads = {t: nn.Linear(3, 2) for t in TASKS}
    context = AdaMergingContext(encoder, heads, {t: torch.randn(8, 4) for t in TASKS})
    params = {"steps": 2, "batch_size": 8, "lr": 0.05}
    result = get("adamerging_layerwise")(pretrained, experts, context=context, **params)
    assert encoder.seen == [torch.float16, torch.float16]  # one encoder call per step
    i, coefficients = result.recipe["keys"].index("scale"), result.recipe["coefficients"]
    pre = pretrained["scale"].float()
    expected = pre + sum(coefficients[t][i] * (experts[t]["scale"].float() - pre) for t in TASKS)
    assert result.state_dict["scale"].dtype == torch.float16
    torch.testing.assert_close(result.state_dict["scale"], expected.half())


def test_adamerging_records_its_settings_and_coefficients_in_the_recipe() -> None:
    pretrained, experts, context, _ = make_context(seed=3)
    params = {"steps": 0, "batch_size": 8, "lr": 0.01, "init": 0.5}
    settings = {"init": 0.5, "steps": 0, "lr": 0.01, "batch_size": 8, "seed": 3}
    taskwise = get("adamerging_taskwise")(pretrained, experts, context=context, **params)
    assert taskwise.recipe == {
        "method": "adamerging_taskwise",
        **settings,
        "coefficients": {"cars": 0.5, "dogs": 0.5},
    }
    layerwise = get("adamerging_layerwise")(pretrained, experts, context=context, **params)
    assert layerwise.recipe == {
        "method": "adamerging_layerwise",
        **settings,
        "coefficients": {"cars": [0.5, 0.5], "dogs": [0.5, 0.5]},
        "keys": ["weight", "bias"],
    }


def test_a_loss_that_is_not_finite_stops_adamerging_naming_the_step_and_lr() -> None:
    pretrained, experts, context, params = make_context(steps=3)
    context.images["dogs"] = torch.full((32, 4), float("inf"))
    with pytest.raises(TrainingError) as raised:
        get("adamerging_taskwise")(pretrained, experts, context=context, **params)
    assert str(raised.value) == (
        "Merge method 'adamerging_taskwise': the entropy loss became nan at step 0; lower its "
        "lr (now 0.05) or check the adaptation images."
    )
    assert context.encoder.training  # the training flags are restored on the way out


# --- registry ----------------------------------------------------------------------------------


def test_registry_lists_all_methods() -> None:
    assert available() == ALL_METHODS
    assert set(MERGE_METHODS) == set(ALL_METHODS)
    assert all(callable(get(name)) for name in ALL_METHODS)


def test_registry_declares_each_methods_parameters() -> None:
    """The registry, not the caller, owns defaults and checks: they reach the recipe."""
    assert [p.name for p in get("ties_merging").params] == ["k", "lam"]
    assert get("ties_merging").resolve({"k": 0.5}) == {"k": 0.5, "lam": 0.3}
    assert get("weight_averaging").params == () and not get("weight_averaging").needs_data
    assert get("adamerging_layerwise").needs_data
    assert get("adamerging_layerwise").resolve()["steps"] == 500  # the reference's schedule
    assert "k=0.2" in get("ties_merging").describe()
    assert get("task_arithmetic")(PRE, EXPERTS).recipe == {"method": "task_arithmetic", "lam": 0.3}


def test_registry_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        get("nope")
    message = str(info.value)
    assert "'nope'" in message
    assert ", ".join(ALL_METHODS) in message


def test_register_function_and_class() -> None:
    @register("_test_class_method", params=(Param("scale", 2, "an integer", low=1),))
    class Identity:
        def __call__(self, pretrained, experts, *, context=None, scale):
            return MergeResult(dict(pretrained), {"method": "_test_class_method", "s": scale})

    try:
        assert isinstance(get("_test_class_method").fn, Identity)
        result = get("_test_class_method")(PRE, EXPERTS)
        assert result.state_dict["w"] is PRE["w"] and result.recipe["s"] == 2
        with pytest.raises(ConfigError, match=r"'scale'.*>= 1, got 0"):
            get("_test_class_method")(PRE, EXPERTS, scale=0)
        with pytest.raises(ValueError, match="already registered"):
            register("_test_class_method")(lambda *a, **k: None)
    finally:
        del MERGE_METHODS["_test_class_method"]


# --- bad input, dtypes, no mutation ------------------------------------------------------------


def broken(change) -> dict:
    experts = copy.deepcopy(EXPERTS)
    change(experts["B"])
    return experts


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda e: e.pop("b"), r"Expert 'B'.*missing 1 key.*'b'"),
        (lambda e: e.update(extra=t(1)), r"Expert 'B'.*unexpected 1 key.*'extra'"),
        (lambda e: e.update(w=torch.zeros(3)), r"Expert 'B'.*\(3,\).*'w'.*\(2,\)"),
        (lambda e: e.update(w=torch.zeros(2, dtype=torch.long)), r"Expert 'B'.*'w'"),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_incompatible_expert_raises(method: str, change, pattern: str) -> None:
    with pytest.raises(MergeError, match=pattern):
        get(method)(PRE, broken(change))


def test_many_missing_keys_are_listed_up_to_five() -> None:
    pre = {f"k{i}": t(0) for i in range(8)}
    with pytest.raises(MergeError, match=r"missing 7 key\(s\): 'k1'.*'k5' \(and 2 more\)"):
        check_compatible(pre, {"A": {"k0": t(1)}})


def test_no_experts_raises() -> None:
    with pytest.raises(MergeError, match="at least one"):
        get("task_arithmetic")(PRE, {})


@pytest.mark.parametrize(
    ("method", "params", "pattern"),
    [
        ("task_arithmetic", {"lamda": 0.3}, r"'lamda'.*accepts: lam"),
        ("task_arithmetic", {"lam": float("nan")}, r"'lam'.*finite.*nan"),
        ("ties_merging", {"k": 0.0}, r"'k'.*\(0, 1\].*0.0"),
        ("ties_merging", {"lam": "big"}, r"'lam'.*must be a number, got 'big'"),
        ("ties_merging", {"k": 20}, r"'k'.*\(0, 1\].*20"),
        ("weight_averaging", {"lam": 1.0}, r"'lam'.*no parameters"),
    ],
)
def test_bad_parameters_raise_config_error(method: str, params: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        get(method)(PRE, EXPERTS, **params)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties_merging", "weight_averaging"])
def test_integer_buffers_copied_and_dtype_kept(method: str) -> None:
    pre = {"w": t(1, 2).half(), "n": torch.tensor([7])}
    experts = {"A": {"w": t(3, 2).half(), "n": torch.tensor([7])}}
    result = get(method)(pre, experts)
    assert result.state_dict["w"].dtype == torch.float16
    assert torch.equal(result.state_dict["n"], torch.tensor([7]))
    result.state_dict["n"] += 1  # the result does not alias the input
    assert pre["n"].item() == 7
    experts["A"]["n"] = torch.tensor([8])
    with pytest.raises(MergeError, match=r"Expert 'A'.*'n'.*must be equal"):
        get(method)(pre, experts)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_inputs_not_modified(method: str) -> None:
    pretrained, experts, context, params = make_context(steps=3)
    pre_copy, experts_copy = copy.deepcopy(pretrained), copy.deepcopy(experts)
    result = get(method)(
        pretrained, experts, context=context, **(params if get(method).needs_data else {})
    )
    assert_state_close(pretrained, pre_copy)
    for task in TASKS:
        assert_state_close(experts[task], experts_copy[task])
    for key, value in result.state_dict.items():
        assert value.data_ptr() != pretrained[key].data_ptr()
        assert value.shape == pretrained[key].shape and value.dtype == pretrained[key].dtype

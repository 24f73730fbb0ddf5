import re

import numpy as np
import pytest
import torch

from surgery_edge.errors import AdapterError, ConfigError, TrainingError
from surgery_edge.models import ClassificationHead, build_encoder, get_arch
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.functional import (
    TaskGroups,
    all_tasks_correction,
    routed_correction,
    surgery_correction,
)
from surgery_edge.surgery.model import MultiTaskModel
from surgery_edge.surgery.schedule import _batch_indices
from surgery_edge.surgery.targets import representations
from surgery_edge.surgery.trainer import (
    AdapterOutput,
    SurgeryConfig,
    TaskTargets,
    TrainingHooks,
    last_good_path,
    train_surgery,
)

ARCH = get_arch("micro-vit-16")
TASKS = ["a", "b", "c"]


def test_adapter_math_by_hand():
    z = torch.tensor([[1.0, -2.0]])
    down = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # relu(down z) = relu([1, -2]) = [1, 0]
    up = torch.tensor([[2.0, 5.0], [3.0, 7.0]])  # up @ [1, 0] = [2, 3]
    assert torch.equal(surgery_correction(z, down, up), torch.tensor([[-1.0, -5.0]]))


def test_one_formula_for_one_task_routed_rows_and_all_tasks():
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 6, 4, generator=gen)
    z = torch.randn(5, 6, generator=gen)
    every = all_tasks_correction(z, down, up)  # (T, B, d)
    ids = torch.tensor([2, 0, 1, 1, 0])
    routed = routed_correction(z, ids, down, up)
    for t in range(3):
        torch.testing.assert_close(every[t], surgery_correction(z, down[t], up[t]))
    for b, t in enumerate(ids.tolist()):
        torch.testing.assert_close(routed[b], every[t, b])


def test_bank_init_and_layout():
    bank = AdapterBank(TASKS, ARCH, "surgeryv2", rank=4)
    assert bank.sites == tuple(f"block.{i}" for i in range(ARCH.layers)) + ("final",)
    down, up = bank.weights("block.0")
    assert down.shape == (3, 4, ARCH.width) and up.shape == (3, ARCH.width, 4)
    assert torch.count_nonzero(up) == 0 and torch.count_nonzero(down) > 0
    bound = 1 / ARCH.width**0.5  # kaiming_uniform(a=sqrt(5)) on (r, d) => U(-1/sqrt(d), 1/sqrt(d))
    assert down.abs().max() <= bound
    assert AdapterBank(TASKS, ARCH, "surgery", 4).sites == ("final",)


def test_routed_correction_uses_each_images_task():
    torch.manual_seed(0)
    down, up = torch.randn(3, 2, 5), torch.randn(3, 5, 2)
    z, ids = torch.randn(4, 7, 5), torch.tensor([2, 0, 1, 2])
    out = routed_correction(z, ids, down, up)
    for b, t in enumerate(ids.tolist()):
        torch.testing.assert_close(out[b], surgery_correction(z[b], down[t], up[t]))


@pytest.mark.parametrize("tokens", [(), (7,)], ids=["features", "tokens"])
def test_a_batch_laid_out_by_task_routes_as_its_task_ids(tokens):
    """Training's grouped routing gives the per-row routing's values and gradients (the
    products are shaped differently, so equal to rounding, not bit for bit: float64 here)."""
    d = ARCH.embed_dim
    z = torch.randn(6, *tokens, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    groups = TaskGroups(torch.tensor([2, 0, 1]), rows=2)  # rows 0-1 task 2, 2-3 task 0, ...
    assert groups.task_ids().tolist() == [2, 2, 0, 0, 1, 1]
    results = []
    for route in (groups, groups.task_ids()):
        torch.manual_seed(0)  # the same adapters for both routings
        bank = AdapterBank(TASKS, ARCH, "surgery", rank=3).double()
        with torch.no_grad():
            bank.up["final"].normal_(generator=torch.Generator().manual_seed(1))
        out = bank.correct("final", z, route)
        (out**2).sum().backward()
        results.append((out, bank.down["final"].grad, bank.up["final"].grad))
    for grouped, routed in zip(*results):
        torch.testing.assert_close(grouped, routed)
    with pytest.raises(ValueError, match="5 rows are not 3 runs of 2"):
        bank.correct("final", z[:5], groups)


def _model(method, seed=0, nonzero_up=True):
    torch.manual_seed(seed)
    enc = build_encoder(ARCH).eval()
    heads = [ClassificationHead(torch.randn(c, ARCH.embed_dim), torch.randn(c)) for c in (2, 5, 3)]
    bank = None
    if method != "none":
        bank = AdapterBank(TASKS, ARCH, method, rank=4)
        if nonzero_up:
            for p in bank.up.values():
                torch.nn.init.normal_(p, std=0.3)
    return MultiTaskModel(enc, heads, TASKS, bank).eval()


def test_zero_up_gives_exactly_the_merged_models_logits():
    x, ids = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 2, 1, 0])
    plain = _model("none")
    with torch.no_grad():
        ref = plain(x, ids)
        for method in ("surgery", "surgeryv2"):
            m = _model(method, nonzero_up=False)
            assert torch.equal(m(x, ids), ref)  # bit-for-bit, not approximately


@pytest.mark.parametrize("method", ["surgery", "surgeryv2", "none"])
def test_routed_and_all_tasks_agree(method):
    m = _model(method)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        all_tasks = m.forward_all_tasks(x)
        for t in range(3):
            routed = m(x, torch.full((5,), t))
            assert all_tasks[t].shape == (5, m.class_counts[t])
            torch.testing.assert_close(
                all_tasks[t], routed[:, : m.class_counts[t]], rtol=1e-5, atol=1e-5
            )
            assert torch.isinf(routed[:, m.class_counts[t] :]).all()


def _targets(n=12, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i, t in enumerate(TASKS):
        torch.manual_seed(100 + i)
        expert = build_encoder(ARCH)
        images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        final, blocks = representations(expert, images, torch.device("cpu"))
        out[t] = TaskTargets(images, final, blocks)
    return out


def _train(tmp_path, method, steps, name="a.safetensors", **kw):
    torch.manual_seed(0)
    merged = build_encoder(ARCH)
    heads = [ClassificationHead(torch.randn(2, ARCH.embed_dim)) for _ in TASKS]
    cfg = SurgeryConfig(
        method=method,
        rank=4,
        steps=steps,
        batch_size=4,
        lr=kw.pop("lr", 1e-2),
        checkpoint_every=kw.pop("checkpoint_every", 2),
    )
    losses = []
    hooks = TrainingHooks(
        on_step=lambda s, v: losses.append(v),
        log=kw.pop("log", print),
        metrics=kw.pop("metrics", None),
    )
    bank = train_surgery(
        merged,
        heads,
        TASKS,
        kw.pop("targets", None) or _targets(),
        cfg,
        AdapterOutput(tmp_path / name, inputs=kw.pop("inputs", None)),
        torch.device("cpu"),
        hooks=hooks,
        **kw,
    )
    return bank, losses


@pytest.mark.parametrize("method", ["surgery", "surgeryv2"])
def test_trainer_lowers_the_loss(tmp_path, method):
    _, losses = _train(tmp_path, method, steps=25)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_resume_gives_the_same_adapters(tmp_path):
    targets = _targets()
    full, _ = _train(tmp_path, "surgeryv2", 6, "full.safetensors", targets=targets)
    # An interrupted run: stop after 4 steps (checkpoint at step 4), then resume to 6.
    part_path = tmp_path / "part.safetensors"
    _interrupt_after(tmp_path, targets, part_path, stop_at=4)
    assert (tmp_path / "part.safetensors.state.pt").exists()
    resumed, _ = _train(tmp_path, "surgeryv2", 6, "part.safetensors", targets=targets, resume=True)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert not (tmp_path / "part.safetensors.state.pt").exists()


class _Stop(Exception):
    pass


def _interrupt_after(tmp_path, targets, path, stop_at, inputs=None):
    def stop(step, value):
        if step + 1 == stop_at:
            raise _Stop

    with pytest.raises(_Stop):
        torch.manual_seed(0)
        merged = build_encoder(ARCH)
        heads = [ClassificationHead(torch.randn(2, ARCH.embed_dim)) for _ in TASKS]
        cfg = SurgeryConfig(
            method="surgeryv2", rank=4, steps=6, batch_size=4, lr=1e-2, checkpoint_every=2
        )
        train_surgery(
            merged,
            heads,
            TASKS,
            targets,
            cfg,
            AdapterOutput(path, inputs=inputs),
            torch.device("cpu"),
            hooks=TrainingHooks(on_step=stop),
        )
    assert not path.exists()  # nothing half-written


def _first_step_drawing(row: int, task: int, n: int, batch: int = 4) -> int:
    """The first training step whose batch of ``task`` holds image ``row``."""
    for step in range(1000):
        if row in _batch_indices(0, step, task, n, batch).tolist():
            return step
    raise AssertionError("never drawn")


def test_nan_stop_keeps_the_previous_adapters_bit_for_bit(tmp_path):
    """A NaN stop never touches the adapter file; the last good adapters go beside it."""
    clean = _targets()
    _train(tmp_path, "surgeryv2", 4, targets=clean)  # the "trained" adapters at a.safetensors
    before = (tmp_path / "a.safetensors").read_bytes()
    # One poisoned target row: the loss turns NaN at the first step that draws it.
    row = next(r for r in range(12) if _first_step_drawing(r, TASKS.index("b"), 12) >= 2)
    stop = _first_step_drawing(row, TASKS.index("b"), 12)
    poisoned = _targets()
    poisoned["b"].blocks = np.array(poisoned["b"].blocks)
    poisoned["b"].blocks[row] = np.nan
    with pytest.raises(TrainingError, match=f"loss became nan at step {stop}") as e:
        _train(tmp_path, "surgeryv2", stop + 5, targets=poisoned)
    assert "was not written" in str(e.value) and f"at step {stop - 1}" in str(e.value)
    assert (tmp_path / "a.safetensors").read_bytes() == before  # bit for bit
    # The last good adapters: the last ones whose loss was finite, those step `stop - 1` used,
    # i.e. exactly the adapters of a clean run of `stop - 1` steps.
    last, meta = AdapterBank.load(last_good_path(tmp_path / "a.safetensors"))
    assert meta["complete"] is False and meta["last_finite_step"] == stop - 1
    assert "fingerprint" not in meta  # never mistaken for trained adapters
    reference, _ = _train(tmp_path, "surgeryv2", stop - 1, "ref.safetensors", targets=clean)
    for (k, a), (_, b) in zip(reference.state_dict().items(), last.state_dict().items()):
        assert torch.equal(a, b), k


def test_nan_at_the_first_step_writes_nothing(tmp_path):
    targets = _targets()
    targets["b"].final = np.full_like(np.asarray(targets["b"].final), np.nan)
    with pytest.raises(TrainingError, match="loss became nan at step 0.*no good adapters"):
        _train(tmp_path, "surgery", 5, targets=targets)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_diverging_learning_rate_stops_and_keeps_the_last_finite_adapters(tmp_path):
    with pytest.raises(TrainingError, match=r"loss became (inf|nan) at step (\d+)") as e:
        _train(tmp_path, "surgery", 8, lr=1e30)
    stop = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert "Lower the learning rate" in str(e.value) and stop >= 2  # V1: up starts at zero
    assert not (tmp_path / "a.safetensors").exists()
    # The last adapters with a finite loss: those a run of `stop - 1` steps ends with.
    last, _ = AdapterBank.load(last_good_path(tmp_path / "a.safetensors"))
    reference, _ = _train(tmp_path, "surgery", stop - 1, "ref.safetensors", lr=1e30)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), last.parameters()))


def test_resume_with_other_inputs_restarts_and_says_so(tmp_path):
    """A checkpoint of another merge / targets / split is never continued from."""
    targets = _targets()
    path = tmp_path / "part.safetensors"
    _interrupt_after(tmp_path, targets, path, stop_at=4, inputs="merge-A")
    said = []
    resumed, _ = _train(
        tmp_path,
        "surgeryv2",
        6,
        "part.safetensors",
        targets=targets,
        resume=True,
        inputs="merge-B",
        log=said.append,
    )
    assert said and "other merged model" in said[0] and "from step 0" in said[0]
    fresh, _ = _train(tmp_path, "surgeryv2", 6, "fresh.safetensors", targets=targets)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), resumed.parameters()))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other settings", "bad step"])
def test_a_damaged_checkpoint_restarts_instead_of_failing(tmp_path, damage):
    targets = _targets()
    path = tmp_path / "part.safetensors"
    _interrupt_after(tmp_path, targets, path, stop_at=4)
    state = tmp_path / "part.safetensors.state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "garbage":
        state.write_bytes(b"\x00" * 64)
    else:
        saved = torch.load(state, weights_only=True)
        if damage == "other settings":
            saved["config"]["lr"] = 0.5
        else:
            saved["step"] = 10**6
        torch.save(saved, state)
    said = []
    resumed, _ = _train(
        tmp_path,
        "surgeryv2",
        6,
        "part.safetensors",
        targets=targets,
        resume=True,
        log=said.append,
    )
    assert said and "not resuming" in said[0]
    fresh, _ = _train(tmp_path, "surgeryv2", 6, "fresh.safetensors", targets=targets)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), resumed.parameters()))


@pytest.mark.parametrize(
    "settings, pattern",
    [
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"lr": -1e-3}, "lr must be greater than 0"),
        ({"rank": 0}, "rank must be an integer from 1"),
        ({"rank": 10**9}, "rank must be an integer from 1 to 16384"),
        ({"batch_size": 10**12}, "batch_size must be an integer"),
        ({"seed": 2**80}, "seed must be an integer from 0"),
        ({"steps": -5}, "steps must be an integer from 1"),
        ({"method": "bogus"}, "Unknown surgery method 'bogus'"),
    ],
)
def test_surgery_settings_are_checked(settings, pattern):
    with pytest.raises(ConfigError, match=pattern):
        SurgeryConfig(**settings)


def test_a_rank_wider_than_the_model_is_refused():
    with pytest.raises(AdapterError, match="from 1 to 24"):
        AdapterBank(TASKS, ARCH, "surgeryv2", rank=25)


def test_adapter_file_round_trip_and_keys(tmp_path):
    from safetensors import safe_open

    bank = AdapterBank(TASKS, ARCH, "surgeryv2", rank=4)
    path = bank.save(tmp_path / "b.safetensors", merge_recipe={"method": "task_arithmetic"})
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("b/block.1/down").shape == (4, ARCH.width)
        assert f.get_tensor("c/final/up").shape == (ARCH.embed_dim, 4)
    back, meta = AdapterBank.load(path, arch=ARCH, tasks=TASKS, method="surgeryv2", rank=4)
    assert meta["merge_recipe"] == {"method": "task_arithmetic"}
    assert all(torch.equal(a, b) for a, b in zip(bank.parameters(), back.parameters()))


def test_bad_adapter_files_are_refused(tmp_path):
    path = AdapterBank(TASKS, ARCH, "surgeryv2", rank=4).save(tmp_path / "b.safetensors")
    with pytest.raises(AdapterError, match="rank 4, expected 16"):
        AdapterBank.load(path, rank=16)
    with pytest.raises(AdapterError, match=r"tasks \['a', 'b', 'c'\].*\['a', 'b'\]"):
        AdapterBank.load(path, tasks=["a", "b"])
    with pytest.raises(AdapterError, match="micro-vit-16.*tiny-vit-32"):
        AdapterBank.load(path, arch=get_arch("tiny-vit-32"))
    with pytest.raises(AdapterError, match="does not exist"):
        AdapterBank.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("method", ["surgery", "surgeryv2", "none"])
def test_each_head_decides_whether_it_normalises(method, tmp_path):
    """Heads that differ in ``normalize`` (the reference decides per head) each get their own:
    routed, all-tasks and the exported engine answer as every head alone would."""
    m = _model(method)
    heads = [
        ClassificationHead(m.head_weight[t, :c], m.head_bias[t, :c])
        for t, c in enumerate(m.class_counts)
    ]
    heads[1].normalize = False
    mixed = MultiTaskModel(m.encoder, heads, TASKS, m.bank).eval()
    assert mixed.uniform_normalize is None and not mixed.normalize
    x = torch.randn(6, 3, 16, 16)
    ids = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        z = mixed.features(x, ids)
        routed = mixed(x, ids)
        all_tasks = mixed.forward_all_tasks(x)
        for b, t in enumerate(ids.tolist()):
            want = heads[t](z[b : b + 1])[0]
            torch.testing.assert_close(routed[b, : len(want)], want)
        for t in range(3):
            zt = mixed.features(x, torch.full((6,), t))
            torch.testing.assert_close(all_tasks[t], heads[t](zt), rtol=1e-5, atol=1e-5)
        # the unnormalised head is not what a model that normalises everything gives
        assert not torch.allclose(routed[1], m(x, ids)[1])
    from surgery_edge.export import export_onnx  # deferred: onnx

    for mode in ("routed", "all-tasks"):  # check=True: ONNX Runtime against the model
        export_onnx(mixed, tmp_path / f"{mode}.onnx", mode)


def test_the_metrics_log_holds_every_step_the_trainer_computed(tmp_path, monkeypatch):
    from surgery_edge import progress
    from surgery_edge.progress import read_metrics

    scalars = []  # what TensorBoard's SummaryWriter would get (tensorboard is not installed)

    class Board:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setattr(progress, "_tensorboard", lambda folder: Board())
    log = tmp_path / "logs" / "train.jsonl"
    _, losses = _train(tmp_path, "surgeryv2", 4, metrics=log)
    assert [(s, v) for t, v, s in scalars if t == "loss"] == list(enumerate(losses))
    assert {t for t, _, _ in scalars} == {"loss", "lr", *(f"loss_per_task/{t}" for t in TASKS)}
    start, *rows = read_metrics(log)
    assert start["event"] == "start" and start["settings"]["rank"] == 4
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["loss"] for r in rows] == losses  # the very values on_step got
    for r in rows:
        assert list(r["loss_per_task"]) == TASKS and r["lr"] == 1e-2
        assert sum(r["loss_per_task"].values()) == pytest.approx(r["loss"], rel=1e-5)
    with log.open("a") as f:
        f.write('{"step": 4, "lo')  # a write torn by a kill: the reader skips it
    assert read_metrics(log)[1:] == rows

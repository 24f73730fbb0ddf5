import copy
import re
from dataclasses import asdict
from datetime import timedelta

import numpy as np
import pytest
import torch

from surgery_edge.distributed import World
from surgery_edge.errors import AdapterError, ConfigError, TrainingError
from surgery_edge.models import ClassificationHead, build_encoder, get_arch
from surgery_edge.progress import read_metrics
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
    schedule_draws,
    state_digest,
    train_surgery,
    training_settings,
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


# --- the training loop on cached features: every number worked out by hand ------------------

E = ARCH.embed_dim
N_CACHED, B_CACHED = 6, 3


def _cached(seed=0):
    """V1 on cached merged features: the merged and the expert final features are random
    numbers (no backbone pass), and the images are only counted."""
    rng = np.random.default_rng(seed)
    targets, finals = {}, {}
    for t in TASKS:
        images = np.zeros((N_CACHED, 1, 1, 3), np.uint8)
        final = rng.normal(size=(N_CACHED, E)).astype(np.float32)
        targets[t] = TaskTargets(images, final, np.zeros((N_CACHED, 0, 1), np.float32))
        finals[t] = rng.normal(size=(N_CACHED, E)).astype(np.float32)
    return targets, finals


def _cached_cfg(steps, **kw):
    settings = dict(method="surgery", rank=4, steps=steps, batch_size=B_CACHED, lr=1e-2)
    return SurgeryConfig(**{"checkpoint_every": 0, **settings, **kw})


class _Fit:
    """One V1 training run on cached features, with what its hooks heard."""

    def __init__(
        self, tmp_path, steps, case, out="v1.safetensors", stop_after=None, poison=None, **kw
    ):
        targets, finals = case
        self.cfg = _cached_cfg(steps, **kw.pop("settings", {}))
        self.steps, self.losses, self.updates, self.said = [], [], {}, []

        def on_step(step, value):
            self.steps.append(step)
            self.losses.append(value)
            if step == stop_after:
                raise _Stop

        def on_update(done, bank):
            self.updates[done] = {k: v.clone() for k, v in bank.state_dict().items()}
            if done == poison:  # as an update that overflowed would leave them
                with torch.no_grad():
                    bank.up["final"][1, 0, 0] = float("inf")

        hooks = TrainingHooks(on_step, on_update, self.said.append, kw.pop("metrics", None))
        torch.manual_seed(0)
        merged = build_encoder(ARCH)
        heads = [ClassificationHead(torch.randn(2, E)) for _ in TASKS]
        out = out if isinstance(out, AdapterOutput) else AdapterOutput(tmp_path / out)
        self.path, self.encoder = out.path, merged
        self.bank = None
        try:
            self.bank = train_surgery(
                merged, heads, TASKS, targets, self.cfg, out, torch.device("cpu"),
                merged_finals=finals, hooks=hooks, **kw,
            )  # fmt: skip
        except _Stop:
            pass


def _by_hand(cfg, case, steps, init):
    """The V1 objective and optimiser in plain torch: per task, the mean L1 distance between
    ``z - up relu(down z)`` of the cached merged features and the expert's, summed over tasks;
    Adam (lr, betas 0.9 / 0.999, no weight decay) on every task's adapters at once.
    Returns the per-step losses, per-task losses and the final (down, up)."""
    targets, finals = case
    down = init.weights("final")[0].detach().clone().requires_grad_()
    up = init.weights("final")[1].detach().clone().requires_grad_()
    opt = torch.optim.Adam([down, up], lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    losses, per_task = [], []
    for step in range(steps):
        parts = {}
        for i, rows in schedule_draws(cfg, step, [N_CACHED] * len(TASKS)):
            t = TASKS[i]
            z, want = torch.from_numpy(finals[t][rows]), torch.from_numpy(targets[t].final[rows])
            corrected = z - torch.relu(z @ down[i].T) @ up[i].T
            parts[t] = (corrected - want).abs().mean()
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        per_task.append({t: v.item() for t, v in parts.items()})
    return losses, per_task, (down.detach(), up.detach())


def _same(a: AdapterBank, b: AdapterBank) -> bool:
    """Bit for bit the same adapters."""
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def _initial_bank(warm: bool) -> AdapterBank:
    torch.manual_seed(0)  # the seed of _cached_cfg: the trainer's own initial adapters
    bank = AdapterBank(TASKS, ARCH, "surgery", 4)
    if warm:  # a warm start: adapters that already correct
        with torch.no_grad():
            bank.up["final"].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return bank


@pytest.mark.parametrize("warm", [False, True], ids=["identity", "warm-start"])
def test_training_is_adam_on_the_summed_mean_l1_distance(tmp_path, warm):
    """The loss of every step, each task's share of it in the metrics log, the adapters the
    run ends with and the file it writes are those of the objective and optimiser written out
    by hand; a warm start starts from the adapters given. The merged features given are used
    as they are (random numbers here, not the backbone's)."""
    case, init = _cached(), _initial_bank(warm)
    log = tmp_path / "train.jsonl"
    out = AdapterOutput(
        tmp_path / "v1.safetensors", {"method": "ties"}, {"provenance": {"seed": 0}}
    )
    fit = _Fit(tmp_path, 3, case, out, metrics=log, init=init if warm else None)
    losses, per_task, (down, up) = _by_hand(fit.cfg, case, 3, init)
    assert fit.steps == [0, 1, 2]
    np.testing.assert_allclose(fit.losses, losses, rtol=1e-5)
    torch.testing.assert_close(fit.bank.weights("final")[0], down, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fit.bank.weights("final")[1], up, rtol=1e-5, atol=1e-6)
    assert fit.losses[-1] < fit.losses[0]
    start, *rows = read_metrics(log)
    assert (start["method"], start["first_step"]) == ("surgery", 0)
    assert start["settings"] == training_settings(fit.cfg)
    for row, want in zip(rows, per_task, strict=True):
        assert row["loss_per_task"] == pytest.approx(want, rel=1e-5)
    saved, meta = AdapterBank.load(fit.path)
    assert meta["merge_recipe"] == {"method": "ties"} and meta["provenance"] == {"seed": 0}
    assert _same(saved, fit.bank)


def test_v2_loss_adds_each_blocks_token_mean_distance_and_leaves_the_backbone_frozen(tmp_path):
    """V2's first loss (the adapters start as the identity): per task, the mean over its rows
    of the final features' mean L1 distance plus every block's token-mean distance. No
    gradient reaches the backbone: only the adapters train."""
    targets, log, losses = _targets(), tmp_path / "train.jsonl", []
    torch.manual_seed(0)
    merged = build_encoder(ARCH)
    cfg = SurgeryConfig(method="surgeryv2", rank=4, steps=1, batch_size=4, checkpoint_every=0)
    train_surgery(
        merged,
        [ClassificationHead(torch.randn(2, E)) for _ in TASKS],
        TASKS,
        targets,
        cfg,
        tmp_path / "v2.safetensors",
        torch.device("cpu"),
        hooks=TrainingHooks(on_step=lambda s, v: losses.append(v), metrics=log),
    )
    assert all(p.grad is None and not p.requires_grad for p in merged.parameters())
    want = {}
    for i, rows in schedule_draws(cfg, 0, [12] * len(TASKS)):
        t = TASKS[i]
        final, blocks = representations(merged, targets[t].images[rows], torch.device("cpu"))
        per_row = np.abs(final - targets[t].final[rows]).mean(-1)
        per_row += np.abs(blocks - targets[t].blocks[rows]).mean(-1).sum(-1)
        want[t] = float(per_row.mean())
    assert losses[0] == pytest.approx(sum(want.values()), rel=1e-5)
    assert read_metrics(log)[1]["loss_per_task"] == pytest.approx(want, rel=1e-5)


def test_a_checkpoint_records_its_step_and_resumes_there(tmp_path, monkeypatch, capsys):
    """A run stopped after 3 of 5 steps (checkpoints every 2) leaves the checkpoint of step 2:
    the adapters as they were then, the settings and the inputs, sealed by their digest.
    Resumed (the same inputs), it makes steps 2-4 with the losses and the adapters of an
    uninterrupted run, its progress line counts 3 steps, and the checkpoint goes."""
    case, every = _cached(), {"checkpoint_every": 2}
    full = _Fit(tmp_path, 5, case, "full.safetensors")
    out = AdapterOutput(tmp_path / "part.safetensors", inputs="merge-A")
    part = _Fit(tmp_path, 5, case, out, stop_after=2, settings=every)
    assert part.bank is None and not out.path.exists()
    state_path = tmp_path / "part.safetensors.state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["step"] == 2 and state["inputs"] == "merge-A"
    assert state["config"] == asdict(part.cfg) and state["digest"] == state_digest(state)
    assert state["bank"].keys() == part.updates[2].keys()
    assert all(torch.equal(state["bank"][k], v) for k, v in part.updates[2].items())
    monkeypatch.setenv("SURGERY_EDGE_QUIET", "0")
    capsys.readouterr()
    log = tmp_path / "resumed.jsonl"
    resumed = _Fit(tmp_path, 5, case, out, settings=every, resume=True, metrics=log)
    assert resumed.steps == [2, 3, 4] and resumed.said == []
    assert resumed.losses == full.losses[2:]
    assert _same(resumed.bank, full.bank)
    assert sorted(resumed.updates) == [3, 4, 5]
    assert read_metrics(log)[0]["first_step"] == 2
    assert not state_path.exists()
    first, *_, last = capsys.readouterr().err.splitlines()
    assert first.startswith("surgery rank 4  0/3  0%  elapsed ")
    assert last.startswith("surgery rank 4  3/3  100%  elapsed ")
    assert last.endswith(f"  done  loss {resumed.losses[-1]:.4g}")


def test_the_progress_line_names_the_reference_schedule(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SURGERY_EDGE_QUIET", "0")
    fit = _Fit(tmp_path, 1, _cached(), settings={"schedule": "reference"})
    first, *_, last = capsys.readouterr().err.splitlines()
    assert first.startswith("surgery rank 4 (reference schedule)  0/3  0%  elapsed ")
    assert last.endswith(f"  done  loss {fit.losses[-1]:.4g}") and "3/3  100%" in last


def test_a_checkpoint_is_read_only_when_resuming(tmp_path):
    """Without ``resume`` a checkpoint beside the output is not read (training starts at step
    0) and is removed at the end; ``resume`` with no checkpoint starts at step 0, silently."""
    case, every = _cached(), {"checkpoint_every": 2}
    fresh = _Fit(tmp_path, 4, case, "fresh.safetensors")
    _Fit(tmp_path, 4, case, "part.safetensors", stop_after=2, settings=every)
    state = tmp_path / "part.safetensors.state.pt"
    assert state.exists()
    again = _Fit(tmp_path, 4, case, "part.safetensors", settings=every)
    assert again.steps == [0, 1, 2, 3] and again.losses == fresh.losses and again.said == []
    assert not state.exists()
    new = _Fit(tmp_path, 4, case, "new.safetensors", resume=True)
    assert new.steps == [0, 1, 2, 3] and new.said == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run of 5 steps stopped after 3 (its checkpoint: step 2), and an uninterrupted one."""
    tmp = tmp_path_factory.mktemp("checkpoint")
    case = _cached()
    fresh = _Fit(tmp, 5, case, "fresh.safetensors")
    _Fit(tmp, 5, case, "part.safetensors", stop_after=2, settings={"checkpoint_every": 2})
    return case, torch.load(tmp / "part.safetensors.state.pt", weights_only=True), fresh


class _Opens:
    """A pickle that runs code when it is loaded: it creates the file ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _sealed(change):
    """``change`` applied to a checkpoint, which is then sealed with its new digest (as
    someone who edits it with this code at hand would)."""

    def forge(state, tmp_path):
        change(state)
        state["digest"] = state_digest(state)
        return state

    return forge


def _set(key, value):
    return _sealed(lambda s: s.update({key: value}))


def _set_bank(value):
    return _sealed(lambda s: s["bank"].update({"up.final": value(s["bank"]["up.final"])}))


def _edited(state, tmp_path):
    state["bank"]["up.final"] += 1e-3  # finite, plausible, not what was saved
    return state


REFUSED = {
    "code": (lambda s, tmp: _Opens(tmp / "ran"), "it is unreadable (UnpicklingError)"),
    "a list": (lambda s, tmp: [s], "it is not a surgery training checkpoint"),
    "no optimiser": (_sealed(lambda s: s.pop("opt")), "it is not a surgery training checkpoint"),
    "earlier version": (
        lambda s, tmp: {k: v for k, v in s.items() if k not in ("digest", "inputs")},
        "it records no digest of its content (written by an earlier version)",
    ),
    "edited": (
        _edited,
        "its content does not match the digest it was saved with: it was damaged or edited "
        "since, and training from it could go anywhere",
    ),
    "other lr": (
        _sealed(lambda s: s["config"].update(lr=0.5)),
        "it was written with other settings ({'method': 'surgery', 'rank': 4, 'steps': 5, "
        "'batch_size': 3, 'lr': 0.5, 'seed': 0, 'checkpoint_every': 2, 'schedule': 'joint'})",
    ),
    "other inputs": (
        _set("inputs", "merge-B"),
        "it was written for another merged model, other targets or another data split",
    ),
    "nan adapters": (
        _set_bank(lambda up: torch.full_like(up, float("nan"))),
        "its contents do not fit these adapters (ValueError)",
    ),
    "other shape": (
        _set_bank(lambda up: up[:, :2]),
        "its contents do not fit these adapters (RuntimeError)",
    ),
    **{
        f"step {step!r}": (_set("step", step), f"it records an impossible step {step!r}")
        for step in (0, -1, 5, 10**6, True, 2.0, "2")
    },
}


@pytest.mark.parametrize("damage", REFUSED)
def test_a_checkpoint_that_cannot_be_trusted_is_not_resumed(tmp_path, checkpoint, damage):
    """Resuming from it starts again at step 0, with the adapters a fresh run ends with, and
    says why; a checkpoint that carries code never runs it."""
    case, state, fresh = checkpoint
    forge, why = REFUSED[damage]
    path = tmp_path / "part.safetensors.state.pt"
    torch.save(forge(copy.deepcopy(state), tmp_path), path)
    resumed = _Fit(tmp_path, 5, case, "part.safetensors", resume=True)
    assert resumed.said == [f"not resuming from {path}: {why}; training from step 0."]
    assert resumed.steps == [0, 1, 2, 3, 4] and resumed.losses == fresh.losses
    assert _same(resumed.bank, fresh.bank)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("step", [1, 4])
def test_a_checkpoint_at_any_step_before_the_last_is_resumed(tmp_path, checkpoint, step):
    case, state, _ = checkpoint
    path = tmp_path / "r.safetensors.state.pt"
    torch.save(_set("step", step)(copy.deepcopy(state), tmp_path), path)
    resumed = _Fit(tmp_path, 5, case, "r.safetensors", resume=True)
    assert resumed.steps == list(range(step, 5)) and resumed.said == []


def test_the_checkpoint_digest_covers_every_value_and_nothing_else():
    def state():
        return {
            "bank": {"final.up": torch.arange(6.0).reshape(2, 3)},
            "opt": {
                "state": {0: {"step": torch.tensor(3.0)}, 11: {}},
                "param_groups": [{"lr": 0.01, "params": [0, 11]}],
            },
            "step": 2,
            "config": {"method": "surgery", "lr": 0.01},
            "inputs": None,
        }

    def up(s):
        return s["bank"]["final.up"]

    base = state_digest(state())
    assert base == state_digest({**state(), "digest": "its own entry is left out"})
    assert base == state_digest(dict(reversed(state().items())))  # key order does not matter
    changes = {
        "one number": lambda s: up(s).view(-1)[4].add_(1e-3),
        "the dtype": lambda s: s["bank"].update({"final.up": up(s).double()}),
        "the shape": lambda s: s["bank"].update({"final.up": up(s).reshape(3, 2)}),
        "a list's length": lambda s: s["opt"]["param_groups"][0]["params"].append(12),
        "a number in a list": lambda s: s["opt"]["param_groups"][0].update(lr=0.02),
        "a key": lambda s: s["opt"]["state"].update({12: s["opt"]["state"].pop(11)}),
        "a scalar tensor": lambda s: s["opt"]["state"][0]["step"].add_(1),
        "the step": lambda s: s.update(step=3),
        "the inputs": lambda s: s.update(inputs="merge-A"),
        "a string for a number": lambda s: s["config"].update(lr="0.01"),
    }
    digests = {base}
    for change in changes.values():
        s = state()
        change(s)
        digests.add(state_digest(s))
    assert len(digests) == len(changes) + 1
    assert state_digest({0: 1, "a": 2}) != state_digest({0: 1, "a": 3})  # keys of mixed types


def test_a_last_update_that_makes_the_adapters_non_finite_publishes_nothing(tmp_path):
    """The loss was finite, the update after it was not: no adapters are written; the last
    finite ones (those step 1 used) go beside the output, marked incomplete, without the
    fingerprint that would let a later run reuse them, and the error says where and what to
    do."""
    extra = {"fingerprint": "f", "provenance": {"seed": 0}}
    out = AdapterOutput(tmp_path / "v1.safetensors", {"method": "ties"}, extra)
    with pytest.raises(TrainingError) as e:
        _Fit(tmp_path, 2, _cached(), out, poison=2)
    last = last_good_path(out.path)
    message = str(e.value)
    assert message.startswith("The last update of step 1 made the adapters non-finite. ")
    assert f"Nothing was written to {out.path}. " in message
    assert f"(as they were at step 1) were saved to {last} for inspection" in message
    assert message.endswith("Lower the learning rate (--lr, now 0.01).")
    assert sorted(p.name for p in tmp_path.iterdir()) == [last.name]
    bank, meta = AdapterBank.load(last)
    assert meta["complete"] is False and meta["last_finite_step"] == 1
    assert meta["merge_recipe"] == {"method": "ties"} and meta["provenance"] == {"seed": 0}
    assert "fingerprint" not in meta
    assert _same(bank, _Fit(tmp_path, 1, _cached(), "one-step.safetensors").bank)


@pytest.mark.parametrize("rows", [range(N_CACHED), [3]], ids=["at step 0", "later"])
def test_a_nan_loss_stops_and_says_what_to_do(tmp_path, rows):
    """A NaN target row stops training at the first step that draws it; the error says which
    step, where the last good adapters are (none when it is step 0) and what to change."""
    targets, finals = _cached()
    targets["b"].final[list(rows)] = np.nan
    cfg = _cached_cfg(20)
    stop = next(s for s in range(20) if set(schedule_draws(cfg, s, [N_CACHED] * 3)[1][1]) & {*rows})
    with pytest.raises(TrainingError) as e:
        _Fit(tmp_path, 20, (targets, finals))
    out, last = tmp_path / "v1.safetensors", last_good_path(tmp_path / "v1.safetensors")
    kept = (
        " No step of this run gave a finite loss, so there are no good adapters."
        if stop == 0
        else f" The last adapters that gave a finite loss (as they were at step {stop - 1}) were "
        f"saved to {last} for inspection; they are marked incomplete and never reused."
    )
    assert str(e.value) == (
        f"Surgery loss became nan at step {stop}. Nothing was written to {out}.{kept} Lower the "
        "learning rate (--lr, now 0.01) or check the expert checkpoints and images for NaNs."
    )
    assert last.exists() == (stop > 0) and not out.exists()


def test_a_batch_smaller_than_the_ranks_is_refused_before_training(tmp_path):
    world = World(0, 3, 0, torch.device("cpu"), "gloo")  # refused before any exchange
    with pytest.raises(ConfigError, match="^The batch size per task is 2, smaller than the 3 "):
        _Fit(tmp_path, 1, _cached(), settings={"batch_size": 2}, world=world)
    assert list(tmp_path.iterdir()) == []


def _rank(rank: int, tmp_path, case) -> None:
    """One rank of a job of two CPU processes (gloo): resume the checkpoint beside
    ``two.safetensors`` and keep what this rank heard in ``rank<r>.pt``."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a shared CPU: one thread each
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    dist.init_process_group(
        "gloo", init_method=rendezvous, rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        world = World(rank, 2, 0, torch.device("cpu"), "gloo")
        metrics = tmp_path / f"rank{rank}.jsonl"
        fit = _Fit(tmp_path, 5, case, "two.safetensors", resume=True, world=world, metrics=metrics)
        heard = {"steps": fit.steps, "losses": fit.losses, "said": fit.said}
        torch.save({**heard, "bank": fit.bank.state_dict()}, tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_resume_as_one_process_does(tmp_path, checkpoint):
    """Two processes resumed from one checkpoint: the writer reads it and sends it to the other
    rank; each rank trains on its share of every batch and both end with the losses, the
    per-task losses and the adapters of one process resumed from it. Only the writer writes."""
    case, state, _ = checkpoint
    for name in ("one", "two"):
        torch.save(state, tmp_path / f"{name}.safetensors.state.pt")
    one = _Fit(tmp_path, 5, case, "one.safetensors", resume=True, metrics=tmp_path / "one.jsonl")
    # from a fork server that has imported torch and this module once (seconds, not the tens of
    # seconds of two fresh interpreters): a plain fork of this process fails in autograd once an
    # earlier test on the same pytest worker has used autograd's threads
    import multiprocessing

    multiprocessing.set_forkserver_preload(["torch", _rank.__module__])
    torch.multiprocessing.start_processes(_rank, (tmp_path, case), 2, start_method="forkserver")
    heard = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in heard:
        assert rank["steps"] == one.steps == [2, 3, 4] and rank["said"] == []
        np.testing.assert_allclose(rank["losses"], one.losses, rtol=1e-5)
        for key, value in one.bank.state_dict().items():
            torch.testing.assert_close(rank["bank"][key], value, rtol=1e-5, atol=1e-6)
    (start, *rows), (_, *one_rows) = (
        read_metrics(tmp_path / f) for f in ("rank0.jsonl", "one.jsonl")
    )
    assert start["first_step"] == 2 and [r["step"] for r in rows] == [2, 3, 4]
    for row, want in zip(rows, one_rows, strict=True):
        assert row["loss_per_task"] == pytest.approx(want["loss_per_task"], rel=1e-5)
    saved, _ = AdapterBank.load(tmp_path / "two.safetensors")
    assert all(torch.equal(a, heard[0]["bank"][k]) for k, a in saved.state_dict().items())
    names = {p.name for p in tmp_path.iterdir()}
    assert "rank1.jsonl" not in names and "two.safetensors.state.pt" not in names

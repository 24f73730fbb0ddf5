import numpy as np
import pytest

from surgery_edge.data.suite import (
    TASK_NAMES,
    _digit_pools,
    generate_suite,
    load_suite,
    pretraining_corpus,
    save_suite,
)
from surgery_edge.errors import ConfigError


def test_eight_distinct_tasks():
    assert len(TASK_NAMES) == 8 and len(set(TASK_NAMES)) == 8


def test_suite_is_deterministic_for_a_seed():
    a = generate_suite(seed=3, n_train=12, n_adapt=4, n_test=6)
    b = generate_suite(seed=3, n_train=12, n_adapt=4, n_test=6)
    c = generate_suite(seed=4, n_train=12, n_adapt=4, n_test=6)
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
        assert np.array_equal(ta.train_x, tb.train_x) and np.array_equal(ta.test_y, tb.test_y)
        assert not np.array_equal(ta.train_x, tc.train_x)
        assert ta.train_x.shape == (12, 32, 32, 3) and ta.train_x.dtype == np.uint8
        assert set(np.unique(ta.train_y)) <= set(range(ta.num_classes))


def test_splits_are_disjoint():
    s = generate_suite(seed=0, n_train=20, n_adapt=20, n_test=20, tasks=["shapes"])
    t = s.tasks[0]
    flat = lambda x: {a.tobytes() for a in x}  # noqa: E731
    assert not flat(t.train_x) & flat(t.test_x) and not flat(t.adapt_x) & flat(t.test_x)
    pools = _digit_pools()  # digit scans: disjoint pools per split
    as_set = lambda p: {x.tobytes() for x in p[0]}  # noqa: E731
    assert not as_set(pools["train"]) & as_set(pools["test"])
    assert not as_set(pools["adapt"]) & as_set(pools["test"])


def test_round_trip_and_unknown_task(tmp_path):
    s = generate_suite(seed=0, n_train=10, n_adapt=10, n_test=10, tasks=["colours", "signs"])
    back = load_suite(save_suite(s, tmp_path / "s.npz"))
    assert back.task_names == ["colours", "signs"]
    assert np.array_equal(back.tasks[1].test_x, s.tasks[1].test_x)
    with pytest.raises(ConfigError, match="nope.*digits"):
        generate_suite(tasks=["nope"])


def test_pretraining_corpus_carries_no_task_labels():
    corpus = pretraining_corpus(seed=0, n_per_source=5)
    assert set(vars(corpus)) == {"images", "sources", "letters"}
    assert len(corpus.images) == len(corpus.sources) == 8 * 5 + 10
    assert (corpus.letters[:40] == -1).all() and (corpus.letters[40:] >= 0).all()

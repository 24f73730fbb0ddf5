"""The merge-method registry: what registering declares, the help line a user reads and the
errors a bad parameter gets (the methods themselves are tested in test_merging.py)."""

from __future__ import annotations

import pytest

from surgery_edge.errors import ConfigError
from surgery_edge.merging import registry
from surgery_edge.merging.registry import MergeSpec, Param, register

K = Param("k", 0.2, "fraction kept", low=0, low_open=True, high=1)
LAM = Param("lam", 0.3, "scaling")


def _method(pretrained, experts, *, context=None, **params):
    """Adds nothing: returns its parameters.

    More lines that the summary leaves out."""
    return params


@pytest.fixture
def methods(monkeypatch):
    """The registry's dict, emptied for the test and restored after it."""
    monkeypatch.setattr(registry, "MERGE_METHODS", {})
    return registry.MERGE_METHODS


def test_a_registered_function_or_class_is_looked_up_with_its_declarations(methods):
    assert register("plain", params=(K,))(_method) is _method
    spec = registry.get("plain")
    assert spec == MergeSpec("plain", _method, (K,), False)  # learns from no data by default

    created = []

    class Learned:
        """Learns its coefficients."""

        def __init__(self):
            created.append(self)

        def __call__(self, pretrained, experts, *, context=None):
            return context

    assert register("learned", needs_data=True)(Learned) is Learned
    learned = registry.get("learned")
    assert learned.name == "learned" and learned.needs_data is True
    assert len(created) == 1 and learned.fn is created[0]  # instantiated once
    assert learned({}, {}, context="ctx") == "ctx"
    assert registry.available() == ["learned", "plain"]
    with pytest.raises(ValueError, match="'plain' is already registered"):
        register("plain")(_method)
    with pytest.raises(
        ConfigError, match=r"Unknown merge method 'none'\. Known methods: learned, plain\."
    ):
        registry.get("none")


def test_the_help_line_names_the_parameters_their_bounds_and_the_data():
    assert K.describe() == "k=0.2 (fraction kept, (0, 1])"
    assert LAM.describe() == "lam=0.3 (scaling)"
    spec = MergeSpec("ties", _method, (K, LAM))
    assert spec.describe() == (
        "ties: Adds nothing: returns its parameters. Parameters: k=0.2 (fraction kept, (0, 1]); "
        "lam=0.3 (scaling)."
    )
    learned = MergeSpec("ada", _method, (), needs_data=True)
    assert learned.describe() == (
        "ada: Adds nothing: returns its parameters. Learns from the unlabelled adaptation "
        "images. No parameters."
    )
    assert MergeSpec("bare", lambda *a, **k: None).describe() == "bare: bare No parameters."


def test_parameters_are_filled_in_checked_and_unknown_ones_named():
    spec = MergeSpec("ties", _method, (K, LAM))
    assert spec({}, {}) == {"k": 0.2, "lam": 0.3}
    assert spec({}, {}, lam=2) == {"k": 0.2, "lam": 2.0}
    with pytest.raises(ConfigError) as e:
        spec.resolve({"kk": 1, "lambda": 2})
    assert str(e.value) == (
        "Merge method 'ties' got unknown parameter(s) 'kk', 'lambda'; it accepts: k, lam. "
        "Remove or rename the parameter."
    )
    with pytest.raises(ConfigError, match="it accepts: no parameters"):
        MergeSpec("plain", _method).resolve({"k": 1})
    with pytest.raises(ConfigError) as e:
        spec.resolve({"k": 0})
    assert str(e.value) == (
        "Merge method 'ties': parameter 'k' (fraction kept) must be in (0, 1], got 0.0."
    )

"""The merge-method registry: one decorator, one dict, one lookup."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from surgery_edge.errors import ConfigError
from surgery_edge.merging.base import MergeMethod

MERGE_METHODS: dict[str, MergeMethod] = {}

_T = TypeVar("_T", bound=Callable)


def register(name: str) -> Callable[[_T], _T]:
    """Decorator registering a merge method under ``name``.

    A function is registered as is; a class is instantiated once (without arguments) and the
    instance is registered. The decorated object is returned unchanged.

    Raises:
        ValueError: if ``name`` is already taken (a programming error).
    """

    def decorator(obj: _T) -> _T:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        MERGE_METHODS[name] = obj() if isinstance(obj, type) else obj
        return obj

    return decorator


def get(name: str) -> MergeMethod:
    """The merge method registered under ``name``.

    Raises:
        ConfigError: if no method has that name; the message lists the known methods.
    """
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown merge method {name!r}. Known methods: {', '.join(available())}."
        ) from None


def available() -> list[str]:
    """Names of all registered merge methods, sorted."""
    return sorted(MERGE_METHODS)

"""The merge-method registry: one decorator, one dict, one lookup; the single source of truth.

Each method declares, where it is defined, its parameters (default, bounds, help) and whether
it learns from unlabelled data::

    @register("ties_merging", params=(Param("k", 0.2, "fraction kept", low=0, low_open=True,
                                            high=1), Param("lam", 0.3, "scaling")))
    def ties_merging(pretrained, experts, *, context=None, k, lam): ...

The run configuration (``merge.params``), the CLI (``--param``) and its help, and the merged
checkpoint's recipe all read those declarations; a method receives its parameters already
filled in and checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from surgery_edge.errors import ConfigError
from surgery_edge.merging.base import AdaMergingContext, MergeResult, StateDict


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    Args:
        name: the keyword the method takes.
        default: its value when none is given (an ``int`` default makes it an integer).
        help: what it means, in a few words.
        low, high: bounds; ``low`` is excluded when ``low_open``, ``high`` is included.
    """

    name: str
    default: float | int
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    @property
    def integer(self) -> bool:
        return isinstance(self.default, int) and not isinstance(self.default, bool)

    @property
    def bounds(self) -> str:
        """The admissible range, e.g. ``(0, 1]`` or ``>= 1``; empty when unbounded."""
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"<= {self.high:g}"
        return ""

    def check(self, method: str, value: Any) -> float | int:
        """``value`` as this parameter's type; ConfigError naming the method and the value."""
        where = f"Merge method {method!r}: parameter {self.name!r} ({self.help})"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}.")
        if self.integer:
            if value != int(value):
                raise ConfigError(f"{where} must be an integer, got {value!r}.")
            value = int(value)
        else:
            value = float(value)
        too_low = self.low is not None and (
            value <= self.low if self.low_open else value < self.low
        )
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise ConfigError(f"{where} must be in {self.bounds}, got {value!r}.")
        return value

    def describe(self) -> str:
        bounds = f", {self.bounds}" if self.bounds else ""
        return f"{self.name}={self.default:g} ({self.help}{bounds})"


@dataclass(frozen=True)
class MergeSpec:
    """A registered merge method: call it like the function it wraps.

    ``spec(pretrained, experts, context=..., **params)`` fills in the defaults, checks every
    parameter and calls the method with all of them.
    """

    name: str
    fn: Callable[..., MergeResult]
    params: tuple[Param, ...] = ()
    needs_data: bool = False  # learns from unlabelled images: needs an AdaMergingContext

    @property
    def summary(self) -> str:
        """The first line of the method's docstring."""
        return (self.fn.__doc__ or self.name).strip().splitlines()[0]

    def resolve(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every parameter, defaults filled in, each checked; unknown names are refused."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            accepted = ", ".join(known) if known else "no parameters"
            raise ConfigError(
                f"Merge method {self.name!r} got unknown parameter(s) "
                f"{', '.join(map(repr, unknown))}; it accepts: {accepted}. Remove or rename the "
                "parameter."
            )
        return {n: p.check(self.name, given.get(n, p.default)) for n, p in known.items()}

    def describe(self) -> str:
        """One line for help texts: the name, what it does and its parameters."""
        params = "; ".join(p.describe() for p in self.params)
        data = " Learns from the unlabelled adaptation images." if self.needs_data else ""
        return f"{self.name}: {self.summary}{data} " + (
            f"Parameters: {params}." if params else "No parameters."
        )

    def __call__(
        self,
        pretrained: StateDict,
        experts: Mapping[str, StateDict],
        *,
        context: AdaMergingContext | None = None,
        **params: Any,
    ) -> MergeResult:
        return self.fn(pretrained, experts, context=context, **self.resolve(params))


MERGE_METHODS: dict[str, MergeSpec] = {}

_F = TypeVar("_F", bound=Callable[..., MergeResult])


def register(
    name: str, *, params: tuple[Param, ...] = (), needs_data: bool = False
) -> Callable[[_F], _F]:
    """Decorator registering a merge method under ``name`` with its parameters.

    The method is called as ``fn(pretrained, experts, *, context, **params)`` with every
    declared parameter. A function is registered as is; a class is instantiated once (without
    arguments) and the instance is registered. The decorated object is returned unchanged.

    Raises:
        ValueError: if ``name`` is already taken (a programming error).
    """

    def decorator(fn: _F) -> _F:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        method = fn() if isinstance(fn, type) else fn
        MERGE_METHODS[name] = MergeSpec(name, method, tuple(params), needs_data)
        return fn

    return decorator


def get(name: str) -> MergeSpec:
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

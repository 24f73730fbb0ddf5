"""The surgery-method registry: what each method corrects, and its defaults.

The single source of truth for the names ``surgery`` and ``surgeryv2``: the config, the CLI
(choices and help), the trainer, the adapter files, export and the report read them here. So
are the names of the engines made from them (``surgery-all-tasks``, ``surgeryv2-routed``,
``merged-routed``, ``single-expert``: :func:`engine_name`, :func:`method_engines`); a test
(``tests/test_contract.py``) fails where such a name is written out elsewhere. It imports
neither torch nor the models, so the CLI can list the choices without loading either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery_edge.engine_format import EngineMode
from surgery_edge.errors import ConfigError

if TYPE_CHECKING:
    from surgery_edge.models.archs import ArchSpec

NONE = "none"  # no surgery: the plain merged model (a baseline row, an engine without adapters)
SURGERY = "surgery"  # Representation Surgery (V1)
SURGERY_V2 = "surgeryv2"
MERGED = "merged"  # an engine's name without surgery: merged-<mode>
SINGLE_EXPERT = "single-expert"  # the engine of one task's expert alone: the baseline

# How training orders its updates (surgery_edge.surgery.trainer has the details).
SCHEDULES = {
    "joint": "one Adam step per batch of every task, all tasks in one routed pass",
    "reference": "the authors' loop: per task two batches, one Adam step each, torch 1.10 "
    "zero_grad (momentum moves every adapter at every step)",
}


@dataclass(frozen=True)
class SurgeryMethod:
    """One surgery method.

    Args:
        name: as written in configs, adapter files and engine metadata.
        label: as printed in reports.
        every_block: corrects every block's output (all tokens) besides the final feature.
        rank: the default adapter rank.
        steps: the default number of batches of each task that training takes (one step each
            in the joint schedule, which draws one batch of every task per step).
        help: one line for help texts.
        engine_mode: the mode its engine is made in: V1 answers every task from one backbone
            pass (all-tasks), V2 corrects every block for one task per image (routed).
    """

    name: str
    label: str
    every_block: bool
    rank: int
    steps: int
    help: str
    engine_mode: EngineMode

    def sites(self, arch: ArchSpec) -> tuple[str, ...]:
        """The sites it corrects: ``final``, or every ``block.i`` and ``final``."""
        return arch.sites if self.every_block else ("final",)


SURGERY_METHODS: dict[str, SurgeryMethod] = {}


def register(method: SurgeryMethod) -> SurgeryMethod:
    if method.name in SURGERY_METHODS or method.name == NONE:
        raise ValueError(f"surgery method {method.name!r} is already registered")
    SURGERY_METHODS[method.name] = method
    return method


# The defaults are the reference code's: rank 16, 1,000 steps of batch 16 per task.
register(
    SurgeryMethod(
        SURGERY,
        "Surgery",
        every_block=False,
        rank=16,
        steps=1000,
        help="Representation Surgery (ICML 2024): one adapter on the final feature",
        engine_mode=EngineMode.ALL_TASKS,
    )
)
register(
    SurgeryMethod(
        SURGERY_V2,
        "SurgeryV2",
        every_block=True,
        rank=16,
        steps=1000,
        help="SurgeryV2: an adapter on every block's output and on the final feature",
        engine_mode=EngineMode.ROUTED,
    )
)


def get_surgery(name: str) -> SurgeryMethod:
    """The method called ``name``; ConfigError listing the known ones otherwise."""
    try:
        return SURGERY_METHODS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown surgery method {name!r}; use one of {surgery_names()}."
        ) from None


def surgery_names(with_none: bool = False) -> list[str]:
    """The registered names, in registration order (``none`` first when asked)."""
    return ([NONE] if with_none else []) + list(SURGERY_METHODS)


def check_surgery(name: str, allow_none: bool = False) -> str:
    """``name`` if it is a method (or ``none`` where allowed); ConfigError otherwise."""
    if allow_none and name == NONE:
        return name
    if name not in SURGERY_METHODS:
        raise ConfigError(
            f"Unknown surgery method {name!r}; use one of {surgery_names(allow_none)}."
        )
    return name


def engine_name(method: str | None, mode: EngineMode | None = None) -> str:
    """An engine's name in the demo and the benchmarks: ``<method>-<mode>`` (``mode``: the
    method's :attr:`~SurgeryMethod.engine_mode` when not given), ``merged-<mode>`` without
    surgery (``method`` None or ``none``)."""
    if method is None or method == NONE:
        if mode is None:
            raise ValueError("an engine without surgery needs its mode")
        return f"{MERGED}-{mode.value}"
    mode = mode or get_surgery(method).engine_mode
    return f"{method}-{mode.value}"


def method_engines() -> dict[str, tuple[str, EngineMode]]:
    """``{engine name: (surgery method, mode)}``: each method's engine, in registration order
    (``surgery-all-tasks``, ``surgeryv2-routed``)."""
    return {engine_name(m.name): (m.name, m.engine_mode) for m in SURGERY_METHODS.values()}

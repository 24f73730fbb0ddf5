"""Surgery training's settings, checked as they are made, and the part of them that shapes the
adapters (what an adapter file's provenance records).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from surgery_edge.errors import ConfigError
from surgery_edge.surgery.methods import SCHEDULES, SURGERY_V2, get_surgery


@dataclass(frozen=True)
class SurgeryConfig:
    """Training settings; the defaults are the reference code's."""

    method: str = SURGERY_V2  # a registered surgery method (surgery_edge.surgery.methods)
    rank: int = 16
    steps: int = 1000  # per task: each step draws one batch of every task
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 100
    schedule: str = "joint"  # one of SCHEDULES

    def __post_init__(self):
        """Every setting checked at once, as a ConfigError naming the setting and the value."""
        get_surgery(self.method)  # ConfigError listing the methods
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"Surgery setting schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}."
            )
        _check_int("rank", self.rank, 1, 1 << 14)
        _check_int("steps", self.steps, 1, 10**9)
        _check_int("batch_size", self.batch_size, 1, 1 << 16)
        _check_int("seed", self.seed, 0, 2**32 - 1)
        _check_int("checkpoint_every", self.checkpoint_every, 0, 10**9)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ConfigError(f"Surgery setting lr must be a finite number, got {lr!r}.")
        if lr <= 0:
            raise ConfigError(f"Surgery setting lr must be greater than 0, got {lr!r}.")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"Surgery setting {name} must be an integer from {low} to {high}, got {value!r}."
        )


def shaping(settings: dict) -> dict:
    """The settings that shape the adapters (how often they are checkpointed does not)."""
    return {k: v for k, v in settings.items() if k != "checkpoint_every"}


def training_settings(cfg: SurgeryConfig) -> dict:
    """``cfg`` as the adapters' provenance records it. The default ``joint`` schedule is left
    out, so adapters written before schedules existed (all joint) still match their settings."""
    settings = shaping(asdict(cfg))
    if settings["schedule"] == "joint":
        del settings["schedule"]
    return settings

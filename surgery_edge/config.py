"""Run configuration: a frozen pydantic model, loadable from YAML, with the demo's defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from surgery_edge.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SuiteSettings(_Frozen):
    seed: int = 0
    n_train: int = Field(2000, ge=10)
    n_adapt: int = Field(400, ge=10)
    n_test: int = Field(500, ge=10)
    tasks: list[str] | None = None


class ExpertSettings(_Frozen):
    pretrain_n_per_source: int = 1000
    pretrain_epochs: int = 3
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 64


class MergeSettings(_Frozen):
    methods: list[str] = [
        "weight_averaging",
        "task_arithmetic",
        "ties_merging",
        "adamerging_taskwise",
        "adamerging_layerwise",
    ]
    task_arithmetic_lam: float = 0.3
    ties_k: float = 0.2
    ties_lam: float = 0.3
    adamerging_steps: int = 100
    adamerging_batch_size: int = 16
    adamerging_lr: float = 1e-3


class SurgerySettings(_Frozen):
    methods: list[Literal["surgery", "surgeryv2"]] = ["surgery", "surgeryv2"]
    rank: int = Field(16, ge=1)
    steps_v1: int = Field(1000, ge=1)
    steps_v2: int = Field(500, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = 1e-3
    transductive: bool = False


class RunConfig(_Frozen):
    """Everything ``surgery-edge demo`` / ``run`` needs; every field has the demo's default."""

    arch: str = "tiny-vit-32"
    seed: int = 0
    device: str = "auto"
    suite: SuiteSettings = SuiteSettings()
    experts: ExpertSettings = ExpertSettings()
    merge: MergeSettings = MergeSettings()
    surgery: SurgerySettings = SurgerySettings()


def load_config(path: str | Path) -> RunConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return RunConfig.model_validate(data)
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigError(f"Config file {path} is invalid:\n{e}") from None

"""The metadata of every checkpoint file this project writes, validated field by field.

Each ``.safetensors`` file carries a JSON object under ``surgery_edge`` (see
:mod:`~surgery_edge.models.checkpoint`). These pydantic models say what each kind must hold, so a
malformed field (a rank that is not an integer, ``tasks`` that is not a list, a missing ``arch``)
becomes one error that names the file and the field, never a KeyError or TypeError later.

Unknown fields are kept (``extra="allow"``): provenance records and recipes grow over versions.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from surgery_edge.errors import CheckpointError, SurgeryEdgeError

# Bounds that no real ViT reaches: a lying header must not make the loader build a giant model.
_MAX_WIDTH, _MAX_LAYERS, _MAX_IMAGE = 16384, 256, 4096


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ArchFields(BaseModel):
    """An :class:`~surgery_edge.models.archs.ArchSpec` as stored: every field typed and bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(min_length=1, max_length=200)
    image_size: StrictInt = Field(ge=1, le=_MAX_IMAGE)
    patch_size: StrictInt = Field(ge=1, le=_MAX_IMAGE)
    width: StrictInt = Field(ge=1, le=_MAX_WIDTH)
    layers: StrictInt = Field(ge=1, le=_MAX_LAYERS)
    heads: StrictInt = Field(ge=1, le=_MAX_WIDTH)
    mlp_ratio: StrictFloat | StrictInt = Field(gt=0, le=64)
    embed_dim: StrictInt = Field(ge=1, le=_MAX_WIDTH)
    quick_gelu: StrictBool = False
    mean: tuple[StrictFloat | StrictInt, StrictFloat | StrictInt, StrictFloat | StrictInt] = (
        0.48145466,
        0.4578275,
        0.40821073,
    )
    std: tuple[StrictFloat | StrictInt, StrictFloat | StrictInt, StrictFloat | StrictInt] = (
        0.26862954,
        0.26130258,
        0.27577711,
    )

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, v):
        if not all(math.isfinite(x) for x in v):
            raise ValueError("must be three finite numbers")
        return v

    @model_validator(mode="after")
    def _geometry(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if min(self.std) <= 0:
            raise ValueError("std must be positive")
        return self


class EncoderMeta(_Meta):
    kind: Literal["encoder"]
    arch: ArchFields
    task: StrictStr | None = None


class HeadMeta(_Meta):
    kind: Literal["head"]
    arch: ArchFields
    task: StrictStr | None = None
    class_names: list[StrictStr] = Field(min_length=1)
    normalize: StrictBool = True


class AdapterMeta(_Meta):
    kind: Literal["adapters"]
    method: StrictStr
    rank: StrictInt = Field(ge=1, le=_MAX_WIDTH)
    arch: ArchFields
    tasks: list[StrictStr] = Field(min_length=1)
    sites: list[StrictStr] | None = None
    merge_recipe: dict[str, Any] = {}
    complete: StrictBool = True  # False: the last good adapters of a run that stopped early

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks):
        if len(set(tasks)) != len(tasks):
            raise ValueError("task names repeat")
        return tasks


M = TypeVar("M", bound=BaseModel)


def describe_errors(e: ValidationError) -> str:
    """pydantic's errors as ``field: message (got value)``, joined by ``;``."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        got = repr(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        parts.append(f"{where}: {err['msg']} (got {got})")
    return "; ".join(parts)


def parse_meta(
    model: type[M],
    meta: Any,
    path: str | os.PathLike,
    error: type[SurgeryEdgeError] = CheckpointError,
    hint: str = "Re-create the file with surgery-edge.",
) -> M:
    """``meta`` (read from ``path``) validated as ``model``; ``error`` naming file and fields."""
    try:
        return model.model_validate(meta)
    except ValidationError as e:
        raise error(f"{path} has malformed metadata: {describe_errors(e)}. {hint}") from None

"""An engine's preprocessing as its metadata records it: open_clip's eval transform.

Part of the engine format (:mod:`surgery_edge.engine_format`, which validates it with the rest
of the metadata); standard library only. The runtime reproduces it with numpy and Pillow
(:mod:`surgery_edge.runtime.preprocess`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from surgery_edge.errors import ExportError

LEGACY_RESIZE = "bilinear-antialias"  # what engine format version 1 recorded
RESIZE_MODES = ("shortest", "squash")  # open_clip's resize_mode values the runtime reproduces
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """open_clip's eval transform, as the metadata records it.

    ``shortest``: resize the shorter side to ``image_size`` (the longer one keeps the aspect
    ratio), then centre-crop ``image_size`` square; ``squash``: resize to the square directly.
    Then RGB, scale to [0, 1], normalise with ``mean`` / ``std``, channels first.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest"
    interpolation: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "crop": "center" if self.resize == "shortest" else "none",
            "channels": "RGB",
            "scale": "1/255",
            "layout": "NCHW",
        }

    @classmethod
    def from_dict(cls, d: Any, source: str | os.PathLike) -> Preprocessing:
        where = f"Engine metadata of {source}: preprocessing"
        if not isinstance(d, dict):
            raise ExportError(f"{where} is a {type(d).__name__}, not an object; re-export it.")
        if d.get("resize") == LEGACY_RESIZE:
            raise ExportError(
                f"Engine {source} was exported by surgery-edge 0.1 with a stretching bilinear "
                "resize, which is not the preprocessing its accuracy was measured with. Re-export "
                "it with `surgery-edge export` (the new engine resizes exactly as open_clip's "
                "eval transform, like the evaluation does)."
            )
        size = d.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ExportError(f"{where}.image_size must be a positive integer, got {size!r}.")
        stats = {}
        for key in ("mean", "std"):
            v = d.get(key)
            ok = isinstance(v, list) and len(v) == 3
            ok = ok and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in v
            )
            if not ok or (key == "std" and min(v) <= 0):
                raise ExportError(
                    f"{where}.{key} must be three finite numbers{' > 0' if key == 'std' else ''}"
                    f", got {v!r}; re-export the engine."
                )
            stats[key] = tuple(float(x) for x in v)
        resize, interp = d.get("resize", "shortest"), d.get("interpolation", "bicubic")
        if resize not in RESIZE_MODES:
            raise ExportError(f"{where}.resize {resize!r} is not one of {list(RESIZE_MODES)}.")
        if interp not in INTERPOLATIONS:
            raise ExportError(
                f"{where}.interpolation {interp!r} is not one of {list(INTERPOLATIONS)}."
            )
        return cls(size, stats["mean"], stats["std"], resize, interp)

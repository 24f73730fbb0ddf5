"""Procedural drawing on small RGB canvases (numpy, no dependencies beyond scikit-learn's digits).

Shapes are drawn as anti-aliased masks from signed polar / half-plane descriptions, so the same
code draws at any canvas size. Every function takes an ``np.random.Generator`` and is
deterministic given it.
"""

from __future__ import annotations

import math

import numpy as np

Array = np.ndarray

# Named hues (RGB in [0, 1]) used where colour is part of a task's question.
HUES: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.15, 0.75, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.12, 0.25, 0.95),
    "purple": (0.55, 0.15, 0.80),
    "pink": (0.98, 0.50, 0.75),
}


def grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates (y, x), each (size, size), in pixels."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(c, c, indexing="ij")


def random_colour(rng: np.random.Generator, lo: float = 0.0, hi: float = 1.0) -> Array:
    return rng.uniform(lo, hi, size=3).astype(np.float32)


def jitter_colour(rgb, rng: np.random.Generator, amount: float = 0.08) -> Array:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, amount, 3), 0, 1).astype(np.float32)


def _soft(signed_distance: Array) -> Array:
    """Anti-aliased coverage from a signed distance (positive inside), in pixels."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def polygon_mask(size: int, cy: float, cx: float, radius: float, sides: int, rot: float) -> Array:
    """A regular polygon (sides >= 3) of circumradius ``radius``; ``sides == 0`` draws a circle."""
    y, x = grid(size)
    dy, dx = y - cy, x - cx
    r = np.hypot(dy, dx)
    if sides == 0:
        return _soft(radius - r)
    theta = np.arctan2(dy, dx) - rot
    sector = 2 * math.pi / sides
    local = np.mod(theta, sector) - sector / 2
    edge = radius * math.cos(math.pi / sides) / np.cos(local)
    return _soft(edge - r)


def star_mask(size: int, cy: float, cx: float, radius: float, points: int, rot: float) -> Array:
    y, x = grid(size)
    dy, dx = y - cy, x - cx
    r = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx) - rot
    edge = radius * (0.55 + 0.45 * np.cos(points * theta))
    return _soft(edge - r)


def rect_mask(
    size: int, cy: float, cx: float, half_h: float, half_w: float, rot: float = 0.0
) -> Array:
    y, x = grid(size)
    dy, dx = y - cy, x - cx
    c, s = math.cos(rot), math.sin(rot)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return _soft(np.minimum(half_w - np.abs(u), half_h - np.abs(v)))


def cross_mask(size: int, cy: float, cx: float, radius: float, rot: float) -> Array:
    arm = max(radius * 0.32, 1.0)
    return np.maximum(
        rect_mask(size, cy, cx, arm, radius, rot), rect_mask(size, cy, cx, radius, arm, rot)
    )


def arrow_mask(size: int, cy: float, cx: float, length: float, angle: float) -> Array:
    """An arrow through (cy, cx) pointing along ``angle`` (radians, 0 = right, counter-clockwise
    with y pointing down on screen)."""
    y, x = grid(size)
    dy, dx = y - cy, x - cx
    c, s = math.cos(angle), math.sin(-angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # u along the arrow, v across it
    half = length / 2
    shaft = np.minimum(np.minimum(u + half, half * 0.25 - u), length * 0.09 - np.abs(v))
    head_len = length * 0.45
    tip = half
    # triangle head: between u in [tip - head_len, tip], |v| <= width shrinking to the tip
    head = np.minimum(u - (tip - head_len), (tip - u) * 0.9 - np.abs(v))
    return np.maximum(_soft(shaft), _soft(head))


def stripes(size: int, angle: float, period: float, phase: float) -> Array:
    y, x = grid(size)
    t = (x * math.cos(angle) + y * math.sin(angle)) / period + phase
    return (np.sin(2 * math.pi * t) > 0).astype(np.float32)


def composite(canvas: Array, mask: Array, rgb) -> Array:
    """Paint ``rgb`` over ``canvas`` (H, W, 3) with coverage ``mask`` (H, W)."""
    m = mask[..., None]
    return canvas * (1 - m) + np.asarray(rgb, np.float32) * m


def background(size: int, rng: np.random.Generator, noise: float = 0.04) -> Array:
    """A dark random colour with a gentle gradient and pixel noise (objects are drawn bright)."""
    base = random_colour(rng, 0.0, 0.4)
    y, x = grid(size)
    g = rng.normal(0, 0.08, 3).astype(np.float32)
    grad = (x / size - 0.5)[..., None] * g
    img = base + grad + rng.normal(0, noise, (size, size, 3)).astype(np.float32)
    return np.clip(img, 0, 1)


def contrasting_colour(bg_mean: Array, rng: np.random.Generator, min_dist: float = 0.45) -> Array:
    """A bright random colour at least ``min_dist`` (mean absolute difference) from ``bg_mean``."""
    for _ in range(50):
        c = random_colour(rng, 0.35, 1.0)
        if np.abs(c - bg_mean).sum() >= min_dist * 3 / 2:
            return c
    return (1.0 - bg_mean).astype(np.float32)


def to_uint8(img: Array) -> Array:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

"""The built-in offline suite: eight small image-classification tasks, generated from a seed.

No download: digits come from scikit-learn's bundled copy of the UCI handwritten digits (1,797
real 8x8 scans), everything else is rendered procedurally (:mod:`surgery_edge.data.render`).
The tasks differ in what they ask of the image (identity, shape, texture, colour, count,
direction, layered symbols) so that experts fine-tuned on them pull a shared backbone in
different directions, which is the interference that merging suffers from.

Each task has three disjoint splits:
- ``train``: labelled, for fine-tuning that task's expert;
- ``adapt``: unlabelled, the only data AdaMerging and surgery may learn from by default;
- ``test``: labelled, never seen in training (surgery's ``--transductive`` mode reads its
  images, without labels, as the paper does).
Digit-based tasks draw each split from a disjoint subset of the scanned digits, so a test digit
is never a re-rendering of a training scan.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from surgery_edge.data import render as R
from surgery_edge.errors import ConfigError, DataError
from surgery_edge.io import atomic_path

SPLITS = ("train", "adapt", "test")
SUITE_NAME = "builtin-8"


@lru_cache(maxsize=1)
def _digit_pools(seed: int = 1234) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn digits split 60/15/25 into disjoint train/adapt/test pools (stratified)."""
    from sklearn.datasets import load_digits  # deferred: scikit-learn takes a second to import

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    pools: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b = int(0.60 * len(idx)), int(0.75 * len(idx))
        pools["train"] += idx[:a].tolist()
        pools["adapt"] += idx[a:b].tolist()
        pools["test"] += idx[b:].tolist()
    return {s: (images[np.array(i)], labels[np.array(i)]) for s, i in pools.items()}


def _digit_glyph(pool, label: int, rng: np.random.Generator, px: int) -> np.ndarray:
    """A random scan of ``label`` from ``pool``, resized to ``px`` x ``px`` (coverage in [0, 1])."""
    images, labels = pool
    candidates = np.flatnonzero(labels == label)
    scan = images[candidates[rng.integers(len(candidates))]]
    img = Image.fromarray((scan * 255).astype(np.uint8)).resize((px, px), Image.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


def _place(size: int, glyph: np.ndarray, top: int, left: int) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    h, w = glyph.shape
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, size), min(left + w, size)
    if t1 > t0 and l1 > l0:
        mask[t0:t1, l0:l1] = glyph[t0 - top : t1 - top, l0 - left : l1 - left]
    return mask


# --- the eight tasks -------------------------------------------------------------------------
# Each renderer: (rng, label, size, digit_pool) -> float image (size, size, 3) in [0, 1].


def _render_digits(rng, label, size, pool):
    bg = R.background(size, rng)
    px = int(rng.integers(int(size * 0.75), int(size * 0.9) + 1))
    glyph = _digit_glyph(pool, label, rng, px)
    top, left = ((size - px) // 2 + int(rng.integers(-2, 3)) for _ in range(2))
    fg = R.contrasting_colour(bg.mean((0, 1)), rng, 0.6)
    return R.composite(bg, _place(size, glyph, top, left), fg)


def _render_cluttered_digits(rng, label, size, pool):
    # Textured background, distractor digit fragments cut at the borders, clutter strokes.
    img = R.background(size, rng, noise=0.10)
    img = R.composite(
        img,
        R.stripes(size, rng.uniform(0, math.pi), rng.uniform(3, 8), rng.uniform())
        * rng.uniform(0.15, 0.35),
        R.random_colour(rng),
    )
    for _ in range(2):
        px = int(size * 0.7)
        g = _digit_glyph(pool, int(rng.integers(10)), rng, px)
        side = rng.integers(2)
        left = -int(px * 0.75) if side == 0 else size - int(px * 0.25)
        img = R.composite(
            img,
            _place(size, g, int(rng.integers(-4, size - px + 4)), left) * 0.8,
            R.random_colour(rng),
        )
    for _ in range(int(rng.integers(1, 4))):
        m = R.rect_mask(
            size,
            rng.uniform(0, size),
            rng.uniform(0, size),
            0.6,
            rng.uniform(3, 8),
            rng.uniform(0, math.pi),
        )
        img = R.composite(img, m, R.random_colour(rng))
    px = int(rng.integers(int(size * 0.7), int(size * 0.8) + 1))
    glyph = _digit_glyph(pool, label, rng, px)
    c = (size - px) // 2
    top, left = c + int(rng.integers(-2, 3)), c + int(rng.integers(-2, 3))
    fg = R.contrasting_colour(img.mean((0, 1)), rng, 0.55)
    return R.composite(img, _place(size, glyph, top, left), fg)


SHAPES = ("circle", "triangle", "square", "ring", "star", "cross")


def _draw_shape(kind: str, size, cy, cx, radius, rot):
    if kind == "circle":
        return R.polygon_mask(size, cy, cx, radius, 0, rot)
    if kind == "star":
        return R.star_mask(size, cy, cx, radius * 1.1, 5, rot)
    if kind == "cross":
        return R.cross_mask(size, cy, cx, radius, rot)
    if kind == "ring":
        outer = R.polygon_mask(size, cy, cx, radius, 0, rot)
        return outer * (1 - R.polygon_mask(size, cy, cx, radius * 0.55, 0, rot))
    sides = {"triangle": 3, "square": 4}[kind]
    return R.polygon_mask(size, cy, cx, radius * (1.15 if sides == 3 else 1.0), sides, rot)


def _render_shapes(rng, label, size, pool):
    bg = R.background(size, rng)
    radius = rng.uniform(0.3, 0.4) * size
    cy, cx = (size / 2 + rng.uniform(-2, 2) for _ in range(2))
    mask = _draw_shape(SHAPES[label], size, cy, cx, radius, rng.uniform(0, 2 * math.pi))
    return R.composite(bg, mask, R.contrasting_colour(bg.mean((0, 1)), rng, 0.6))


TEXTURES = ("horizontal", "vertical", "diagonal", "checkered", "dotted", "blotchy")


def _render_textures(rng, label, size, pool):
    kind = TEXTURES[label]
    a, b = R.random_colour(rng), None
    b = R.contrasting_colour(a, rng, 0.35)
    period = rng.uniform(3.5, 7.0)
    phase = rng.uniform()
    y, x = R.grid(size)
    if kind == "horizontal":
        m = R.stripes(size, math.pi / 2 + rng.normal(0, 0.08), period, phase)
    elif kind == "vertical":
        m = R.stripes(size, rng.normal(0, 0.08), period, phase)
    elif kind == "diagonal":
        m = R.stripes(
            size, rng.choice([math.pi / 4, 3 * math.pi / 4]) + rng.normal(0, 0.08), period, phase
        )
    elif kind == "checkered":
        m = (
            R.stripes(size, 0, period * 2, phase)
            != R.stripes(size, math.pi / 2, period * 2, rng.uniform())
        ).astype(np.float32)
    elif kind == "dotted":
        gy, gx = (np.mod(v + rng.uniform(0, period), period * 1.2) - period * 0.6 for v in (y, x))
        m = R._soft(period * rng.uniform(0.22, 0.32) - np.hypot(gy, gx))
    else:  # blotchy: smooth random field, thresholded
        coarse = rng.normal(size=(5, 5)).astype(np.float32)
        noise = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        m = (noise > np.median(noise)).astype(np.float32)
    img = R.composite(np.broadcast_to(a, (size, size, 3)).copy(), m, b)
    return np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)


COLOURS = tuple(R.HUES)


def _render_colours(rng, label, size, pool):
    grey = rng.uniform(0.15, 0.85)
    bg = np.clip(
        np.full((size, size, 3), grey, np.float32) + rng.normal(0, 0.03, (size, size, 3)), 0, 1
    )
    radius = rng.uniform(0.22, 0.38) * size
    cy, cx = (rng.uniform(radius, size - radius) for _ in range(2))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    mask = _draw_shape(kind, size, cy, cx, radius, rng.uniform(0, 2 * math.pi))
    rgb = R.jitter_colour(R.HUES[COLOURS[label]], rng, 0.05) * rng.uniform(0.8, 1.0)
    return R.composite(bg, mask, rgb)


COUNTS = ("one", "two", "three", "four")


def _render_counting(rng, label, size, pool):
    bg = R.background(size, rng)
    fg = R.contrasting_colour(bg.mean((0, 1)), rng, 0.6)
    n, radius = label + 1, size * 0.1
    centres: list[tuple[float, float]] = []
    while len(centres) < n:
        c = tuple(rng.uniform(radius + 1, size - radius - 1, 2))
        if all(math.hypot(c[0] - p[0], c[1] - p[1]) > 2.4 * radius for p in centres):
            centres.append(c)
    img = bg
    for cy, cx in centres:
        r = radius * rng.uniform(0.85, 1.2)
        img = R.composite(img, R.polygon_mask(size, cy, cx, r, 0, 0.0), fg)
    return img


DIRECTIONS = (
    "east",
    "north-east",
    "north",
    "north-west",
    "west",
    "south-west",
    "south",
    "south-east",
)


def _render_orientation(rng, label, size, pool):
    bg = R.background(size, rng)
    length = rng.uniform(0.55, 0.8) * size
    cy, cx = (size / 2 + rng.uniform(-3, 3) for _ in range(2))
    angle = label * math.pi / 4 + rng.normal(0, 0.06)
    return R.composite(
        bg, R.arrow_mask(size, cy, cx, length, angle), R.contrasting_colour(bg.mean((0, 1)), rng)
    )


SIGN_BORDERS = ("round", "triangular", "octagonal", "diamond")
SIGN_MARKS = ("bar", "dot")
SIGNS = tuple(f"{b}-{m}" for b in SIGN_BORDERS for m in SIGN_MARKS)


def _render_signs(rng, label, size, pool):
    border, mark = SIGNS[label].split("-")
    img = R.background(size, rng, noise=0.06)
    radius = rng.uniform(0.34, 0.44) * size
    cy, cx = (size / 2 + rng.uniform(-2.5, 2.5) for _ in range(2))
    sides, rot = {
        "round": (0, 0.0),
        "triangular": (3, -math.pi / 2),
        "octagonal": (8, math.pi / 8),
        "diamond": (4, 0.0),
    }[border]
    rot += rng.normal(0, 0.05)
    scale = 1.2 if sides == 3 else 1.0
    rim = R.jitter_colour(R.HUES[str(rng.choice(["red", "blue", "yellow"]))], rng)
    outer = R.polygon_mask(size, cy, cx, radius * scale, sides, rot)
    inner = R.polygon_mask(
        size, cy + (radius * 0.15 if sides == 3 else 0), cx, radius * scale * 0.62, sides, rot
    )
    img = R.composite(img, outer, rim)
    img = R.composite(img, inner, R.jitter_colour((0.95, 0.95, 0.95), rng))
    ink = R.jitter_colour((0.08, 0.08, 0.08), rng)
    my = cy + (radius * 0.15 if sides == 3 else 0)
    if mark == "bar":
        m = R.rect_mask(size, my, cx, radius * 0.12, radius * 0.38, rng.normal(0, 0.05))
    else:
        m = R.polygon_mask(size, my, cx, radius * 0.2, 0, 0.0)
    return R.composite(img, m, ink)


@dataclass(frozen=True)
class TaskDef:
    """A task of the built-in suite: its classes, renderer and a one-line description."""

    name: str
    classes: tuple[str, ...]
    render: Callable[..., np.ndarray]
    description: str


TASKS: tuple[TaskDef, ...] = (
    TaskDef(
        "digits",
        tuple(str(i) for i in range(10)),
        _render_digits,
        "Real handwritten digit scans (scikit-learn), random size, position and colours.",
    ),
    TaskDef(
        "cluttered_digits",
        tuple(str(i) for i in range(10)),
        _render_cluttered_digits,
        "The centred digit among cut-off distractor digits, stripes and strokes.",
    ),
    TaskDef("shapes", SHAPES, _render_shapes, "Which of six filled shapes, any colour/pose."),
    TaskDef("textures", TEXTURES, _render_textures, "Which of six textures fills the image."),
    TaskDef("colours", COLOURS, _render_colours, "The hue of the one object on a grey field."),
    TaskDef("counting", COUNTS, _render_counting, "How many dots (1-4)."),
    TaskDef("orientation", DIRECTIONS, _render_orientation, "Which of 8 ways the arrow points."),
    TaskDef(
        "signs",
        SIGNS,
        _render_signs,
        "Sign-like glyphs: border shape x inner mark (rim colour is a nuisance).",
    ),
)
TASK_NAMES = tuple(t.name for t in TASKS)


def get_task(name: str) -> TaskDef:
    for t in TASKS:
        if t.name == name:
            return t
    raise ConfigError(f"Unknown task {name!r}; the built-in suite has {list(TASK_NAMES)}.")


# --- splits ----------------------------------------------------------------------------------


@dataclass
class TaskData:
    """One task's generated data. Images are uint8 (N, H, W, 3); the adapt split has no labels."""

    name: str
    class_names: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    adapt_x: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    digests: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def digest(self, array: str) -> str:
        """The content hash of ``train_x`` / ``adapt_x`` / ... (computed once, then kept)."""
        if array not in self.digests:
            self.digests[array] = array_digest(getattr(self, array))
        return self.digests[array]


ARRAYS = ("train_x", "train_y", "adapt_x", "test_x", "test_y")


def array_digest(arr: np.ndarray, rows: int = 4096) -> str:
    """SHA-256 of an array's dtype, shape and values (C order), read ``rows`` at a time so a
    memory-mapped split is never loaded whole."""
    h = hashlib.sha256(f"{arr.dtype.str}{tuple(arr.shape)}".encode())
    for i in range(0, len(arr), rows):
        h.update(np.ascontiguousarray(arr[i : i + rows]).data)
    return h.hexdigest()


@dataclass
class Suite:
    name: str
    seed: int
    image_size: int
    tasks: list[TaskData]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskData:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"Unknown task {name!r}; this suite has {self.task_names}.")

    def select(self, names: list[str] | None) -> Suite:
        if not names:
            return self
        return Suite(self.name, self.seed, self.image_size, [self.task(n) for n in names])


def _render_split(task: TaskDef, task_index: int, split: str, n: int, seed: int, size: int):
    ss = np.random.SeedSequence([seed, task_index, SPLITS.index(split)])
    rng = np.random.default_rng(ss)
    labels = rng.permutation(np.arange(n) % len(task.classes))
    pool = _digit_pools()[split]
    images = np.stack([R.to_uint8(task.render(rng, int(y), size, pool)) for y in labels])
    return images, labels.astype(np.int64)


def generate_suite(
    seed: int = 0,
    n_train: int = 2000,
    n_adapt: int = 1000,
    n_test: int = 500,
    size: int = 32,
    tasks: list[str] | None = None,
) -> Suite:
    """Generate the suite deterministically from ``seed`` (same seed -> identical arrays)."""
    defs = [get_task(n) for n in tasks] if tasks else list(TASKS)
    out = []
    for task in defs:
        i = TASK_NAMES.index(task.name)
        train_x, train_y = _render_split(task, i, "train", n_train, seed, size)
        adapt_x, _ = _render_split(task, i, "adapt", n_adapt, seed, size)
        test_x, test_y = _render_split(task, i, "test", n_test, seed, size)
        out.append(
            TaskData(task.name, list(task.classes), train_x, train_y, adapt_x, test_x, test_y)
        )
    return Suite(SUITE_NAME, seed, size, out)


LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _render_letter(rng, label, size):
    """A letter in Pillow's built-in scalable font, random size, pose and colours."""
    font = ImageFont.load_default(size=int(rng.integers(int(size * 0.5), int(size * 0.8) + 1)))
    glyph = Image.new("L", (size, size))
    centre = tuple(size / 2 + rng.uniform(-size * 0.12, size * 0.12, 2))
    ImageDraw.Draw(glyph).text(centre, LETTERS[label], font=font, fill=255, anchor="mm")
    glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    bg = R.background(size, rng)
    fg = R.contrasting_colour(bg.mean((0, 1)), rng)
    return R.composite(bg, np.asarray(glyph, np.float32) / 255.0, fg)


@dataclass
class PretrainingCorpus:
    """Images with pretext and auxiliary targets only; -1 marks "no target of this kind".

    - ``sources``: which renderer drew the image (every image; the trainer adds a rotation
      pretext on top);
    - ``letters``: the letter shown (52 classes) for the letters source: a supervised task with
      its own label space, the stand-in for the broad supervision CLIP pretrains on.
    The eight tasks' labels are never used; digit scans come only from the training pool.
    """

    images: np.ndarray  # (N, size, size, 3) uint8
    sources: np.ndarray  # (N,)
    letters: np.ndarray  # (N,)


def pretraining_corpus(
    seed: int, n_per_source: int, size: int = 32, n_letters: int | None = None
) -> PretrainingCorpus:
    """Generate the pretraining corpus (see :class:`PretrainingCorpus`) on its own seed stream."""
    n_letters = n_letters if n_letters is not None else 2 * n_per_source
    images, sources, letters = [], [], []
    pool = _digit_pools()["train"]
    for i, task in enumerate(TASKS):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 10_000 + i]))
        hidden = rng.integers(0, len(task.classes), n_per_source)  # drawn, never returned
        images += [R.to_uint8(task.render(rng, int(y), size, pool)) for y in hidden]
        sources.append(np.full(n_per_source, i, np.int64))
        letters.append(np.full(n_per_source, -1, np.int64))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 30_000]))
    chars = rng.integers(0, len(LETTERS), n_letters)
    images += [R.to_uint8(_render_letter(rng, int(c), size)) for c in chars]
    sources.append(np.full(n_letters, len(TASKS), np.int64))
    letters.append(chars.astype(np.int64))
    return PretrainingCorpus(np.stack(images), np.concatenate(sources), np.concatenate(letters))


# --- cache on disk ---------------------------------------------------------------------------


def save_suite(suite: Suite, path: str | Path) -> Path:
    """Write ``suite`` to an ``.npz`` with every array's content hash (checked on load)."""
    arrays, digests = {}, {}
    for t in suite.tasks:
        for name in ARRAYS:
            arrays[f"{t.name}/{name}"] = getattr(t, name)
            digests[f"{t.name}/{name}"] = t.digest(name)
        arrays[f"{t.name}/class_names"] = np.array(t.class_names)
    meta = np.array([suite.name, str(suite.seed), str(suite.image_size)])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, __meta__=meta, __digests__=np.array(json.dumps(digests)), **arrays)
    return Path(path)


def load_suite(path: str | Path) -> Suite:
    """Read a suite written by :func:`save_suite`, checking every array against its hash.

    Raises:
        DataError: the file is unreadable, truncated, edited, or not a suite file.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            name, seed, size = (str(v) for v in z["__meta__"])
            seed, size = int(seed), int(size)
            digests = json.loads(str(z["__digests__"]))
            names = sorted({k.split("/")[0] for k in files if "/" in k}, key=_task_order)
            tasks = []
            for n in names:
                data = {a: z[f"{n}/{a}"] for a in ARRAYS}
                task = TaskData(n, [str(c) for c in z[f"{n}/class_names"]], **data)
                _check_task(task, size)
                for a in ARRAYS:
                    if task.digest(a) != digests.get(f"{n}/{a}"):
                        raise ValueError(f"{n}/{a} does not match its checksum")
                tasks.append(task)
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(
            f"Suite file {path} is unreadable or damaged ({type(e).__name__}: {e}). Delete it: "
            "the next run regenerates it from the seed."
        ) from None
    if not tasks:
        raise DataError(f"Suite file {path} holds no tasks. Delete it to regenerate it.")
    return Suite(name, seed, size, tasks)


def _check_task(t: TaskData, size: int) -> None:
    """Shapes, dtypes and label ranges of one task's arrays (ValueError naming the array)."""
    if not t.class_names:
        raise ValueError(f"{t.name} has no class names")
    for a in ("train_x", "adapt_x", "test_x"):
        x = getattr(t, a)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise ValueError(
                f"{t.name}/{a} is {x.dtype} {x.shape}, not uint8 (N, {size}, {size}, 3)"
            )
    for a, x in (("train_y", t.train_x), ("test_y", t.test_x)):
        y = getattr(t, a)
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise ValueError(f"{t.name}/{a} is {y.dtype} {y.shape}, not int64 ({len(x)},)")
        if len(y) and (y.min() < 0 or y.max() >= len(t.class_names)):
            raise ValueError(f"{t.name}/{a} holds labels outside 0..{len(t.class_names) - 1}")


def _task_order(name: str) -> int:
    return TASK_NAMES.index(name) if name in TASK_NAMES else len(TASK_NAMES)


def _matches(suite: Suite, n_train=2000, n_adapt=1000, n_test=500, size=32, tasks=None) -> bool:
    sizes = {(len(t.train_x), len(t.adapt_x), len(t.test_x)) for t in suite.tasks}
    return (
        sizes == {(n_train, n_adapt, n_test)}
        and suite.image_size == size
        and suite.task_names == list(tasks or TASK_NAMES)
    )


def load_or_generate_suite(
    cache: str | Path, seed: int = 0, warn: Callable[[str], Any] | None = None, **kwargs
) -> Suite:
    """Load the cached suite at ``cache`` if it was made with ``seed``, else generate and save.

    A damaged cache is regenerated (the suite is a pure function of its settings), with a
    warning through ``warn`` (default ``warnings.warn``); it is never used.
    """
    cache = Path(cache)
    if cache.exists():
        try:
            suite = load_suite(cache)
        except DataError as e:
            (warn or (lambda m: warnings.warn(m, stacklevel=3)))(f"{e} Regenerating it.")
        else:
            if suite.seed == seed and _matches(suite, **kwargs):
                return suite
    suite = generate_suite(seed=seed, **kwargs)
    save_suite(suite, cache)
    return suite

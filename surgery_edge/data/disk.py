"""Datasets from disk: image folders and torchvision datasets, decoded once into a .npy cache.

A task on disk becomes the same :class:`~surgery_edge.data.suite.TaskData` as a built-in task:
uint8 images (N, S, S, 3) already at the model's input size S, int64 labels (N,). The real
datasets are large (tens of thousands of images at 224 px), so each split is decoded once,
streamed into ``<cache_dir>/<task>-<split>-<key>.x.npy`` / ``.y.npy`` and returned memory-mapped;
the key hashes everything the arrays depend on (the files' names, sizes and mtimes, the image
size, the adapt sample's seed), so a changed dataset is decoded again and an unchanged one never.

Preprocessing is CLIP's eval transform done in PIL (:func:`~.decoded.preprocess_image`, the
runtime's code): resize the shorter side to S with bicubic filtering in the image's own mode,
center-crop S x S with torchvision's rounding, convert to RGB. ``ToTensor`` of a uint8 PIL image
is exact, so caching the uint8 crop and scaling it later gives the same tensor as open_clip's
``preprocess`` and as an exported engine's runtime. The cache itself is
:mod:`surgery_edge.data.decoded`.

Two sources:
- ``folder``: ``<path>/train/<class>/*``, ``<path>/test/<class>/*`` and optionally
  ``<path>/adapt/`` (unlabelled images, directly inside it or in any sub-folders);
- ``torchvision``: one of :data:`TORCHVISION_DATASETS`, read from files the user placed under
  the root (surgery-edge never downloads), by torchvision's class or, for CIFAR, STL10,
  Flowers102 and FER2013, by :mod:`surgery_edge.data.tv_files` (no unrestricted pickle, no
  re-hashing of the files on every run).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from surgery_edge.data import tv_files
from surgery_edge.data.decoded import Loader, Split, empty, sample
from surgery_edge.data.suite import TaskData
from surgery_edge.errors import ConfigError, DataError
from surgery_edge.io import Walk, not_a_file, not_a_folder, walk_files
from surgery_edge.runtime.inputs import IMAGE_EXTENSIONS
from surgery_edge.runtime.preprocess import open_image_file

SOURCES = ("folder", "torchvision")
TORCHVISION_DATASETS = (
    "SUN397",
    "StanfordCars",
    "EuroSAT",
    "SVHN",
    "GTSRB",
    "MNIST",
    "DTD",
    # added by the 14- and 20-task suites (TALL14 / TALL20)
    "OxfordIIITPet",
    "FashionMNIST",
    "KMNIST",
    "Food101",
    "RenderedSST2",
    "EMNIST",  # the digits split, as the TALL-masks code reads it
    "CIFAR10",
    "CIFAR100",
    "STL10",
    "Flowers102",
    "FER2013",
    "PCAM",  # needs h5py (the `datasets` extra)
)
_NUM_CLASSES = {
    "SUN397": 397,
    "StanfordCars": 196,
    "EuroSAT": 10,
    "SVHN": 10,
    "GTSRB": 43,
    "MNIST": 10,
    "DTD": 47,
    "OxfordIIITPet": 37,
    "FashionMNIST": 10,
    "KMNIST": 10,
    "Food101": 101,
    "RenderedSST2": 2,
    "EMNIST": 10,
    "CIFAR10": 10,
    "CIFAR100": 100,
    "STL10": 10,
    "Flowers102": 102,
    "FER2013": 7,
    "PCAM": 2,
}
_TRAIN_FLAG = ("MNIST", "FashionMNIST", "KMNIST")  # train=True/False instead of a split name
_TRAIN_SPLIT = {"OxfordIIITPet": "trainval"}  # the official training split's name, if not train
_UNSPLIT = ("SUN397", "EuroSAT")  # no official test split: split_indices() makes one
# The split of SUN397/EuroSAT is fixed, not drawn from the run's seed: experts fine-tuned in
# one run must never be evaluated on their own training images in a run with another seed.
_SPLIT_SEED = 0
_UNLABELLED = -1


@dataclass(frozen=True)
class DiskTask:
    """Where one task's images live on disk.

    Args:
        name: the task name used everywhere (e.g. ``"MNIST"``, ``"SUN397"``).
        source: ``"folder"`` or ``"torchvision"``.
        path: folder source: the task's folder holding ``train/ test/ [adapt/]``; torchvision
            source: the dataset root passed to the dataset class.
        dataset: torchvision source: the class name, one of :data:`TORCHVISION_DATASETS`.
        class_names: optional JSON file of class names (see :func:`load_class_names`).
        test_fraction: torchvision datasets without an official split (SUN397, EuroSAT) only:
            the fraction of the images held out as the test split.
        split_lists: folder source whose splits are text lists rather than folders (RESISC45's
            ``resisc45-{train,test}.txt``): ``(("test", file), ("train", file))``, files relative
            to ``path``. Each line names an image under ``path`` by its relative path or by its
            file name alone (which must then be unique); its class is its parent folder.
    """

    name: str
    source: str = "folder"
    path: Path | None = None
    dataset: str | None = None
    class_names: Path | None = None
    test_fraction: float = 0.2
    split_lists: tuple[tuple[str, Path], ...] = ()


def load_class_names(path: Path) -> list[str] | dict[str, str]:
    """Read a class-names JSON file: a list (label order) or an object {folder: class name}.

    Raises:
        DataError: the file is missing, is not valid JSON, or holds anything else.
    """
    path = Path(path)
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"Class-names file {path} is unreadable ({e}); give a JSON list of names in label "
            'order or an object {"folder": "class name"}.'
        ) from None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    if isinstance(names, dict) and all(isinstance(v, str) for v in names.values()):
        return names
    raise DataError(
        f"Class-names file {path} holds a {type(names).__name__} that is not a list of strings "
        "or an object of strings; give a JSON list of names in label order or an object "
        '{"folder": "class name"}.'
    )


def load_disk_task(
    task: DiskTask,
    image_size: int,
    cache_dir: Path,
    *,
    seed: int = 0,
    n_adapt: int = 400,
    need_train: bool = False,
    log: Callable[[str], Any] = print,
    workers: int | None = None,
) -> TaskData:
    """Load one task from disk, decoding each split once into ``cache_dir``.

    Args:
        task: where the task lives.
        image_size: the model's input size S; images come back (N, S, S, 3) uint8.
        cache_dir: where the decoded splits are cached (created if missing).
        seed: seeds the adapt sample drawn from train when there is no ``adapt/`` folder.
        n_adapt: how many train images that sample holds (all of train if fewer). An
            ``adapt/`` folder is used whole.
        need_train: decode the train split; otherwise ``train_x``/``train_y`` are empty.
        log: receives one line per split that is decoded (cache hits are silent).
        workers: decoding threads; default ``min(8, os.cpu_count())``.

    Returns:
        The task's :class:`TaskData`, arrays memory-mapped from the cache. ``adapt_x`` is empty
        when the task has neither ``adapt/`` nor train images: the caller then adapts on test
        images (transductive).

    Raises:
        ConfigError: an invalid option (unknown source or dataset, size, counts).
        DataError: missing or unusable files, class names that do not fit.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}.")
    if n_adapt < 0:
        raise ConfigError(f"n_adapt must be >= 0, got {n_adapt}.")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}.")
    if task.source not in SOURCES:
        raise ConfigError(
            f"Task {task.name!r} has unknown source {task.source!r}; use one of {SOURCES}."
        )
    if task.path is None:
        raise ConfigError(
            f"Task {task.name!r} has no path; give the task's folder (folder source) or the "
            "dataset root (torchvision source)."
        )
    loader = Loader(task, image_size, Path(cache_dir), log, workers)
    if task.source == "folder":
        return _load_folder_task(loader, seed, n_adapt, need_train)
    return _load_torchvision_task(loader, seed, n_adapt, need_train)


# --- folder source ---------------------------------------------------------------------------


def _load_folder_task(loader: Loader, seed: int, n_adapt: int, need_train: bool) -> TaskData:
    task = loader.task
    root = Path(task.path).expanduser().resolve()
    layout = f"{root}/test/<class>/<images>, optionally train/<class>/<images> and adapt/<images>"
    problem = not_a_folder(root)
    if problem is not None:
        raise DataError(f"Task {task.name!r}: folder {root} {problem}; expected {layout}.")
    if task.split_lists:
        folders, test_dir, test_files, train_dir, train_files = _listed_splits(task, root)
    else:
        folders, test_dir, test_files, train_dir, train_files = _folder_splits(task, root, layout)
    if need_train and not train_files:
        raise DataError(
            f"Task {task.name!r}: training needs labelled images in {train_dir}, "
            "but there are none; add them or use experts that are already fine-tuned."
        )

    if task.class_names is not None:
        class_names = _names_from_json(
            task.class_names, folders, f"the class folders of {test_dir}"
        )
    else:
        class_names = [f.replace("_", " ") for f in folders]

    def folder_split(split: str, folder: Path, files: list[tuple[Path, int]], **key) -> Split:
        listing = [_file_identity(p, root) for p, _ in files]
        return Split(
            split,
            str(folder),
            files,
            _open_image_file,
            lambda item: str(item[0]),
            dict(source="folder", path=str(root), classes=folders, files=listing, **key),
        )

    test_x, test_y = loader.load(folder_split("test", test_dir, test_files))
    train_x, train_y = empty(loader.image_size)
    if need_train:
        train_x, train_y = loader.load(folder_split("train", train_dir, train_files))

    adapt_dir = root / "adapt"
    adapt_x = empty(loader.image_size)[0]
    if adapt_dir.is_dir():
        adapt_files = [(p, _UNLABELLED) for p in _image_files(adapt_dir, task.name)]
        if not adapt_files:
            raise DataError(
                f"Task {task.name!r}: {adapt_dir} holds no images; put unlabelled images in it "
                "(or remove it to sample the adapt split from train)."
            )
        adapt_x = loader.load(folder_split("adapt", adapt_dir, adapt_files))[0]
    elif train_files and n_adapt > 0:
        chosen = sample(len(train_files), n_adapt, seed)
        # The key hashes the whole train listing: the sample depends on all of it.
        split = folder_split("adapt", train_dir, train_files, seed=seed, n_adapt=n_adapt)
        split.items = [(train_files[i][0], _UNLABELLED) for i in chosen]
        adapt_x = loader.load(split)[0]
    return TaskData(task.name, class_names, train_x, train_y, adapt_x, test_x, test_y)


_Labelled = list[tuple[Path, int]]


def _folder_splits(task: DiskTask, root: Path, layout: str):
    """(class folders, test dir, test files, train dir, train files) of ``<root>/{test,train}``."""
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise DataError(f"Task {task.name!r}: {test_dir} is missing; expected {layout}.")
    folders = _class_folders(test_dir)
    test_files = _labelled_files(test_dir, folders, task.name)
    if not test_files:
        raise DataError(
            f"Task {task.name!r}: {test_dir} holds no images in class folders; expected {layout} "
            f"(image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    train_dir = root / "train"
    train_files: _Labelled = []
    if train_dir.is_dir():
        train_folders = _class_folders(train_dir)
        if train_folders != folders:
            only_test = sorted(set(folders) - set(train_folders))
            only_train = sorted(set(train_folders) - set(folders))
            raise DataError(
                f"Task {task.name!r}: the class folders of {train_dir} and {test_dir} differ "
                f"(only in test: {_preview(only_test)}; only in train: {_preview(only_train)}); "
                "give both splits the same class folders."
            )
        train_files = _labelled_files(train_dir, folders, task.name)
    return folders, test_dir, test_files, train_dir, train_files


def _listed_splits(task: DiskTask, root: Path):
    """The same as :func:`_folder_splits`, from split lists naming images anywhere under root."""
    lists = dict(task.split_lists)
    unknown = sorted(set(lists) - {"train", "test"})
    if unknown or "test" not in lists:
        raise ConfigError(
            f"Task {task.name!r}: split_lists needs a 'test' list and may have a 'train' list; "
            f"got {sorted(lists)}."
        )
    images = _image_files(root, task.name)
    by_rel = {p.relative_to(root).as_posix(): p for p in images}
    by_name: dict[str, list[Path]] = {}
    for p in images:
        by_name.setdefault(p.name, []).append(p)
    listed: dict[str, list[Path]] = {}
    for split, name in lists.items():
        path = root / name
        problem = not_a_file(path)
        if problem is not None:
            raise DataError(f"Task {task.name!r}: split list {path} {problem}.")
        found, missing = [], []
        for line in path.read_text().splitlines():
            entry = line.strip()
            if not entry:
                continue
            hits = [by_rel[entry]] if entry in by_rel else by_name.get(Path(entry).name, [])
            if len(hits) > 1:
                raise DataError(
                    f"Task {task.name!r}: {path} names {entry!r}, which matches "
                    f"{len(hits)} images under {root}; use paths relative to {root}."
                )
            (found if hits else missing).append(hits[0] if hits else entry)
        if missing:
            raise DataError(
                f"Task {task.name!r}: {len(missing)} images listed in {path} are not under "
                f"{root} (e.g. {_preview(missing, 3)})."
            )
        if not found:
            raise DataError(f"Task {task.name!r}: split list {path} names no images.")
        listed[split] = found
    folders = sorted({p.parent.name for files in listed.values() for p in files})
    label = {f: i for i, f in enumerate(folders)}
    test_files = [(p, label[p.parent.name]) for p in listed["test"]]
    train_files = [(p, label[p.parent.name]) for p in listed.get("train", [])]
    return (
        folders,
        root / lists["test"],
        test_files,
        root / lists.get("train", "train"),
        train_files,
    )


def _class_folders(split_dir: Path) -> list[str]:
    """The class folders of a split: its visible sub-folders, but not a link back to it."""
    here = split_dir.stat()
    return sorted(
        e.name
        for e in split_dir.iterdir()
        if e.is_dir() and not e.name.startswith(".") and not os.path.samestat(e.stat(), here)
    )


def _image_files(folder: Path, task: str) -> list[Path]:
    """Image files under ``folder`` (any depth), sorted by relative path; hidden ones skipped.

    Each folder is entered once and each file taken once, however many links lead to it (a
    ``loop -> .`` link made one class count its images over and over); FIFOs, sockets and
    devices named like images are never opened. What was passed over is named in a warning.
    """
    walk = walk_files(folder, keep=_is_image_name, same_file_once=True)
    _warn_walk(task, folder, walk)
    return walk.files


def _labelled_files(split_dir: Path, folders: list[str], task: str) -> list[tuple[Path, int]]:
    """``(image, label)`` of every class folder of ``split_dir``: no link leads from one class
    into another class (or back to the split), and no image is taken for two classes."""
    classes = [split_dir / f for f in folders]
    seen_folders = {(s.st_dev, s.st_ino) for s in map(os.stat, [split_dir, *classes])}
    seen_files: set[tuple[int, int]] = set()
    found = []
    for label, folder in enumerate(classes):
        walk = walk_files(folder, _is_image_name, same_file_once=True,
                          seen_folders=seen_folders, seen_files=seen_files)  # fmt: skip
        _warn_walk(task, folder, walk)
        found += [(p, label) for p in walk.files]
    return found


def _is_image_name(parts: tuple[str, ...]) -> bool:
    return os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS


def _warn_walk(task: str, folder: Path, walk: Walk) -> None:
    said = []
    if walk.skipped:
        said.append(
            f"skipped {len(walk.skipped)} entries that are not readable image files: "
            + _preview(walk.skipped, 3)
        )
    if walk.repeated:
        said.append(
            f"did not follow {len(walk.repeated)} links to a folder or an image already read, "
            f"so each image counts once: {_preview(walk.repeated, 3)}"
        )
    if said:
        warnings.warn(f"Task {task!r}: in {folder}, {'; '.join(said)}.", stacklevel=3)


def _file_identity(path: Path, root: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns)


def _open_image_file(item: tuple[Path, int]) -> tuple[Image.Image, int]:
    path, label = item
    if (problem := not_a_file(path)) is not None:  # never open a FIFO: it would block
        raise DataError(f"{path} {problem}")
    with open_image_file(path) as image:
        # In its own mode, as a user's file reaches the runtime: preprocess_image resizes, then
        # converts to RGB (open_clip's order). A copy, usable after the file is closed.
        return image.copy(), label


# --- torchvision source ----------------------------------------------------------------------


def _load_torchvision_task(loader: Loader, seed: int, n_adapt: int, need_train: bool) -> TaskData:
    task = loader.task
    name = task.dataset
    if name not in TORCHVISION_DATASETS:
        raise ConfigError(
            f"Task {task.name!r}: unknown torchvision dataset {name!r}; supported: "
            f"{list(TORCHVISION_DATASETS)}. RESISC45 is not a torchvision dataset: use the "
            "folder source for it (train/<class>/, test/<class>/)."
        )
    if name in _UNSPLIT and not 0.0 < task.test_fraction < 1.0:
        raise ConfigError(
            f"Task {task.name!r}: test_fraction must be between 0 and 1, got {task.test_fraction}."
        )
    root = Path(task.path).expanduser().resolve()
    opened: dict[str, Any] = {}

    def split_of(split: str) -> tuple[Any, list[int]]:
        official = "all" if name in _UNSPLIT else split
        if official not in opened:
            opened[official] = _open_torchvision(task.name, name, root, official)
        dataset = opened[official]
        if name in _UNSPLIT:
            return dataset, _split_indices(len(dataset), task.test_fraction)[split]
        return dataset, list(range(len(dataset)))

    def tv_split(split: str, dataset: Any, indices: list[int], **key) -> Split:
        if name in _UNSPLIT:
            key.update(test_fraction=task.test_fraction, split_seed=_SPLIT_SEED)
        return Split(
            split,
            f"torchvision {name} ({split}) at {root}",
            indices,
            lambda i: _dataset_item(dataset, i),
            lambda i: f"{name}[{i}]",
            dict(source="torchvision", dataset=name, path=str(root), length=len(dataset), **key),
        )

    test_ds, test_idx = split_of("test")
    base = getattr(test_ds, "classes", None)
    base = [str(c) for c in base] if base else [str(i) for i in range(_NUM_CLASSES[name])]
    if task.class_names is not None:
        labels = [str(i) for i in range(len(base))]
        class_names = _names_from_json(task.class_names, base, f"torchvision {name}", labels)
    else:
        class_names = base

    test_x, test_y = loader.load(tv_split("test", test_ds, test_idx))
    train_x, train_y = empty(loader.image_size)
    adapt_x = train_x
    if need_train or n_adapt > 0:
        train_ds, train_idx = split_of("train")
        if need_train:
            train_x, train_y = loader.load(tv_split("train", train_ds, train_idx))
        if n_adapt > 0 and train_idx:
            chosen = [train_idx[i] for i in sample(len(train_idx), n_adapt, seed)]
            split = tv_split("adapt", train_ds, chosen, seed=seed, n_adapt=n_adapt)
            adapt_x = loader.load(split)[0]
    return TaskData(task.name, class_names, train_x, train_y, adapt_x, test_x, test_y)


def _open_torchvision(task_name: str, name: str, root: Path, split: str) -> Any:
    """Build the dataset with ``download=False``; missing files become a :class:`DataError`."""
    if name in tv_files.READERS:  # read here: see surgery_edge.data.tv_files for why
        try:
            return tv_files.open_dataset(name, root, split)
        except DataError as e:
            raise DataError(
                f"Task {task_name!r}: torchvision {name} ({split}) at {root}: {e} "
                + _PLACE_FILES.format(name=name)
            ) from None
    if name == "PCAM":
        try:
            import h5py  # noqa: F401 (torchvision's PCAM reads HDF5)
        except ImportError:
            raise DataError(
                f"Task {task_name!r}: torchvision PCAM reads HDF5 files, which needs h5py: "
                "pip install 'surgery-edge[datasets]' (or pip install h5py)."
            ) from None
    import torchvision.datasets as tvd  # deferred: a slow import, for torchvision sources only

    cls = getattr(tvd, name)
    kwargs: dict[str, Any] = {}
    if name == "EMNIST":  # images as torchvision returns them (not transposed), as TALL-masks
        kwargs.update(split="digits", train=split == "train")
    elif name in _TRAIN_FLAG:
        kwargs["train"] = split == "train"
    elif name == "DTD":
        kwargs.update(split=split, partition=1)
    elif name not in _UNSPLIT:
        kwargs["split"] = _TRAIN_SPLIT.get(name, "train") if split == "train" else split
    try:
        return cls(str(root), transform=None, download=False, **kwargs)
    except Exception as e:  # each class signals missing files its own way
        raise DataError(
            f"Task {task_name!r}: torchvision {name} ({split}) could not be opened at {root} "
            f"({type(e).__name__}: {e}). " + _PLACE_FILES.format(name=name)
        ) from None


_PLACE_FILES = (
    "surgery-edge never downloads: place the files there yourself, e.g. by running "
    "torchvision.datasets.{name}(root, download=True) once on a machine with network access "
    "and copying the root over."
)


def _dataset_item(dataset: Any, index: int) -> tuple[Image.Image, int]:
    image, label = dataset[index]
    return image, int(label)


def _split_indices(n: int, test_fraction: float) -> dict[str, list[int]]:
    """A fixed random split of ``range(n)`` into train and test (both sorted)."""
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_test = min(max(int(round(n * test_fraction)), 1), max(n - 1, 1))
    return {"test": sorted(order[:n_test].tolist()), "train": sorted(order[n_test:].tolist())}


# --- class names -----------------------------------------------------------------------------


def _names_from_json(
    path: Path, keys: list[str], what: str, other_keys: list[str] | None = None
) -> list[str]:
    """Class names from ``path`` for the classes ``keys`` (label order) of ``what``.

    An object may be keyed by ``keys`` or, when given, by ``other_keys`` (e.g. label numbers).
    """
    path = Path(path)
    names = load_class_names(path)
    if isinstance(names, list):
        if len(names) != len(keys):
            raise DataError(
                f"Class-names file {path} lists {len(names)} names but {what} has {len(keys)} "
                f"classes ({_preview(keys)}); give exactly one name per class, in that order."
            )
        return names
    for candidate in (keys, other_keys):
        if candidate and all(k in names for k in candidate):
            return [names[k] for k in candidate]
    missing = [k for k in keys if k not in names]
    raise DataError(
        f"Class-names file {path} has no name for {len(missing)} of the {len(keys)} classes of "
        f"{what}: {_preview(missing)}; add a key for each of them."
    )


def _preview(items: Sequence[str], limit: int = 5) -> str:
    if not items:
        return "none"
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")

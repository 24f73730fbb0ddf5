"""torchvision datasets whose files surgery-edge reads itself, or opens without re-hashing.

A torchvision source reads the files that ``torchvision.datasets.X(root, download=True)``
leaves under ``root``. For most datasets torchvision's own class does that (see
:mod:`surgery_edge.data.disk`). For the ones here it does not serve:

- CIFAR10 / CIFAR100: torchvision unpickles the batches with an unrestricted ``pickle.load``,
  which runs whatever code a file names. :func:`load_numpy_pickle` admits numpy arrays,
  lists, dicts, strings and numbers only, and refuses anything else with the file's name.
- STL10 / Flowers102 / FER2013: torchvision recomputes every file's published MD5 on each
  construction (2.6 GB for STL10's binaries) and refuses a file that is not byte-identical to
  the published one. torchvision's download verifies the checksums once; these readers check
  that the files are there and hold what their format says (shapes, label ranges), and say
  which file is not.

Each reader returns a :class:`ArrayDataset`-like object: ``len()``, ``ds[i] -> (PIL image,
label)`` and ``classes`` (or ``None`` when the files carry no names).
"""

from __future__ import annotations

import codecs
import csv
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from surgery_edge.errors import DataError
from surgery_edge.runtime.preprocess import open_image_file

#: the datasets :func:`open_dataset` reads; the others go to torchvision's classes
READERS = ("CIFAR10", "CIFAR100", "STL10", "Flowers102", "FER2013")


class ArrayDataset:
    """Images held as one uint8 array, ``(N, H, W)`` grey or ``(N, H, W, 3)``, with labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str] | None):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(np.ascontiguousarray(self.images[index])), int(self.labels[index])


def open_dataset(name: str, root: Path, split: str) -> Any:
    """``split`` (``"train"`` / ``"test"``) of ``name`` (one of :data:`READERS`) under ``root``.

    Raises:
        DataError: a file is missing or does not hold what its format says.
    """
    if name in ("CIFAR10", "CIFAR100"):
        return _cifar(name, root, split)
    if name == "STL10":
        return _stl10(root, split)
    if name == "Flowers102":
        return _flowers102(root, split)
    if name == "FER2013":
        return _fer2013(root, split)
    raise ValueError(f"no reader for {name!r}")


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} is missing ({what}).")
    return path


def _check_labels(labels: np.ndarray, classes: int, path: Path) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and not (0 <= labels.min() and labels.max() < classes):
        raise DataError(
            f"{path}: labels run from {labels.min()} to {labels.max()}; the dataset has "
            f"{classes} classes (0 to {classes - 1})."
        )
    return labels


# --- a pickle that can only hold data ----------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """What a pickled numpy array names, found from numpy itself (the module paths moved from
    ``numpy.core`` to ``numpy._core`` in numpy 2; files written under either load)."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float64(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 writes bytes from Python 3
        ("__builtin__", "bytes"): bytes,  # ... and an empty bytes
        ("builtins", "bytes"): bytes,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # CIFAR's batches were pickled by Python 2
        self._path, self._allowed = path, _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise DataError(
                f"{self._path} is not a plain data pickle: it names {module}.{name}, which could "
                "run code when loaded, so it was not loaded. Re-download the dataset."
            )
        return found


def load_numpy_pickle(path: Path) -> Any:
    """Unpickle ``path`` admitting only numpy arrays and Python's plain data types."""
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(
            f"{path} could not be read as a pickle ({type(e).__name__}: {e})."
        ) from None


# --- CIFAR10 / CIFAR100: cifar-10-batches-py/, cifar-100-python/ -------------------------------

_CIFAR = {  # folder, train files, test files, meta file, names key, labels key, classes
    "CIFAR10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "label_names",
        "labels",
        10,
    ),
    "CIFAR100": (
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_label_names",
        "fine_labels",
        100,
    ),
}


def _cifar(name: str, root: Path, split: str) -> ArrayDataset:
    folder, train, test, meta_file, names_key, labels_key, classes = _CIFAR[name]
    base = root / folder
    meta = load_numpy_pickle(_require(base / meta_file, f"{name}'s class names"))
    names = meta.get(names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != classes:
        raise DataError(f"{base / meta_file} has no list of {classes} {names_key!r}.")
    images, labels = [], []
    for file in train if split == "train" else test:
        path = _require(base / file, f"{name}'s {split} batch")
        batch = load_numpy_pickle(path)
        data = batch.get("data") if isinstance(batch, dict) else None
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise DataError(f"{path} has no uint8 'data' array of rows of 3 x 32 x 32 pixels.")
        if data.shape[1] != 3 * 32 * 32 or len(batch.get(labels_key, ())) != len(data):
            raise DataError(
                f"{path}: 'data' is {data.shape}, expected (n, 3072) with n {labels_key!r}."
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # as HWC
        labels.append(_check_labels(batch[labels_key], classes, path))
    return ArrayDataset(np.concatenate(images), np.concatenate(labels), [str(n) for n in names])


# --- STL10: stl10_binary/{train,test}_{X,y}.bin, class_names.txt -------------------------------


def _stl10(root: Path, split: str) -> ArrayDataset:
    base = root / "stl10_binary"
    x_path = _require(base / f"{split}_X.bin", f"STL10's {split} images")
    y_path = _require(base / f"{split}_y.bin", f"STL10's {split} labels")
    pixels = 3 * 96 * 96
    if x_path.stat().st_size % pixels:
        raise DataError(f"{x_path} is {x_path.stat().st_size} bytes, not a whole number of images.")
    # column-major 3 x 96 x 96 per image: (n, c, w, h) -> (n, h, w, c), as torchvision shows it
    images = np.memmap(x_path, np.uint8, "r").reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    labels = np.fromfile(y_path, np.uint8).astype(np.int64) - 1  # stored 1..10
    if len(labels) != len(images):
        raise DataError(
            f"{y_path} holds {len(labels)} labels for {len(images)} images in {x_path}."
        )
    names_path = base / "class_names.txt"
    names = names_path.read_text().split() if names_path.is_file() else None
    return ArrayDataset(images, _check_labels(labels, 10, y_path), names)


# --- Flowers102: flowers-102/jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat -------------------


class _ImageFiles:
    def __init__(self, files: list[Path], labels: np.ndarray, classes: list[str] | None):
        self.files, self.labels, self.classes = files, labels, classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with open_image_file(self.files[index]) as image:
            return image.convert("RGB"), int(self.labels[index])


def _flowers102(root: Path, split: str) -> _ImageFiles:
    from scipy.io import loadmat  # deferred: only this dataset needs it

    base = root / "flowers-102"
    ids_path = _require(base / "setid.mat", "Flowers102's split lists")
    labels_path = _require(base / "imagelabels.mat", "Flowers102's labels")
    try:
        ids = loadmat(ids_path, squeeze_me=True)["tstid" if split == "test" else "trnid"]
        all_labels = loadmat(labels_path, squeeze_me=True)["labels"]
    except Exception as e:
        raise DataError(
            f"{ids_path} / {labels_path} could not be read ({type(e).__name__}: {e})."
        ) from None
    ids, all_labels = np.atleast_1d(ids).astype(np.int64), np.atleast_1d(all_labels)
    if ids.size and not (1 <= ids.min() and ids.max() <= len(all_labels)):
        raise DataError(f"{ids_path} names images outside 1..{len(all_labels)} ({labels_path}).")
    labels = _check_labels(all_labels[ids - 1].astype(np.int64) - 1, 102, labels_path)
    files = [base / "jpg" / f"image_{i:05d}.jpg" for i in ids.tolist()]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of Flowers102's {split} images are missing: {missing[0]}.")
    try:  # torchvision >= 0.21 carries the 102 names
        from torchvision.datasets import Flowers102

        classes = list(getattr(Flowers102, "classes", None) or []) or None
    except ImportError:
        classes = None
    return _ImageFiles(files, labels, classes if classes and len(classes) == 102 else None)


# --- FER2013: fer2013/{fer2013.csv | icml_face_data.csv | train.csv + test.csv} -------------------


def _fer2013(root: Path, split: str) -> ArrayDataset:
    base = root / "fer2013"
    # the files torchvision accepts, in its order of preference: one file with a Usage column,
    # or Kaggle's separate train.csv / test.csv (whose test.csv carries no labels)
    layouts = (
        ("fer2013.csv", "pixels", "Usage"),
        ("icml_face_data.csv", " pixels", " Usage"),
        (f"{split}.csv", "pixels", None),
    )
    found = next(((base / f, p, u) for f, p, u in layouts if (base / f).is_file()), None)
    if found is None:
        raise DataError(
            f"{base} holds none of fer2013.csv, icml_face_data.csv or {split}.csv (FER2013)."
        )
    path, pixels, usage = found
    wanted = ("Training",) if split == "train" else ("PublicTest", "PrivateTest")
    images, labels = [], []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            if usage is not None and row.get(usage) not in wanted:
                continue
            if row.get("emotion") in (None, ""):
                raise DataError(
                    f"{path} carries no labels (no 'emotion' column, as Kaggle's test.csv): "
                    "place fer2013.csv or icml_face_data.csv there for a labelled test split."
                )
            try:
                image = np.array(row[pixels].split(), dtype=np.uint8).reshape(48, 48)
                labels.append(int(row["emotion"]))
            except (KeyError, ValueError) as e:
                raise DataError(
                    f"{path}, line {line}: not 48 x 48 pixels and a label ({e})."
                ) from None
            images.append(image)
    if not images:
        raise DataError(f"{path} holds no {split} rows (Usage {' / '.join(wanted)}).")
    return ArrayDataset(np.stack(images), _check_labels(np.array(labels), 7, path), None)

"""Write small datasets in the on-disk formats torchvision's downloads leave behind.

Each writer puts two images of each of classes 0 and 1 in both the train and the test split
(``images`` picks their pixels), under ``root`` at the place torchvision looks; it returns the
HWC uint8 images of the test split in file order, for tests of orientation.
"""

from __future__ import annotations

import csv
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

Pixels = Callable[[np.random.Generator, int, int], np.ndarray]  # (rng, label, size) -> HWC


def noise(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    base = np.array([40 + 80 * (label % 3), 200 - 60 * (label % 3), 90], np.float64)
    return np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)


LABELS = (0, 1, 0, 1)  # per split
CIFAR10_NAMES = (
    "airplane automobile bird cat deer dog frog horse ship truck".split()  # batches.meta's
)


def write_cifar(root: Path, name: str, seed: int, images: Pixels = noise) -> list[np.ndarray]:
    """cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or cifar-100-python/
    (train, test, meta): pickles of dicts with a (n, 3072) uint8 CHW ``data`` array, written
    with protocol 2 as the published (Python 2) files are."""
    rng = np.random.default_rng(seed)
    ten = name == "CIFAR10"
    base = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    base.mkdir(parents=True)
    labels_key = "labels" if ten else "fine_labels"
    names = (
        list(CIFAR10_NAMES) if ten else ["apple", "aquarium_fish", *(f"c{i}" for i in range(98))]
    )
    meta = {"label_names": names} if ten else {"fine_label_names": names, "coarse_label_names": []}
    _pickle(base / ("batches.meta" if ten else "meta"), meta)
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]}
    files["test"] = ["test_batch"] if ten else ["test"]
    shown = []
    for batches in files.values():  # train, then test
        pictures = [images(rng, c, 32) for c in LABELS]
        shown = pictures
        # CIFAR10's train split across its first two batches, the others empty: every batch
        # must be read
        parts = [LABELS] if len(batches) == 1 else [LABELS[:2], LABELS[2:]] + [()] * 3
        at = 0
        for file, part in zip(batches, parts):
            rows = pictures[at : at + len(part)]
            at += len(part)
            data = np.stack([p.transpose(2, 0, 1).reshape(-1) for p in rows]) if rows else None
            batch = {
                "batch_label": file,
                labels_key: list(part),
                "data": data if data is not None else np.zeros((0, 3072), np.uint8),
                "filenames": [f"{file}_{i}.png" for i in range(len(part))],
            }
            if not ten:
                batch["coarse_labels"] = list(part)
            _pickle(base / file, batch)
    return shown


def _pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_stl10(root: Path, seed: int, images: Pixels = noise) -> list[np.ndarray]:
    """stl10_binary/{train,test}_{X,y}.bin (column-major 3 x 96 x 96 uint8 per image, labels
    1..10 as uint8) and class_names.txt."""
    rng, base = np.random.default_rng(seed), root / "stl10_binary"
    base.mkdir(parents=True)
    names = "airplane bird car cat deer dog horse monkey ship truck".split()
    (base / "class_names.txt").write_text("\n".join(names) + "\n")
    shown = []
    for split in ("train", "test"):
        shown = [images(rng, c, 96) for c in LABELS]
        x = np.stack([p.transpose(2, 1, 0) for p in shown])  # HWC -> C, W, H
        x.tofile(base / f"{split}_X.bin")
        (np.array(LABELS, np.uint8) + 1).tofile(base / f"{split}_y.bin")
    return shown


def write_flowers102(root: Path, seed: int, images: Pixels = noise) -> list[np.ndarray]:
    """flowers-102/jpg/image_NNNNN.jpg, imagelabels.mat (labels 1..102) and setid.mat (1-based
    image ids of trnid / valid / tstid), as MATLAB files."""
    from scipy.io import savemat

    rng, base = np.random.default_rng(seed), root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    labels, ids, shown = [], {}, []
    for split in ("trnid", "valid", "tstid"):
        ids[split] = []
        for c in LABELS:
            picture = images(rng, c, 20)
            labels.append(c + 1)
            ids[split].append(len(labels))
            Image.fromarray(picture).save(base / "jpg" / f"image_{len(labels):05d}.jpg", quality=95)
            if split == "tstid":
                shown.append(picture)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], np.uint8)})
    savemat(base / "setid.mat", {k: np.array([v], np.uint16) for k, v in ids.items()})
    return shown


def write_fer2013(root: Path, seed: int, images: Pixels = noise, file: str = "fer2013.csv"):
    """fer2013/fer2013.csv: emotion, space-separated 48 x 48 grey pixels, Usage (Training,
    PublicTest, PrivateTest). ``file="train.csv"`` writes Kaggle's other layout instead:
    train.csv with labels and test.csv without."""
    rng, base = np.random.default_rng(seed), root / "fer2013"
    base.mkdir(parents=True)
    rows, shown = [], []
    for usage in ("Training", "PublicTest", "PrivateTest"):
        for c in LABELS[:2] if usage != "Training" else LABELS:
            grey = images(rng, c, 48)[..., 0]
            rows.append(
                {"emotion": c, "pixels": " ".join(map(str, grey.reshape(-1))), "Usage": usage}
            )
            if usage != "Training":
                shown.append(np.repeat(grey[..., None], 3, axis=-1))
    if file == "fer2013.csv":
        _csv(base / file, ["emotion", "pixels", "Usage"], rows)
    else:
        train = [{k: r[k] for k in ("emotion", "pixels")} for r in rows if r["Usage"] == "Training"]
        test = [{"pixels": r["pixels"]} for r in rows if r["Usage"] != "Training"]
        _csv(base / "train.csv", ["emotion", "pixels"], train)
        _csv(base / "test.csv", ["pixels"], test)
    return shown


def _csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_pcam(root: Path, seed: int, images: Pixels = noise) -> list[np.ndarray]:
    """pcam/camelyonpatch_level_2_split_{train,test}_{x,y}.h5: ``x`` (n, 96, 96, 3) uint8 and
    ``y`` (n, 1, 1, 1) uint8, as the PatchCamelyon release stores them."""
    import h5py

    rng, base = np.random.default_rng(seed), root / "pcam"
    base.mkdir(parents=True)
    shown = []
    for split in ("train", "test"):
        shown = [images(rng, c, 96) for c in LABELS]
        stem = base / f"camelyonpatch_level_2_split_{split}"
        with h5py.File(f"{stem}_x.h5", "w") as f:
            f.create_dataset("x", data=np.stack(shown))
        with h5py.File(f"{stem}_y.h5", "w") as f:
            f.create_dataset("y", data=np.array(LABELS, np.uint8).reshape(-1, 1, 1, 1))
    return shown

"""torchvision sources that surgery-edge reads itself (CIFAR10/100, STL10, Flowers102, FER2013)
or through torchvision with an optional dependency (PCAM): files written in the published
formats come back pixel for pixel, in the orientation torchvision gives, with their labels and
class names; unsafe or broken files are refused with the file's name."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from dataset_formats import (
    CIFAR10_NAMES,
    LABELS,
    write_cifar,
    write_fer2013,
    write_flowers102,
    write_pcam,
    write_stl10,
)

from surgery_edge.data.disk import DiskTask, load_disk_task
from surgery_edge.errors import DataError

NATIVE = {"CIFAR10": 32, "CIFAR100": 32, "STL10": 96, "FER2013": 48, "PCAM": 96}
WRITERS = {
    "CIFAR10": lambda root, seed: write_cifar(root, "CIFAR10", seed),
    "CIFAR100": lambda root, seed: write_cifar(root, "CIFAR100", seed),
    "STL10": write_stl10,
    "FER2013": write_fer2013,
    "PCAM": write_pcam,
}


def _load(name, root, cache, size, need_train=True, n_adapt=2):
    task = DiskTask(name, source="torchvision", path=root, dataset=name)
    return load_disk_task(
        task, size, cache, n_adapt=n_adapt, need_train=need_train, log=lambda line: None, workers=1
    )


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_images_come_back_pixel_for_pixel_in_torchvisions_orientation(name, tmp_path):
    if name == "PCAM":
        pytest.importorskip("h5py", reason="PCAM needs the `datasets` extra")
    # a gradient, not noise, so that a transposed or flipped image cannot pass
    ramp = lambda rng, label, size: np.stack(  # noqa: E731
        np.meshgrid(np.arange(size) * 2 + label, np.arange(size) * 3, indexing="ij")
        + [np.full((size, size), 7 * label)],
        axis=-1,
    ).astype(np.uint8)
    writer = {
        "CIFAR10": lambda r, s: write_cifar(r, "CIFAR10", s, ramp),
        "CIFAR100": lambda r, s: write_cifar(r, "CIFAR100", s, ramp),
        "STL10": lambda r, s: write_stl10(r, s, ramp),
        "FER2013": lambda r, s: write_fer2013(r, s, ramp),
        "PCAM": lambda r, s: write_pcam(r, s, ramp),
    }[name]
    shown = writer(tmp_path / "tv", 0)
    data = _load(name, tmp_path / "tv", tmp_path / "cache", NATIVE[name])
    assert data.test_x.shape == (len(shown), NATIVE[name], NATIVE[name], 3)
    for got, wrote in zip(data.test_x, shown):
        np.testing.assert_array_equal(got, wrote)
    assert data.test_y.tolist() == list(LABELS[: len(shown)])
    assert data.train_y.tolist() == list(LABELS)


def test_class_names_come_from_the_files_or_torchvision(tmp_path):
    named = [name for name in WRITERS if name != "PCAM"]  # PCAM's files carry no names
    for name in named:
        WRITERS[name](tmp_path / name, 0)
    write_flowers102(tmp_path / "Flowers102", 0)
    names = {
        name: _load(name, tmp_path / name, tmp_path / "cache", 8, need_train=False).class_names
        for name in [*named, "Flowers102"]
    }
    assert names["CIFAR10"] == list(CIFAR10_NAMES)
    assert names["CIFAR100"][:2] == ["apple", "aquarium_fish"] and len(names["CIFAR100"]) == 100
    assert names["STL10"][:3] == ["airplane", "bird", "car"]
    assert len(names["Flowers102"]) == 102  # torchvision's names, or the ids on older versions
    assert names["FER2013"] == [str(i) for i in range(7)]  # the recipe supplies the words


def test_flowers102_reads_the_split_lists(tmp_path):
    write_flowers102(tmp_path / "tv", 0)
    data = _load("Flowers102", tmp_path / "tv", tmp_path / "cache", 8)
    assert data.test_y.tolist() == list(LABELS) and data.train_y.tolist() == list(LABELS)
    # the test split is tstid's images (ids 9-12), not trnid's: their pixels differ
    assert not np.array_equal(data.test_x, data.train_x)


def test_a_pickle_that_names_code_is_refused_before_anything_runs(tmp_path):
    write_cifar(tmp_path / "tv", "CIFAR10", 0)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "tv" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Payload(), "labels": []}, f, protocol=2)
    with pytest.raises(DataError, match=r"test_batch is not a plain data pickle: it names "):
        _load("CIFAR10", tmp_path / "tv", tmp_path / "cache", 8, need_train=False)
    assert not marker.exists()


def test_missing_and_broken_files_name_the_file(tmp_path):
    write_cifar(tmp_path / "c", "CIFAR10", 0)
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3 is missing .*download=True"):
        _load("CIFAR10", tmp_path / "c", tmp_path / "cache", 8)

    write_stl10(tmp_path / "s", 0)
    x = tmp_path / "s" / "stl10_binary" / "test_X.bin"
    x.write_bytes(x.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"test_X.bin is \d+ bytes, not a whole number of images"):
        _load("STL10", tmp_path / "s", tmp_path / "cache", 8, need_train=False)

    write_stl10(tmp_path / "l", 0)
    np.array([11, 1, 1, 1], np.uint8).tofile(tmp_path / "l" / "stl10_binary" / "test_y.bin")
    with pytest.raises(DataError, match=r"test_y.bin: labels run from 0 to 10; .* 10 classes"):
        _load("STL10", tmp_path / "l", tmp_path / "cache", 8, need_train=False)

    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match=r"holds none of fer2013.csv, icml_face_data.csv"):
        _load("FER2013", tmp_path / "e", tmp_path / "cache", 8, need_train=False)


def test_fer2013_kaggle_layout_trains_but_has_no_labelled_test_split(tmp_path):
    write_fer2013(tmp_path / "tv", 0, file="train.csv")
    with pytest.raises(DataError, match=r"test.csv carries no labels .*fer2013.csv"):
        _load("FER2013", tmp_path / "tv", tmp_path / "cache", 8, need_train=False)


def test_pcam_without_h5py_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(DataError, match=r"needs h5py: pip install 'surgery-edge\[datasets\]'"):
        _load("PCAM", tmp_path, tmp_path / "cache", 8, need_train=False)

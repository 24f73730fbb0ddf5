"""Datasets from disk: folder and torchvision sources, CLIP preprocessing, the .npy cache."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgery_edge.data import decoded
from surgery_edge.data.decoded import preprocess_image
from surgery_edge.data.disk import DiskTask, load_class_names, load_disk_task
from surgery_edge.errors import ConfigError, DataError

CLASSES = ("annual_crop", "forest", "river")
SIZES = ((20, 12), (9, 30))  # (width, height): landscape and portrait, neither square
S = 16


def _write_image(path, size, seed, ext="png"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path.with_suffix(f".{ext}"))
    return path.with_suffix(f".{ext}")


def _make_task(root, n_test=2, n_train=3, train=True, classes=CLASSES):
    """``root/test/<class>/`` (and ``train/``) with small images of alternating sizes."""
    seed = 0
    for split, n in (("test", n_test), ("train", n_train if train else 0)):
        for c in classes:
            for i in range(n):
                seed += 1
                ext = "JPG" if i == 2 else "png"  # upper-case extensions count too
                _write_image(root / split / c / f"img{i}", SIZES[i % 2], seed, ext)
    return root


def _load(root, cache, **kwargs):
    task_kwargs = {k: kwargs.pop(k) for k in ("class_names",) if k in kwargs}
    kwargs.setdefault("log", lambda line: None)
    task = DiskTask("Sat", path=root, **task_kwargs)
    return load_disk_task(task, S, cache, workers=2, **kwargs)


def _expected(path, size=S):
    """Resize the shorter side to ``size`` (bicubic), center-crop: written out independently."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    if w < h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return np.asarray(image)[top : top + size, left : left + size]


def test_folder_round_trip(tmp_path):
    root = _make_task(tmp_path / "sat")
    data = _load(root, tmp_path / "cache", need_train=True)

    assert data.name == "Sat"
    assert data.class_names == ["annual crop", "forest", "river"]
    assert data.test_x.shape == (6, S, S, 3) and data.test_x.dtype == np.uint8
    assert data.test_y.dtype == np.int64
    assert data.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.train_x.shape == (9, S, S, 3)
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert isinstance(data.test_x, np.memmap)  # served from the cache, not held in memory
    np.testing.assert_array_equal(data.test_x[1], _expected(root / "test/annual_crop/img1.png"))
    np.testing.assert_array_equal(data.train_x[5], _expected(root / "train/forest/img2.JPG"))


@pytest.mark.parametrize("size", [7, 16])
@pytest.mark.parametrize("width,height", [(9, 30), (31, 10), (17, 17), (40, 25), (16, 50)])
def test_crop_matches_torchvision(width, height, size):
    from torchvision import transforms as T

    image = Image.fromarray(
        np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8)
    )
    reference = T.Compose(
        [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    )
    np.testing.assert_array_equal(preprocess_image(image, size), np.asarray(reference(image)))


def test_greyscale_becomes_three_equal_channels():
    image = Image.fromarray(np.arange(12 * 20, dtype=np.uint8).reshape(12, 20), mode="L")
    out = preprocess_image(image, 8)
    assert out.shape == (8, 8, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_adapt_folder_is_used_whole(tmp_path):
    root = _make_task(tmp_path / "sat")
    _write_image(root / "adapt/a", (20, 12), 100)
    _write_image(root / "adapt/deeper/more/b", (9, 30), 101)
    (root / "adapt/notes.txt").write_text("not an image")
    data = _load(root, tmp_path / "cache", n_adapt=1)
    assert data.adapt_x.shape == (2, S, S, 3)
    np.testing.assert_array_equal(data.adapt_x[0], _expected(root / "adapt/a.png"))
    assert data.train_x.shape == (0, S, S, 3) and data.train_y.shape == (0,)


def test_adapt_sampled_from_train_with_seed(tmp_path):
    root = _make_task(tmp_path / "sat", n_train=4)
    cache = tmp_path / "cache"
    first = _load(root, cache, n_adapt=3, seed=0, need_train=True)
    again = _load(root, tmp_path / "other-cache", n_adapt=3, seed=0)
    other = _load(root, cache, n_adapt=3, seed=1)

    assert first.adapt_x.shape == (3, S, S, 3)
    np.testing.assert_array_equal(first.adapt_x, again.adapt_x)
    assert not np.array_equal(first.adapt_x, other.adapt_x)
    train = {img.tobytes() for img in first.train_x}
    assert all(img.tobytes() in train for img in first.adapt_x)
    everything = _load(root, cache, n_adapt=100)
    assert everything.adapt_x.shape == (12, S, S, 3)  # all of train when it holds fewer


def test_no_train_leaves_adapt_empty(tmp_path):
    root = _make_task(tmp_path / "sat", train=False)
    data = _load(root, tmp_path / "cache")
    assert data.adapt_x.shape == (0, S, S, 3)
    assert data.test_x.shape == (6, S, S, 3)
    with pytest.raises(DataError, match="train"):
        _load(root, tmp_path / "cache", need_train=True)


def test_class_names_from_json_list_and_dict(tmp_path):
    root = _make_task(tmp_path / "sat", train=False)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["crops", "woods", "water"]))
    assert _load(root, tmp_path / "c", class_names=names).class_names == ["crops", "woods", "water"]
    names.write_text(json.dumps({"river": "a river", "annual_crop": "crops", "forest": "trees"}))
    assert load_class_names(names)["river"] == "a river"
    assert _load(root, tmp_path / "c", class_names=names).class_names == [
        "crops",
        "trees",
        "a river",
    ]


@pytest.mark.parametrize(
    "content,match",
    [
        (["a", "b"], "lists 2 names but .* has 3 classes"),
        ({"annual_crop": "a", "forest": "b"}, "no name for 1 of the 3 classes.*'river'"),
        ({"annual_crop": 1}, "not a list of strings"),
        ("{not json", "unreadable"),
    ],
)
def test_class_names_that_do_not_fit(tmp_path, content, match):
    root = _make_task(tmp_path / "sat", train=False)
    names = tmp_path / "bad-names.json"
    names.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=match) as info:
        _load(root, tmp_path / "cache", class_names=names)
    assert "bad-names.json" in str(info.value)


def test_missing_or_empty_test_folder(tmp_path):
    root = tmp_path / "sat"
    (root / "train/forest").mkdir(parents=True)
    with pytest.raises(DataError, match=r"sat/test is missing; expected .*test/<class>"):
        _load(root, tmp_path / "cache")
    (root / "test/forest").mkdir(parents=True)
    (root / "test/README.txt").write_text("images go here")
    with pytest.raises(DataError, match=r"sat/test holds no images"):
        _load(root, tmp_path / "cache")


def test_train_and_test_class_folders_must_match(tmp_path):
    root = _make_task(tmp_path / "sat")
    (root / "train/lake").mkdir()
    with pytest.raises(DataError, match=r"sat/train and .*sat/test differ.*only in train: 'lake'"):
        _load(root, tmp_path / "cache")


def test_unreadable_images_are_skipped_with_one_warning(tmp_path):
    root = _make_task(tmp_path / "sat", train=False)
    (root / "test/forest/fake.jpg").write_text("this is not a JPEG")
    good = (root / "test/river/img0.png").read_bytes()
    (root / "test/river/truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning) as record:
        data = _load(root, tmp_path / "cache")
    assert len(record) == 1  # one report per task and split, not one per image
    message = str(record[0].message)
    assert re.search(r"skipped 2 unreadable image\(s\) of 8 in .*sat/test", message)
    assert "fake.jpg" in message and "truncated.png" in message
    assert data.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(data.test_x[2], _expected(root / "test/forest/img0.png"))

    only_bad = tmp_path / "bad"
    (only_bad / "test/x").mkdir(parents=True)
    (only_bad / "test/x/a.png").write_text("nope")
    with pytest.raises(DataError, match="none of the 1 images"):
        _load(only_bad, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob(".*"))  # the failed write left no temporary file


def test_cache_hit_decodes_nothing_and_changes_invalidate(tmp_path, monkeypatch):
    root = _make_task(tmp_path / "sat", train=False)
    cache = tmp_path / "cache"
    lines = []
    first = _load(root, cache, log=lines.append)
    assert len(lines) == 1 and "decoded 6 test images" in lines[0]
    assert sorted(p.name.split("-")[1] for p in cache.glob("*.npy")) == ["test", "test"]
    assert not list(cache.glob(".*"))  # no temporary files left behind

    def no_decoding(image, size):
        raise AssertionError("decoded on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(decoded, "preprocess_image", no_decoding)
        hit = _load(root, cache, log=lines.append)
    assert len(lines) == 1
    np.testing.assert_array_equal(hit.test_x, first.test_x)

    _write_image(root / "test/forest/img0", (30, 30), 999)  # new size and mtime
    changed = _load(root, cache, log=lines.append)
    assert len(lines) == 2
    np.testing.assert_array_equal(changed.test_x[2], _expected(root / "test/forest/img0.png"))


def _write_idx(path, data: np.ndarray):
    magic = 0x0801 if data.ndim == 1 else 0x0803
    path.write_bytes(struct.pack(">" + "i" * (1 + data.ndim), magic, *data.shape) + data.tobytes())


@pytest.fixture
def mnist_root(tmp_path):
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {"train": (5, [3, 1, 4, 1, 5]), "t10k": (4, [9, 2, 6, 5])}
    for prefix, (n, labels) in splits.items():
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array(labels, np.uint8))
    return tmp_path / "tv"


def test_torchvision_mnist(tmp_path, mnist_root):
    task = DiskTask("MNIST", source="torchvision", path=mnist_root, dataset="MNIST")
    data = load_disk_task(
        task, 8, tmp_path / "cache", n_adapt=2, need_train=True, log=lambda line: None, workers=2
    )
    assert data.class_names[:2] == ["0 - zero", "1 - one"] and data.num_classes == 10
    assert data.test_y.tolist() == [9, 2, 6, 5]
    assert data.train_y.tolist() == [3, 1, 4, 1, 5]
    assert data.test_x.shape == (4, 8, 8, 3) and data.adapt_x.shape == (2, 8, 8, 3)
    assert (data.test_x[..., 0] == data.test_x[..., 2]).all()
    raw = (mnist_root / "MNIST/raw/t10k-images-idx3-ubyte").read_bytes()[16 : 16 + 28 * 28]
    digit = Image.fromarray(np.frombuffer(raw, np.uint8).reshape(28, 28), mode="L")
    np.testing.assert_array_equal(data.test_x[0], preprocess_image(digit, 8))

    names = tmp_path / "digits.json"
    names.write_text(json.dumps({str(i): f"digit {i}" for i in range(10)}))
    task = DiskTask("MNIST", "torchvision", mnist_root, "MNIST", class_names=names)
    data = load_disk_task(task, 8, tmp_path / "cache", n_adapt=0, log=lambda line: None)
    assert data.class_names[9] == "digit 9" and data.adapt_x.shape == (0, 8, 8, 3)
    names.write_text(json.dumps(["zero", "one"]))
    with pytest.raises(DataError, match="digits.json lists 2 names but torchvision MNIST has 10"):
        load_disk_task(task, 8, tmp_path / "cache", log=lambda line: None)


def test_torchvision_without_official_split(tmp_path):
    root = tmp_path / "tv"
    for k, c in enumerate(("Forest", "River")):
        for i in range(5):
            _write_image(root / "eurosat/2750" / c / f"{c}_{i}", (12, 12), 10 * k + i, "jpg")
    task = DiskTask("EuroSAT", "torchvision", root, "EuroSAT", test_fraction=0.4)
    data = load_disk_task(
        task, 8, tmp_path / "cache", need_train=True, n_adapt=3, log=lambda line: None
    )
    assert data.class_names == ["Forest", "River"]
    assert len(data.test_x) == 4 and len(data.train_x) == 6 and len(data.adapt_x) == 3
    test = {img.tobytes() for img in data.test_x}
    assert not any(img.tobytes() in test for img in data.train_x)


def test_torchvision_errors(tmp_path):
    def load(dataset, root=tmp_path / "nothing-here"):
        task = DiskTask("T", source="torchvision", path=root, dataset=dataset)
        return load_disk_task(task, 8, tmp_path / "cache", log=lambda line: None)

    with pytest.raises(DataError, match=r"MNIST .*nothing-here.*never downloads"):
        load("MNIST")
    with pytest.raises(DataError, match=r"batches.meta is missing .*never downloads"):
        load("CIFAR10")  # read by surgery-edge itself: the same advice
    with pytest.raises(ConfigError, match="unknown torchvision dataset 'ImageNet'.*'SUN397'"):
        load("ImageNet")
    with pytest.raises(ConfigError, match="RESISC45 is not a torchvision dataset: use the folder"):
        load("RESISC45")


def test_invalid_options(tmp_path):
    root = _make_task(tmp_path / "sat", train=False)
    with pytest.raises(ConfigError, match="unknown source 'zip'"):
        load_disk_task(DiskTask("T", source="zip", path=root), S, tmp_path)
    with pytest.raises(ConfigError, match="n_adapt"):
        _load(root, tmp_path / "cache", n_adapt=-1)
    with pytest.raises(ConfigError, match="no path"):
        load_disk_task(DiskTask("T"), S, tmp_path)


def test_torchvision_gtsrb_reads_the_test_csv(tmp_path):
    """GTSRB's real layout: class folders of .ppm for train, one folder + a CSV for test."""
    root = tmp_path / "tv"
    base = root / "gtsrb"
    for cls in range(43):  # torchvision numbers the training folders by their sorted position
        folder = base / "GTSRB" / "Training" / f"{cls:05d}"
        folder.mkdir(parents=True)
        Image.new("RGB", (15, 11), (cls * 5, 10, 10)).save(folder / "00000_00000.ppm")
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, cls in enumerate((42, 0, 7)):
        Image.new("RGB", (9, 14), (10, cls * 5, 10)).save(test_dir / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;9;14;1;1;8;13;{cls}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    task = DiskTask("GTSRB", "torchvision", root, "GTSRB")
    data = load_disk_task(task, 8, tmp_path / "cache", n_adapt=3, need_train=True, log=lambda *a: 0)
    assert data.num_classes == 43  # GTSRB has no `classes` attribute: all 43 ids
    assert data.test_y.tolist() == [42, 0, 7] and data.train_y.tolist() == list(range(43))
    expected = preprocess_image(Image.open(test_dir / "00002.ppm"), 8)
    np.testing.assert_array_equal(data.test_x[2], expected)


def test_split_lists_as_resisc45_ships_them(tmp_path):
    """RESISC45: one folder per class, and text files listing each split's file names."""
    root = tmp_path / "resisc45"
    for c in ("airplane", "baseball_diamond"):
        for i in range(1, 4):
            _write_image(root / "NWPU-RESISC45" / c / f"{c}_{i:03d}", SIZES[i % 2], i, "jpg")
    (root / "resisc45-test.txt").write_text("baseball_diamond_002.jpg\nairplane_001.jpg\n\n")
    (root / "resisc45-train.txt").write_text(
        "airplane_002.jpg\nNWPU-RESISC45/baseball_diamond/baseball_diamond_001.jpg\n"
    )
    lists = (("test", Path("resisc45-test.txt")), ("train", Path("resisc45-train.txt")))
    task = DiskTask("RESISC45", path=root, split_lists=lists)
    data = load_disk_task(task, S, tmp_path / "cache", need_train=True, log=lambda line: None)
    assert data.class_names == ["airplane", "baseball diamond"]
    assert data.test_y.tolist() == [1, 0] and data.train_y.tolist() == [0, 1]
    expected = _expected(root / "NWPU-RESISC45" / "baseball_diamond" / "baseball_diamond_002.jpg")
    np.testing.assert_array_equal(data.test_x[0], expected)
    assert data.adapt_x.shape[0] == 2  # sampled from the listed train images

    (root / "resisc45-test.txt").write_text("airplane_001.jpg\nairplane_999.jpg\n")
    with pytest.raises(DataError, match=r"1 images listed in .*resisc45-test.txt are not under"):
        load_disk_task(task, S, tmp_path / "cache", log=lambda line: None)
    _write_image(root / "copy" / "airplane_001", (20, 20), 5, "jpg")
    (root / "resisc45-test.txt").write_text("airplane_001.jpg\n")
    with pytest.raises(DataError, match="matches 2 images"):
        load_disk_task(task, S, tmp_path / "cache", log=lambda line: None)
    with pytest.raises(ConfigError, match="needs a 'test' list"):
        load_disk_task(
            DiskTask("RESISC45", path=root, split_lists=lists[1:]), S, tmp_path / "cache"
        )


def test_links_and_fifos_never_change_the_image_count(tmp_path):
    """One ``loop -> .`` link made a class count its images 215 times instead of 15; two of
    them, or a FIFO named like an image, hung the run."""
    root = _make_task(tmp_path / "sat", train=False)
    forest = root / "test" / "forest"
    os.symlink(".", forest / "loop")
    os.symlink("..", forest / "up")
    os.symlink("../river", forest / "river_too")  # another class's images: not forest's
    os.symlink("img0.png", forest / "again.png")  # the same image under a second name
    os.mkfifo(forest / "zz.png")
    os.symlink(".", root / "test" / "loop")  # a link in the split folder is no class either
    with pytest.warns(UserWarning) as record:
        data = _load(root, tmp_path / "cache")
    assert data.test_y.tolist() == [0, 0, 1, 1, 2, 2]  # as without the links
    (message,) = [str(w.message) for w in record]
    assert "skipped 1 entries" in message and "zz.png (a FIFO (named pipe), not a file)" in message
    assert "did not follow 4 links" in message


def test_an_empty_cache_file_is_decoded_again(tmp_path):
    root = _make_task(tmp_path / "sat", train=False)
    first = np.array(_load(root, tmp_path / "cache").test_x)  # a copy: the map goes below
    for path in (tmp_path / "cache").glob("*.x.npy"):
        path.write_bytes(b"")  # numpy raises EOFError on it
    again = _load(root, tmp_path / "cache")
    np.testing.assert_array_equal(again.test_x, first)


def test_a_decoded_split_changed_in_place_is_decoded_again(tmp_path):
    """The cache was trusted by its shape alone: images edited in place, or labels swapped,
    trained and evaluated without a word. Now the split's SHA-256s, recorded when it was
    decoded, are checked on every open; a mismatch warns and decodes again."""
    root = _make_task(tmp_path / "sat", train=False)
    cache = tmp_path / "cache"
    first = _load(root, cache)
    want_x, want_y = np.array(first.test_x), np.array(first.test_y)
    del first  # the memory maps, before the files are edited
    (x_path,) = cache.glob("*.x.npy")
    (y_path,) = cache.glob("*.y.npy")
    for path, offset in ((x_path, -1), (y_path, -8)):
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        lines = []
        with pytest.warns(UserWarning, match="changed since they were decoded"):
            again = _load(root, cache, log=lines.append)
        assert len(lines) == 1 and "decoded 6 test images" in lines[0]
        np.testing.assert_array_equal(again.test_x, want_x)
        np.testing.assert_array_equal(again.test_y, want_y)
        del again
    next(cache.glob("*.sha256.json")).unlink()  # a cache from before the digests
    lines = []
    _load(root, cache, log=lines.append)
    assert len(lines) == 1 and list(cache.glob("*.sha256.json"))

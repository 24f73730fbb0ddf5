"""The pickle sandbox constrains state, not only classes: hostile pickles written here are refused.

Every file is written by the real classes' pickling (``task_vectors_classes``), then given one
hostile twist: pickled attributes that shadow methods, hooks, stride-0 giants, storages larger
than the file, FIFOs in archives, loads that never end.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from checkpoint_formats import micro_clip, task_vectors_classes
from torch import nn

from surgery_edge.errors import CheckpointError
from surgery_edge.models import get_arch
from surgery_edge.models.convert.archives import import_budget
from surgery_edge.models.convert.open_clip import load_open_clip_image_tower
from surgery_edge.models.convert.sandbox import load_pickle_restricted
from surgery_edge.models.convert.task_vectors import _read_pickled_head, import_task_vectors
from surgery_edge.models.convert.towers import with_activation

MICRO = get_arch("micro-vit-16")


def _encoder(modeling, seed=0):
    return modeling.ImageEncoder(micro_clip(quick_gelu=True, seed=seed))


def _save_encoder(path: Path, twist) -> Path:
    with task_vectors_classes() as modeling:
        enc = _encoder(modeling)
        twist(enc)
        torch.save(enc, path)
    return path


def test_a_parameter_that_shadows_detach_is_refused(tmp_path):
    """Issue 20 case 7: ``detach = builtins.set`` pickled on a Parameter never reaches the
    importer's ``.detach()``."""
    with task_vectors_classes() as modeling:
        head = modeling.ClassificationHead(True, torch.randn(3, 24), torch.zeros(3))
        head.weight.detach = set
        torch.save(head, tmp_path / "head.pt")
    with pytest.raises(CheckpointError, match=r"head.pt: .*sets attributes \['detach'\]"):
        _read_pickled_head(tmp_path / "head.pt", with_activation(MICRO, True))


def test_a_tensor_that_shadows_is_floating_point_is_refused(tmp_path):
    def twist(enc):
        enc.model.visual.conv1.weight.is_floating_point = set

    path = _save_encoder(tmp_path / "enc.pt", twist)
    with pytest.raises(CheckpointError, match=r"sets attributes \['is_floating_point'\]"):
        load_pickle_restricted(path)


@pytest.mark.parametrize("method", ["state_dict", "float", "parameters", "named_modules"])
def test_module_state_that_shadows_a_method_is_refused(tmp_path, method):
    def twist(enc):
        object.__setattr__(enc.model.visual, method, set)

    path = _save_encoder(tmp_path / "enc.pt", twist)
    with pytest.raises(CheckpointError, match=f"sets '{method}', which would replace a method"):
        load_pickle_restricted(path)


def test_pickled_hooks_are_refused(tmp_path):
    def twist(enc):
        enc.model.visual.register_forward_hook(set)

    path = _save_encoder(tmp_path / "enc.pt", twist)
    with pytest.raises(CheckpointError, match="carries hooks in _forward_hooks"):
        load_pickle_restricted(path)


def test_module_tables_hold_only_their_kind(tmp_path):
    def twist(enc):
        enc.model.visual._parameters["junk"] = OrderedDict()

    path = _save_encoder(tmp_path / "enc.pt", twist)
    with pytest.raises(CheckpointError, match=r"_parameters\['junk'\] of type OrderedDict"):
        load_pickle_restricted(path)


GIANT = (100_000, 10_000)  # 4 GB of float32 once materialised, 4 bytes on disk


def test_a_stride_zero_giant_in_a_pickle_is_refused_before_any_allocation(tmp_path):
    def twist(enc):
        giant = torch.zeros(1).expand(*GIANT)
        enc.model.visual._parameters["positional_embedding"] = nn.Parameter(giant)

    path = _save_encoder(tmp_path / "enc.pt", twist)
    assert path.stat().st_size < 10**6
    with pytest.raises(CheckpointError, match=r"shape \(100000, 10000\) \(stride \(0, 0\)\)"):
        load_pickle_restricted(path)


def test_a_stride_zero_giant_through_the_open_clip_path_is_refused(tmp_path):
    state = {k: v for k, v in micro_clip(False, 0).state_dict().items()}
    state["visual.positional_embedding"] = torch.zeros(1).expand(*GIANT)
    torch.save(state, tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match="stride 0 or overlapping"):
        load_open_clip_image_tower(tmp_path / "clip.pt", MICRO)


def test_storage_declared_larger_than_the_file_is_refused(tmp_path):
    """A legacy-format file whose pickle declares a 4 GB storage over 3 KB of data."""
    path = tmp_path / "lying.pt"
    torch.save(OrderedDict(w=torch.zeros(777)), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    # 777 as pickle's BININT2: first the storage's element count (its persistent id), then the
    # tensor's size. Only the storage is made to lie.
    declared = b"M" + (777).to_bytes(2, "little")
    assert data.count(declared) == 2
    path.write_bytes(data.replace(declared, b"J" + (10**9).to_bytes(4, "little"), 1))
    with pytest.raises(CheckpointError, match="declares 4,000,000,000 bytes of tensor storage"):
        load_pickle_restricted(path)


def _tar_with_fifo(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        sys_info = tarfile.TarInfo("sys_info")
        payload = b"\x80\x02}q\x00."  # an empty dict
        sys_info.size = len(payload)
        tar.addfile(sys_info, io.BytesIO(payload))
        fifo = tarfile.TarInfo("storages")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    return path


def test_a_fifo_in_a_legacy_tar_checkpoint_is_refused_at_once(tmp_path):
    """It used to block the importer forever (and leave its staging folder behind)."""
    root = tmp_path / "tv"
    model_dir = root / "micro-vit-16"
    (model_dir / "MNIST").mkdir(parents=True)
    _tar_with_fifo(model_dir / "zeroshot.pt")
    _save_encoder(model_dir / "MNIST" / "finetuned.pt", lambda enc: None)
    with task_vectors_classes() as modeling:
        torch.save(
            modeling.ClassificationHead(True, torch.randn(3, 24), torch.zeros(3)),
            model_dir / "head_MNIST.pt",
        )
    out = tmp_path / "out"
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="'storages' is not a regular file"):
        import_task_vectors(root, "micro-vit-16", out, trust_pickle=True, log=lambda *a: None)
    assert time.perf_counter() - started < 30
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tv"]


def test_archive_members_must_be_stored_regular_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(3)}, good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item))
    with pytest.raises(CheckpointError, match="is compressed"):
        load_pickle_restricted(bad)
    with pytest.raises(CheckpointError, match="is compressed"):
        load_open_clip_image_tower(bad, MICRO)


def test_every_import_has_a_time_budget(tmp_path, monkeypatch):
    """A read that never ends (a FIFO nobody writes to) is abandoned when the budget runs out."""
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="took more than 0.3 s, so it was abandoned"):
        with import_budget(fifo, seconds=0.3):
            fifo.open("rb").read()
    assert time.perf_counter() - started < 5
    monkeypatch.setenv("SURGERY_EDGE_IMPORT_TIMEOUT", "soon")
    with pytest.raises(CheckpointError, match="not a positive number of seconds"):
        load_pickle_restricted(_save_encoder(tmp_path / "enc.pt", lambda enc: None))


def test_ordinary_pickles_still_import(tmp_path):
    path = _save_encoder(tmp_path / "enc.pt", lambda enc: None)
    obj = load_pickle_restricted(path)
    assert type(obj).__name__ == "ImageEncoder"

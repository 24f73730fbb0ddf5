"""Image decoding opens only the allowed formats, so no external decoder runs on a user's bytes.

Pillow left to guess opens an EPS file by running Ghostscript: the bytes of a request or of a
file in a dataset folder would choose a program to run. Each test puts a fake ``gs`` first on
PATH that records whether it ran.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from image_files import EPS_BYTES, PDF_BYTES, fake_ghostscript, png_bytes
from PIL import Image

from surgery_edge.errors import ExportError
from surgery_edge.runtime.preprocess import IMAGE_FORMATS, open_image


def test_unrestricted_pillow_would_run_the_fake_gs(tmp_path, monkeypatch):
    """The trap works: Pillow's own ``Image.open`` runs it on EPS bytes."""
    marker = fake_ghostscript(tmp_path, monkeypatch)
    with pytest.raises(OSError), Image.open(io.BytesIO(EPS_BYTES)) as image:
        image.load()  # the fake gs renders no image
    assert marker.exists()


@pytest.mark.parametrize("kind", ["eps", "pdf"])
def test_eps_and_pdf_are_refused_without_running_anything(tmp_path, monkeypatch, kind):
    data = {"eps": EPS_BYTES, "pdf": PDF_BYTES}[kind]
    marker = fake_ghostscript(tmp_path, monkeypatch)
    path = tmp_path / f"photo.{kind}"
    path.write_bytes(data)
    disguised = tmp_path / "photo.png"  # the name does not decide the format: the bytes do
    disguised.write_bytes(data)
    for source, name in ((path, str(path)), (disguised, str(disguised)), (data, "bytes")):
        with pytest.raises(ExportError) as info:
            open_image(source)
        message = str(info.value)
        assert name in message if name != "bytes" else "encoded image" in message
        assert "not a readable image in an allowed format" in message
        assert ", ".join(IMAGE_FORMATS) in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"), ("GIF", "gif"),
     ("TIFF", "tif"), ("PPM", "ppm"), ("PPM", "pgm")],
)  # fmt: skip
def test_every_allowed_format_decodes(tmp_path, fmt, suffix):
    pixels = np.random.default_rng(0).integers(0, 256, (9, 13, 3), np.uint8)
    image = Image.fromarray(pixels).convert("L" if suffix == "pgm" else "RGB")
    path = tmp_path / f"x.{suffix}"
    image.save(path, format=fmt)
    decoded = open_image(path)
    assert decoded.format == fmt and decoded.size == (13, 9)
    assert open_image(path.read_bytes()).size == (13, 9)


def test_a_dataset_folder_skips_eps_and_pdf_files_by_name(tmp_path, monkeypatch):
    from surgery_edge.data.disk import DiskTask, load_disk_task

    marker = fake_ghostscript(tmp_path, monkeypatch)
    root = tmp_path / "sat"
    for c in ("forest", "river"):
        (root / "test" / c).mkdir(parents=True)
        (root / "test" / c / "good.png").write_bytes(png_bytes(12, 9))
    (root / "test/forest/evil.png").write_bytes(EPS_BYTES)
    (root / "test/river/doc.tif").write_bytes(PDF_BYTES)
    with pytest.warns(UserWarning) as record:
        data = load_disk_task(
            DiskTask("Sat", path=root), 8, tmp_path / "cache", log=lambda line: None
        )
    message = str(record[0].message)
    assert re.search(r"skipped 2 unreadable image\(s\) of 4", message)
    assert "evil.png" in message and "doc.tif" in message and "PNG, JPEG" in message
    assert data.test_y.tolist() == [0, 1]
    assert not marker.exists()

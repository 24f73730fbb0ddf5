"""Small image files the tests write: ordinary PNGs, decompression bombs, and files of formats
that Pillow would hand to an external program (EPS: Ghostscript)."""

from __future__ import annotations

import io
import os
import shlex
import struct
import zlib
from pathlib import Path

from PIL import Image


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds one short row: a few
    dozen bytes, gigabytes if a decoder believed it (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def png_bytes(width: int = 40, height: int = 30, colour=(200, 30, 30)) -> bytes:
    """An ordinary RGB PNG of one colour."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


# An EPS file Pillow identifies (header and bounding box); decoding it runs Ghostscript.
EPS_BYTES = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    b"0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)
PDF_BYTES = (
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
    b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
)


def fake_ghostscript(folder: Path, monkeypatch) -> Path:
    """Put a ``gs`` first on PATH that only records that it ran (in the returned marker file,
    which exists only if it ran), and make Pillow look for Ghostscript again."""
    from PIL import EpsImagePlugin

    marker, bin_dir = folder / "gs-ran", folder / "fake-bin"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(marker))}\n')  # renders nothing
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches where gs is
    return marker

"""The digests that bind an engine's metadata to its bytes (engine format 3), standard library only.

The metadata's ``integrity`` record holds the SHA-256 of the artefact itself, so the metadata is
bound to the graph and weights it describes and a changed or damaged copy is refused
(:func:`surgery_edge.engine_format.verify_engine`) instead of answering wrongly. The export
writes the record with a placeholder of the digest's length, hashes the artefact as written,
then puts the digest in the placeholder's place (same length: no protobuf length prefix or zip
offset moves); a reader puts the placeholder back and hashes again. What is hashed:

- ONNX: the ``.onnx`` file's bytes; each external-data file's SHA-256 is recorded under
  ``integrity.files`` (so it is covered too);
- ``.pt2``: every member of the zip archive (name, size and contents, in archive order);
- TensorRT: the sidecar's text, which records the engine's own SHA-256 (``engine_sha256``).

It is a checksum, not a signature: it detects edits and damage (a partial copy, flipped bits,
metadata edited by hand), not someone who re-computes it. Each file is hashed once per process
(remembered by path, size, mtime and inode).

This module knows bytes and archives, not the metadata's schema (that is
:mod:`surgery_edge.engine_format`, which calls it).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

from surgery_edge.errors import ExportError
from surgery_edge.io import atomic_path

INTEGRITY_KEY = "integrity"
# Written where the digest goes, then replaced by it: 64 characters like a SHA-256 hex digest,
# none of them a hex digit, so the one can never be taken for the other.
DIGEST_PLACEHOLDER = "#" * 64
MAX_METADATA_BYTES = 1 << 24  # a package's metadata JSON is kilobytes; not read whole beyond
HEX64 = re.compile(r"[0-9a-f]{64}")

_BLOCK = 1 << 22
# SHA-256s computed in this process: (path, size, mtime, inode, device, token) -> digest. A
# server that loads an engine again (or info after load) does not hash it twice; a file
# changed on disk changes its key (a change that keeps size and mtime goes unseen only until
# the process ends).
_DIGESTS: dict[tuple, str | None] = {}


def remembered(path: Path, token: str, compute: Callable[[], str | None]) -> str | None:
    """``compute()``, or what it gave for this file (same path, size, mtime, inode) and token."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, token)
    if key not in _DIGESTS:
        _DIGESTS[key] = compute()
    return _DIGESTS[key]


def _hash_range(f, h, start: int, end: int) -> None:
    f.seek(start)
    left = end - start
    while left > 0 and (block := f.read(min(_BLOCK, left))):
        h.update(block)
        left -= len(block)


def sealed_file_digest(path: Path, token: str) -> str | None:
    """SHA-256 of the file with ``token`` (which must occur exactly once) read as the
    placeholder; None when it does not occur exactly once."""
    needle = token.encode("ascii")
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            at = m.find(needle)
            if at < 0 or m.find(needle, at + 1) >= 0:
                return None
        h = hashlib.sha256()
        _hash_range(f, h, 0, at)
        h.update(DIGEST_PLACEHOLDER.encode("ascii"))
        _hash_range(f, h, at + len(needle), size)
    return h.hexdigest()


def is_metadata_member(info: zipfile.ZipInfo) -> bool:
    """A package member that may hold the engine metadata: a small JSON file (read whole)."""
    return info.filename.endswith(".json") and info.file_size <= MAX_METADATA_BYTES


def _members_digest(z: zipfile.ZipFile, metadata: Callable[[bytes], bytes]) -> str:
    """SHA-256 of an archive's members (name, size, contents, in archive order), each metadata
    member's contents as ``metadata`` turns them (read whole), the others streamed."""
    h = hashlib.sha256()
    for info in z.infolist():
        h.update(info.filename.encode("utf-8") + b"\0")
        if is_metadata_member(info):
            data = metadata(z.read(info))
            h.update(len(data).to_bytes(8, "little") + data)
            continue
        h.update(info.file_size.to_bytes(8, "little"))
        with z.open(info) as member:
            while block := member.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


def pt2_digest(path: Path, token: str) -> str | None:
    """The digest of a ``.pt2`` package with ``token`` read as the placeholder in its metadata
    members; None when no member holds ``token`` or the archive is damaged (a member fails its
    CRC check)."""
    needle, placeholder = token.encode("ascii"), DIGEST_PLACEHOLDER.encode("ascii")
    found = 0

    def metadata(data: bytes) -> bytes:
        nonlocal found
        found += data.count(needle)
        return data.replace(needle, placeholder)

    try:
        with zipfile.ZipFile(path) as z:
            digest = _members_digest(z, metadata)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None
    return digest if found else None


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a whole file (remembered for this process, see :data:`_DIGESTS`)."""
    path = Path(path)

    def compute() -> str:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
        return h.hexdigest()

    return remembered(path, "", compute)


def write_sealed(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` with its one :data:`DIGEST_PLACEHOLDER` replaced by the
    SHA-256 of ``data`` (placeholder included); returns the digest.

    The caller makes it atomic (``path`` is a temporary file).
    """
    placeholder = DIGEST_PLACEHOLDER.encode("ascii")
    at = data.find(placeholder)
    if at < 0 or data.find(placeholder, at + 1) >= 0:
        raise ExportError(
            f"Cannot seal {path}: its metadata's digest placeholder occurs "
            f"{data.count(placeholder)} times in the serialised engine, not once."
        )
    digest = hashlib.sha256(data).hexdigest()
    with open(path, "wb") as f:
        f.write(data)
        f.seek(at)
        f.write(digest.encode("ascii"))
    return digest


def seal_package(path: str | os.PathLike, key: str, text: str) -> str:
    """Store ``text`` under ``key`` in every AOTInductor metadata member of the ``.pt2``
    package at ``path`` and seal it (``text`` holds :data:`DIGEST_PLACEHOLDER` once, which
    becomes the digest of the package); returns the digest."""
    path = Path(path)
    placeholder, stored = DIGEST_PLACEHOLDER.encode("ascii"), 0

    def with_meta(data: bytes) -> bytes:
        nonlocal stored
        try:
            obj = json.loads(data)
        except ValueError:
            return data
        # AOTInductor's metadata members: the keys it writes itself (AOTI_DEVICE_KEY, ...)
        if not isinstance(obj, dict) or not any(k.startswith("AOTI_") for k in obj):
            return data
        stored += 1
        return json.dumps({**obj, key: text}).encode("utf-8")

    with zipfile.ZipFile(path) as z:
        digest = _members_digest(z, with_meta)
    if not stored:
        raise ExportError(
            f"Cannot seal {path}: no member of the package holds AOTInductor's metadata (this "
            "torch version stores it elsewhere); the package was not written."
        )
    with atomic_path(path) as tmp:
        # a new archive: a member's CRC-32 covers its contents, so it cannot be patched in place
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as out:
            for info in src.infolist():
                copy = zipfile.ZipInfo(info.filename, info.date_time)
                copy.compress_type, copy.external_attr = info.compress_type, info.external_attr
                if is_metadata_member(info):
                    data = with_meta(src.read(info)).replace(placeholder, digest.encode("ascii"))
                    out.writestr(copy, data)
                    continue
                copy.file_size = info.file_size
                with src.open(info) as r, out.open(copy, "w", force_zip64=True) as w:
                    while block := r.read(_BLOCK):
                        w.write(block)
    return digest


def safe_files(files: object) -> bool:
    """Whether an ``integrity.files`` record is ``{relative name beside the engine: SHA-256}``."""
    return isinstance(files, dict) and all(
        isinstance(name, str)
        and isinstance(sha, str)
        and HEX64.fullmatch(sha)
        and not Path(name).is_absolute()
        and ".." not in Path(name).parts
        and "\\" not in name
        for name, sha in files.items()
    )

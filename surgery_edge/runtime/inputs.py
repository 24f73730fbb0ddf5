"""Which image files a command line names: files, folders (recursively) and globs."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from surgery_edge.errors import ConfigError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
)
_GLOB_CHARS = frozenset("*?[")


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _folder_images(folder: Path) -> list[Path]:
    found = [
        Path(root) / name
        for root, dirs, files in os.walk(folder)
        for name in files
        if is_image_name(name) and not name.startswith(".")
    ]
    return sorted(found)


def expand_images(args: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """The image files ``args`` name, in order, lazily.

    A file is taken as it is (whatever its suffix: the decoder says whether it is an image); a
    folder gives the image files below it (by suffix, sorted, hidden files skipped); a pattern
    with ``*``, ``?`` or ``[`` that is not an existing file is expanded as a glob (``**``
    recursive), keeping image files.

    Raises:
        ConfigError: an argument is missing, or a folder or pattern holds no image files.
    """
    for arg in args:
        text = os.fspath(arg)
        path = Path(text)
        if path.is_file():
            yield path
        elif path.is_dir():
            images = _folder_images(path)
            if not images:
                raise ConfigError(
                    f"Folder {path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})."
                )
            yield from images
        elif _GLOB_CHARS & set(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if is_image_name(m))
            if not matches:
                raise ConfigError(f"Pattern {text!r} matches no image files.")
            yield from (m for m in matches if m.is_file())
        else:
            raise ConfigError(
                f"Image file or folder {path} does not exist; give image files, folders of "
                "images, or a quoted glob such as 'photos/**/*.jpg'."
            )

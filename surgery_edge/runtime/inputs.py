"""Which image files a command line names: files, folders (recursively) and globs.

Folders and the recursive part of a glob are walked by :func:`surgery_edge.io.walk_files`, the
walk the datasets use too: a link back into a folder already searched (``loop -> .``) is not
followed again, and a FIFO, socket or device is never opened. What could not be read (a folder
that cannot be listed, a FIFO named like an image, a link that leads nowhere) is reported as a
skipped input, not passed over in silence.
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from surgery_edge.errors import ConfigError
from surgery_edge.io import Walk, not_a_file, walk_files

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
)
_GLOB_CHARS = frozenset("*?[")


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _folder_images(folder: Path) -> Walk:
    return walk_files(folder, keep=lambda parts: is_image_name(parts[-1]))


def expand_images(
    args: Iterable[str | os.PathLike], skipped: list[str] | None = None
) -> Iterator[Path]:
    """The image files ``args`` name, in order, lazily.

    A file is taken as it is (whatever its suffix: the decoder says whether it is an image); a
    folder gives the image files below it (by suffix, sorted, hidden files skipped, each folder
    searched once even when links lead back into it); a pattern with ``*``, ``?`` or ``[`` that
    is not an existing file is expanded as a glob (``**`` recursive), keeping image files.

    Args:
        skipped: receives ``"PATH (why)"`` for what a folder or glob holds that could not be
            read (default: a warning each).

    Raises:
        ConfigError: an argument is missing or not a file or folder (a FIFO, a device), or a
            folder or pattern holds no readable image files.
    """
    for arg in args:
        text = os.fspath(arg)
        path = Path(text)
        problem = not_a_file(path)
        if problem is None:
            yield path
        elif path.is_dir():
            found = _folder_images(path)
            _report(found.skipped, skipped)
            if not found.files:
                raise ConfigError(
                    f"Folder {path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                    + _skipped_note(found.skipped)
                )
            yield from found.files
        elif _GLOB_CHARS & set(text) and problem == "does not exist":
            found = _glob_images(text)
            _report(found.skipped, skipped)
            if not found.files:
                raise ConfigError(
                    f"Pattern {text!r} matches no image files" + _skipped_note(found.skipped)
                )
            yield from found.files
        elif problem == "does not exist":
            raise ConfigError(
                f"Image file or folder {path} does not exist; give image files, folders of "
                "images, or a quoted glob such as 'photos/**/*.jpg'."
            )
        else:
            raise ConfigError(f"{path} {problem}; give image files, folders of images or globs.")


def _report(found: list[str], skipped: list[str] | None) -> None:
    if skipped is not None:
        skipped.extend(found)
        return
    for entry in found:
        warnings.warn(f"skipped {entry}", stacklevel=3)


def _skipped_note(found: list[str]) -> str:
    if not found:
        return "."
    shown = "; ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return f" that could be read (skipped: {shown})."


# --- globs, walked rather than listed ------------------------------------------------------
# glob.glob(recursive=True) follows a link back into its own folder again and again (two
# such links make it exponential); so a pattern is split into the folder before its first
# wildcard and the rest, the folder is walked once, and the rest is matched part by part.


def _glob_images(pattern: str) -> Walk:
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    rest = _collapse(parts[first:])
    if not os.path.isdir(base):
        return Walk()
    return walk_files(
        base,
        keep=lambda rel: is_image_name(rel[-1]) and _matches(rel, rest),
        enter=lambda rel: _may_match_below(rel, rest),
    )


def _collapse(parts: list[str]) -> tuple[str, ...]:
    """Pattern parts with empty parts and repeated ``**`` removed (``a//**/**/b`` = ``a/**/b``)."""
    out: list[str] = []
    for p in parts:
        if p and not (p == "**" and out and out[-1] == "**"):
            out.append(p)
    return tuple(out)


def _part_matches(name: str, pattern: str) -> bool:
    """One path part against one pattern part, as glob does: a wildcard does not match a
    hidden name unless the pattern part starts with a dot."""
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern.replace("**", "*"))


def _matches(rel: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether the file ``rel`` (parts below the base folder) matches ``pattern``."""
    if not pattern:
        return not rel
    if pattern[0] == "**":
        return _matches(rel, pattern[1:]) or (bool(rel) and _matches(rel[1:], pattern))
    return bool(rel) and _part_matches(rel[0], pattern[0]) and _matches(rel[1:], pattern[1:])


def _may_match_below(rel: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether some file below the folder ``rel`` can match ``pattern`` (the walk's bound)."""
    if not rel:
        return len(pattern) > 0
    if not pattern:
        return False
    if pattern[0] == "**":
        return _may_match_below(rel, pattern[1:]) or _may_match_below(rel[1:], pattern)
    return _part_matches(rel[0], pattern[0]) and _may_match_below(rel[1:], pattern[1:])

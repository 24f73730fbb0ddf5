"""Files: atomic writes and staged folders, output checks, path-safe names, content hashes.

Everything here is what every writer and reader of a run directory shares:

- :func:`atomic_path` / :func:`staged_dir`: a failure (or a kill) never leaves a half-written
  file under the final name; what a killed process left behind is hidden (``.name.*``) and is
  cleared by the next writer of the same path.
- :func:`check_output` / :func:`check_writable`: an output is refused before any work when it is
  a folder, a file of another kind, or in a place that cannot be written.
- :func:`safe_name`: a task, method or merge name that becomes part of a path is one plain path
  component, so nothing is ever written outside the folder meant for it.
- :func:`fingerprint` and :class:`HashCache`: identities from settings and content hashes,
  never from paths or modification times, so a moved or copied run reuses what it holds.
- :func:`walk_files` and :func:`not_a_file`: folder walks that follow a link into a folder
  once at most and never open a FIFO, socket or device; what a path is when it is not a file.
- :func:`load_yaml`: YAML from a user, without aliases and within a size limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery_edge.errors import ConfigError

# --- atomic files and staged folders -------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the destination folder so the final ``os.replace`` is atomic on
    POSIX file systems. On any exception the temporary file is removed and ``path`` is untouched.
    Its name (``.<name>.<pid>.*.tmp``) records the writer, so temporary files of a killed writer
    are removed by the next write of ``path``.
    """
    path = Path(path)
    _make_parent(path)
    _clear_leftovers(path.parent, f".{path.name}.", ".tmp")
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _ordinary_permissions(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; when the block succeeds it replaces ``out``.

    On any error the folder is removed and ``out`` is left as it was, so a failed import never
    leaves half-written checkpoints. The folder gets ordinary permissions (not mkdtemp's 0700),
    as :func:`atomic_path`'s files do; folders a killed process staged are removed first.
    """
    out = Path(out)
    _make_parent(out)
    _clear_leftovers(out.parent, f".{out.name}.staged-", "")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staged-{os.getpid()}.", dir=out.parent))
    _ordinary_permissions(tmp)
    try:
        yield tmp
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(
            f"Cannot write {path}: a file stands where a folder of its path should be. Move it "
            "away or choose another output."
        ) from None


def _clear_leftovers(folder: Path, prefix: str, suffix: str) -> None:
    """Remove ``prefix<pid>.*suffix`` entries of ``folder`` whose writing process is gone."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory onto ``out`` (replacing an existing one)."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        else:
            out.rmdir()
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ordinary_permissions(path: Path) -> None:
    """Give a mkstemp file (0600) or mkdtemp folder (0700) what open() / mkdir() would give."""
    mode = 0o777 if path.is_dir() else 0o666
    os.chmod(path, mode & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --- outputs, checked before the work ------------------------------------------------------


def check_writable(folder: str | os.PathLike, what: str = "output") -> None:
    """Refuse (ConfigError) a folder that cannot be created or written in.

    The nearest existing ancestor must be a folder this process may write in; nothing is
    created here.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"Cannot write the {what} in {folder}: {probe} is a file, not a folder. Choose another "
            "output path."
        )
    if not _may_write(probe):
        raise ConfigError(
            f"Cannot write the {what} in {folder}: permission denied on {probe}. Choose a folder "
            "you may write in, or change its permissions."
        )


def _may_write(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_output(
    path: str | os.PathLike,
    what: str,
    same_kind: Callable[[Path], bool] | None = None,
) -> Path:
    """Check an output file before the work that writes it.

    Refused with ConfigError: a folder; something that is not a regular file; an existing file
    that ``same_kind`` does not recognise as an artefact of the same kind (e.g. a text file where
    adapters go; with no ``same_kind`` every existing file is refused); a place that cannot be
    written. Replacing an artefact *made with other settings* is the caller's decision.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"The {what} {path} is a folder; give a file path (e.g. {path / ('x' + path.suffix)})."
        )
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise ConfigError(f"The {what} {path} exists and is not a regular file.")
        if same_kind is None or not same_kind(path):
            raise ConfigError(
                f"{path} exists but is not an artefact of this kind ({what}), so it was not "
                "overwritten. Choose another output path, or move the file away."
            )
    check_writable(path.parent, what)
    return path


# --- names that become parts of paths ------------------------------------------------------

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def safe_name(name: Any, what: str) -> str:
    """``name`` when it can be one component of a path; ConfigError otherwise.

    Task, method and merge names become file and folder names (``experts/<task>.safetensors``),
    so they may hold only ASCII letters, digits, ``_ - . +``, must start with a letter or digit
    (no ``..``, no hidden files) and be at most 100 characters long.
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {printable(repr(name))} cannot be used: such names become file names, so "
            "they may hold only letters, digits and '_', '-', '.', '+', must start with a letter "
            "or digit, and be at most 100 characters long. Rename it."
        )
    return name


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str, keep_newlines: bool = True) -> str:
    """``text`` with control characters (terminal escapes, NUL, ...) shown as ``\\xNN``.

    Everything printed from a file (class names, metadata, paths) goes through this, so a
    hostile name cannot clear or rewrite a terminal.
    """
    pattern = _CONTROL if keep_newlines else re.compile(r"[\x00-\x1f\x7f-\x9f]")
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# --- reading what a user names: files, folder walks, YAML --------------------------------

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def kind_of(mode: int) -> str:
    """What ``st_mode`` describes, in words: ``a folder``, ``a FIFO (named pipe)``, ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def not_a_file(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a regular file (through links); else what it is instead, as the
    end of a sentence that starts with the path: ``does not exist``, ``is a folder``, ``is a
    FIFO (named pipe), not a file``, ``is a link to X, which does not exist``, ...

    Only ``stat`` is used: nothing is opened, so a FIFO never blocks the caller.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a link to {os.readlink(path)}, which does not exist"
        return "does not exist"
    except OSError as e:  # ELOOP, EACCES on a parent folder, ENAMETOOLONG ...
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    return f"is {kind_of(mode)}, not a file"


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` when it is a regular file; ConfigError saying what it is otherwise ("The engine
    /dev/null is a character device, not a file."), without opening it."""
    problem = not_a_file(path)
    if problem is not None:
        raise ConfigError(f"The {what} {path} {problem}.")
    return Path(path)


def not_a_folder(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a folder (through links); else what it is instead, as
    :func:`not_a_file` says it (``does not exist``, ``is a regular file, not a folder``, ...)."""
    problem = not_a_file(path)
    if problem is None:
        return "is a file, not a folder"
    if problem.startswith("is a folder"):
        return None
    return problem.replace(", not a file", ", not a folder")


@dataclass
class Walk:
    """What :func:`walk_files` found under a folder.

    Attributes:
        files: the regular files kept, sorted by their path relative to the folder.
        skipped: ``"PATH (why)"`` for each entry that could not be read: a folder that cannot
            be listed, a FIFO, socket or device, a link that leads nowhere.
        repeated: ``"PATH (why)"`` for each link to a folder (or, with ``same_file_once``, a
            file) already reached another way: not read twice, so a loop ends.
    """

    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)


def walk_files(
    folder: str | os.PathLike,
    keep: Callable[[tuple[str, ...]], bool] = lambda parts: True,
    enter: Callable[[tuple[str, ...]], bool] = lambda parts: True,
    same_file_once: bool = False,
    seen_folders: set[tuple[int, int]] | None = None,
    seen_files: set[tuple[int, int]] | None = None,
) -> Walk:
    """The regular files under ``folder`` (any depth), following links, each folder once.

    Every folder is identified by its (device, inode): a link back to a folder already listed
    (``loop -> .``) is noted in ``repeated`` and not entered, so no walk runs forever or counts
    a file twice through a loop. The type of each entry comes from ``os.stat`` (nothing is
    opened): a FIFO, socket or device that ``keep`` would take is listed in ``skipped``, as are
    folders that cannot be listed and links that lead nowhere. Hidden entries (``.name``) are
    passed over.

    Args:
        keep: takes a file by its path relative to ``folder``, as parts.
        enter: whether to look into a sub-folder, by its relative parts (to bound a glob).
        same_file_once: a file reached under a second name (a link, a hard link) is kept once.
        seen_folders, seen_files: (device, inode) pairs shared by several walks and updated:
            a folder in ``seen_folders`` is not entered through a link (the root always is),
            a file in ``seen_files`` is not taken again (with ``same_file_once``).
    """
    root = Path(folder)
    walk = Walk()
    seen_dirs = set() if seen_folders is None else seen_folders
    seen_dirs.add(_identity(os.stat(root)))
    seen_files = set() if seen_files is None else seen_files
    pending: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while pending:
        directory, parts = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as e:
            walk.skipped.append(f"{directory} (a folder that cannot be listed: {e.strerror or e})")
            continue
        below = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = (*parts, entry.name)
            try:
                info = os.stat(entry.path)
            except OSError as e:  # a link to nothing (or to itself), a file that just went
                if keep(rel) or not os.path.splitext(entry.name)[1]:  # an image, or a folder?
                    gone = isinstance(e, FileNotFoundError) and entry.is_symlink()
                    why = "a link that leads nowhere" if gone else (e.strerror or str(e))
                    walk.skipped.append(f"{entry.path} ({why})")
                continue
            if stat.S_ISDIR(info.st_mode):
                if _identity(info) in seen_dirs:
                    walk.repeated.append(f"{entry.path} (a link to a folder already searched)")
                elif enter(rel):
                    seen_dirs.add(_identity(info))
                    below.append((Path(entry.path), rel))
            elif not keep(rel):
                continue
            elif not stat.S_ISREG(info.st_mode):
                walk.skipped.append(f"{entry.path} ({kind_of(info.st_mode)}, not a file)")
            elif same_file_once and _identity(info) in seen_files:
                walk.repeated.append(f"{entry.path} (another name of a file already listed)")
            else:
                seen_files.add(_identity(info))
                walk.files.append(Path(entry.path))
        pending.extend(reversed(below))  # depth first, in name order
    walk.files.sort(key=lambda p: p.relative_to(root).parts)
    return walk


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


MAX_YAML_BYTES = 1 << 20  # a run config is a few kB; a larger one is not a config
MAX_YAML_DEPTH = 50  # a run config nests about 5 levels


def load_yaml(text: str, what: str) -> Any:
    """Parse YAML a user wrote (a config file, a ``--set`` value) with the safe loader.

    Aliases (``*name``) are refused: a few hundred bytes of nested aliases expand to gigabytes
    (the "billion laughs"), and no setting needs them. Text above :data:`MAX_YAML_BYTES` and
    nesting deeper than :data:`MAX_YAML_DEPTH` are refused too.

    Raises:
        ConfigError: naming ``what``, the line and what to do.
    """
    import yaml  # deferred: only commands that read YAML need it

    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{what} holds {len(text):,} characters; a run config is a few kB, and more than "
            f"{MAX_YAML_BYTES:,} are refused. Give the settings file itself."
        )

    class NoAliases(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(
                    f"{what}, line {event.start_mark.line + 1}: the alias *{event.anchor} is not "
                    "allowed (aliases can expand a few bytes into gigabytes); write the value out "
                    "where it is needed."
                )
            if self.depth >= MAX_YAML_DEPTH:
                raise ConfigError(
                    f"{what}, line {event.start_mark.line + 1}: nested more than "
                    f"{MAX_YAML_DEPTH} levels deep, which no settings file is."
                )
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return yaml.load(text, Loader=NoAliases)  # noqa: S506 (a SafeLoader subclass)


# --- identities: settings and content, never locations ------------------------------------


def fingerprint(*parts: Any) -> str:
    """A short, stable identity of ``parts`` (settings, content hashes) as canonical JSON."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """SHA-256 content hashes of files, remembered by (size, mtime, inode) in a JSON file.

    Hashing a multi-GB checkpoint costs seconds; a file whose size, modification time and inode
    are unchanged keeps its hash, so re-running a stage over an unchanged run costs no hashing.
    The hash itself is always the content's, so identities built from it do not change when a
    run is moved or copied (a copy is hashed once again).

    The stat is a promise, not a proof: a file changed in place with its size and modification
    time restored keeps its old hash here (git makes the same trade). So a stage that is about to
    publish something made from a file (adapters, an engine) asks for ``fresh=True``: the bytes
    are hashed again (once per process and stat), and the stored hash is corrected.

    Args:
        store: the JSON file (e.g. ``RUN/cache/hashes.json``); ``None`` remembers nothing.
            It is rewritten atomically; a store that cannot be read or written is ignored.
    """

    def __init__(self, store: str | os.PathLike | None = None):
        self.store = Path(store) if store is not None else None
        self._entries: dict[str, dict[str, Any]] | None = None
        self._read_now: set[tuple[str, tuple[int, ...]]] = set()  # hashed from bytes here

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = {}
            if self.store is not None and self.store.is_file():
                with contextlib.suppress(OSError, ValueError):
                    data = json.loads(self.store.read_text())
                    if isinstance(data, dict):
                        self._entries = {
                            k: v for k, v in data.items() if isinstance(v, dict) and "sha256" in v
                        }
        return self._entries

    def digest(self, path: str | os.PathLike, fresh: bool = False) -> str:
        """The SHA-256 of ``path``'s content (hex).

        Args:
            fresh: hash the bytes even when the stat is unchanged (unless this process already
                hashed them at this stat): for inputs of what is about to be published.
        """
        path = Path(path)
        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entries = self._load()
        entry = entries.get(key)
        known = entry is not None and entry.get("stat") == stamp
        if known and (not fresh or (key, tuple(stamp)) in self._read_now):
            return entry["sha256"]
        value = sha256_file(path)
        self._read_now.add((key, tuple(stamp)))
        if not known or entry["sha256"] != value:
            entries[key] = {"stat": stamp, "sha256": value}
            self._save()
        return value

    def _save(self) -> None:
        if self.store is None:
            return
        entries = {k: v for k, v in self._load().items() if Path(k).exists()}
        with contextlib.suppress(OSError, ConfigError):
            write_json_atomic(self.store, entries)

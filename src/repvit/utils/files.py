"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "sha256_of", "probe_writable"]


def _umask() -> int:
    try:  # Linux: read it without changing it (setting it, even briefly, races with other threads' file creation)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], *, suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` for a temp file in the target folder, then rename it over ``path``.

    Anything ``write`` raises deletes the temp file and leaves ``path`` as it was (a caller aborts a write
    that turned out unwanted, e.g. a download of the wrong digest, by raising)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=parent)
    except OSError as e:  # errno and filename kept: callers tell a local error from a network one by them
        raise OSError(e.errno, f"cannot write {path}: {parent} is not a writable directory ({e.strerror or e})",
                      str(parent)) from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        with open(tmp, "rb+") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _iter_files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*") if p.is_file())
    else:
        yield path


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file; for a directory (.mlpackage) of every file's relative name and bytes, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for f in _iter_files(root):
        if root.is_dir():
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def probe_writable(path: str | os.PathLike) -> None:
    """Raise ValueError unless a file can be created where ``path`` will be written: in its folder, or the nearest
    existing folder above it (under which the write creates the rest). A temp file is created and removed, since
    permission bits alone do not tell (root passes ``os.access`` on read-only mounts and /proc)."""
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=folder)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {folder} is not a writable directory ({e.strerror or e}); "
                         "choose another output path") from e
    os.close(fd)
    os.unlink(tmp)

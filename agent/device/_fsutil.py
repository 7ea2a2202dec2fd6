"""Crash-safe file writes (temp file in the same directory, fsync, rename, fsync dir),
and :func:`child_path`, the one way a path is built from a name that came from input."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from agent.errors import UnsafePath


def child_path(parent: Path, name: str) -> Path:
    """``parent / name`` for a ``name`` that came from input (a flow id, a digest).

    Refuses, with :class:`UnsafePath`, anything that is not one plain path component
    staying inside ``parent``: empty, dots alone (``.``, ``..``), a separator, a NUL,
    or an existing symlink (which could lead anywhere).
    """
    if (
        not name
        or name.strip(".") == ""
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name.encode("utf-8", "surrogatepass")) > 255
    ):
        raise UnsafePath(f"{name[:80]!r} cannot name a file under {parent}")
    path = parent / name
    if path.is_symlink():
        raise UnsafePath(f"{path} is a symlink; refusing to follow it")
    return path


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(directory: Path, name: str) -> int:
    """Delete temp files a crash left behind by :func:`atomic_write` for ``name``."""
    count = 0
    for leftover in directory.glob(f".{name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            count += 1
    return count

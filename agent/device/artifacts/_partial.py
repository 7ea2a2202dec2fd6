"""The partial download file: the blocking I/O behind resuming.

A partial (``ArtifactStore.partial_path``) is a prefix of the artifact. It is opened
for appending at an exact offset, grows by whole chunks while its running SHA-256 is
kept, is re-read to resume after a restart, and is discarded when its bytes cannot be
trusted. All functions here block: run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import structlog

from agent.device.artifacts._errors import describe
from agent.device.artifacts._store import hash_file

if TYPE_CHECKING:
    from pathlib import Path

    _Hash = hashlib._Hash

log = structlog.get_logger(__name__)


def open_partial(part: Path, offset: int) -> int:
    """Open ``part`` for appending after exactly ``offset`` bytes (blocking)."""
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, offset)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append(fd: int, chunk: bytes, hasher: _Hash) -> None:
    """Write the whole chunk, then account for it in the running digest (blocking)."""
    view = memoryview(chunk)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    hasher.update(chunk)


def load_partial(part: Path) -> tuple[int, _Hash]:
    """Length and running digest of an existing partial (0 and empty if none)."""
    try:
        return hash_file(part)
    except FileNotFoundError:
        return 0, hashlib.sha256()


def discard(part: Path) -> None:
    """Delete the partial if it exists; a failure is logged, not raised."""
    try:
        part.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("artifact_partial_discard_failed", path=str(part), error=describe(exc))

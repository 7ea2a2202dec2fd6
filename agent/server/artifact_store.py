"""Artifacts on the server's disk, by content: ``{dir}/{sha256[:2]}/{sha256}``.

An upload is streamed to a temporary file in the same directory while its SHA-256
is computed, bounded by a size limit, then renamed into place (so a reader never sees
half a file and a second upload of the same bytes costs nothing). URLs handed to
devices carry an HMAC of the application and the digest (and, for links given to
people, an expiry), so the server does not serve one application's artifacts to
anyone who can guess a digest.

What nothing references any more is removed by the orphan sweep
(:mod:`agent.server.service.artifact_sweep`); the store's part is here: walking the
files, the temporary files of interrupted uploads (``.upload-*``), the marks of when
a digest was first seen unreferenced (``.orphans/{sha256}``), and a removal that an
upload writing the same bytes at that moment cannot lose (:meth:`ArtifactStore.discard`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.device._fsutil import child_path
from agent.server.errors import TooLarge, Validation

_SHA = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 16
#: The name prefix of an upload's temporary file (in the store's root).
TEMP_PREFIX = ".upload-"
#: A file the sweep moved aside to remove: ``.sweep-{unix time}-{sha256}-{random}``.
TRASH_PREFIX = ".sweep-"
_TRASH = re.compile(r"\.sweep-([0-9]{1,12})-([0-9a-f]{64})-[0-9a-f]{12}")
#: The directory of orphan marks (empty files; their mtime says since when).
MARKS = ".orphans"


@dataclass(frozen=True)
class Stored:
    sha256: str
    size: int


def is_digest(value: str) -> bool:
    """Whether ``value`` is a SHA-256 digest as the store names files (64 lowercase hex)."""
    return _SHA.fullmatch(value) is not None


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """The file of a digest; only ever built from a validated digest."""
        if not _SHA.fullmatch(sha256):
            raise Validation("not a sha256 digest")
        return child_path(child_path(self.root, sha256[:2]), sha256)

    def put_bytes(self, data: bytes, limit: int) -> Stored:
        """Store ``data`` (held in memory already, e.g. to be validated first)."""
        view = memoryview(data)
        return self.put_chunks((view[i : i + CHUNK] for i in range(0, len(view), CHUNK)), limit)

    def put(self, source: BinaryIO, limit: int) -> Stored:
        """Store what ``source`` holds (at most ``limit`` bytes, else :class:`TooLarge`
        and nothing is kept)."""
        return self.put_chunks(iter(lambda: source.read(CHUNK), b""), limit)

    def put_chunks(self, chunks: Iterable[bytes | memoryview], limit: int) -> Stored:
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"artifact larger than {limit} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if size == 0:
                raise Validation("artifact is empty")
            sha = digest.hexdigest()
            final = self.path(sha)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            return Stored(sha, size)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    # ------------------------------------------------------------ for the orphan sweep
    def stored(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every stored file (digest, its stat); anything else in the tree is skipped."""
        try:
            subdirs = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for sub in subdirs:
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(sub.path))
            except FileNotFoundError:
                continue
            for entry in entries:
                if not (is_digest(entry.name) and entry.name[:2] == sub.name):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile
                if stat.S_ISREG(info.st_mode):
                    yield entry.name, info

    def file_stat(self, sha256: str) -> os.stat_result | None:
        try:
            return os.stat(self.path(sha256), follow_symlinks=False)
        except FileNotFoundError:
            return None

    def temp_files(self) -> Iterator[tuple[Path, os.stat_result]]:
        """The temporary files of uploads (in progress, or interrupted by a crash)."""
        yield from self._root_files(lambda name: name.startswith(TEMP_PREFIX))

    def trash_files(self) -> Iterator[tuple[Path, int, str]]:
        """Files a sweep moved aside and did not finish with (path, when, digest)."""
        for path, _info in self._root_files(lambda name: _TRASH.fullmatch(name) is not None):
            m = _TRASH.fullmatch(path.name)
            assert m is not None
            yield path, int(m.group(1)), m.group(2)

    def _root_files(self, wanted: Callable[[str], bool]) -> Iterator[tuple[Path, os.stat_result]]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for entry in entries:
            if not wanted(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                yield Path(entry.path), info

    def discard(self, sha256: str, not_after: float) -> int | None:
        """Remove a digest's file unless it was written after ``not_after`` (Unix
        time); its size, or None (absent: another sweep took it; or written since).

        The file is first renamed aside (atomically: an upload that writes the same
        bytes at that moment either replaced it before, and then the moved file is
        new and goes back, or writes a new one after, which stays)."""
        path = self.path(sha256)
        trash = child_path(
            self.root, f"{TRASH_PREFIX}{int(time.time())}-{sha256}-{secrets.token_hex(6)}"
        )
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return None
        try:
            info = os.stat(trash, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if info.st_mtime > not_after:
            self.restore(trash, sha256)
            return None
        unlink_quietly(trash)
        return info.st_size

    def restore(self, trash: Path, sha256: str) -> None:
        """Put a file moved aside back (over a copy written meanwhile: the same bytes)."""
        final = self.path(sha256)
        final.parent.mkdir(exist_ok=True)
        os.replace(trash, final)

    def _mark_path(self, sha256: str) -> Path:
        if not _SHA.fullmatch(sha256):
            raise Validation("not a sha256 digest")
        return child_path(child_path(self.root, MARKS), sha256)

    def marked_since(self, sha256: str) -> float | None:
        """When the sweep first saw the digest unreferenced (its mark's mtime), if it did."""
        try:
            return os.stat(self._mark_path(sha256), follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return None

    def mark(self, sha256: str) -> float:
        """Mark the digest unreferenced (unless it is already); since when it is."""
        path = self._mark_path(sha256)
        path.parent.mkdir(exist_ok=True)
        # (Another sweep may have marked it first: then its time stands.)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        since = self.marked_since(sha256)
        return time.time() if since is None else since

    def unmark(self, sha256: str) -> None:
        unlink_quietly(self._mark_path(sha256))

    def marks(self) -> list[str]:
        try:
            return [e.name for e in os.scandir(child_path(self.root, MARKS)) if is_digest(e.name)]
        except FileNotFoundError:
            return []


def unlink_quietly(path: Path) -> bool:
    """Unlink ``path``; whether it was there (another process may have been first)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def sign(key: str, app_id: str, sha256: str, expires: int | None = None) -> str:
    msg = f"{app_id}:{sha256}:{expires or ''}".encode()
    return hmac.new(bytes.fromhex(key), msg, hashlib.sha256).hexdigest()


def verify(key: str, app_id: str, sha256: str, sig: str, expires: int | None) -> bool:
    if expires is not None and expires < time.time():
        return False
    if not sig.isascii():  # (compare_digest refuses non-ASCII text rather than say no)
        return False
    return hmac.compare_digest(sign(key, app_id, sha256, expires), sig)


def artifact_url(
    base_url: str, key: str, app_id: str, sha256: str, expires: int | None = None
) -> str:
    url = f"{base_url}/artifacts/{app_id}/{sha256}?sig={sign(key, app_id, sha256, expires)}"
    return url + (f"&expires={expires}" if expires is not None else "")

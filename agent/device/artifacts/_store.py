"""The content-addressed artifact store on disk.

:class:`ArtifactStore` owns one directory tree::

    root/sha256/<hex>        complete artifacts whose SHA-256 was verified; nothing else
    root/partial/<hex>.part  resumable partial downloads (a prefix of the artifact)
    root/tmp/                temp files of in-memory artifacts before they are committed

A file only ever enters ``sha256/`` through :meth:`ArtifactStore.commit` (fsync,
atomic rename, fsync of the directory), so after a crash ``sha256/`` holds complete
files or nothing. The methods are synchronous and do blocking file I/O: async
callers run the heavy ones (``verify``, ``read``, ``commit``, ``put_bytes``,
``gc``) in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from agent.device._fsutil import child_path
from agent.errors import ArtifactError, IntegrityError, UnsafePath

if TYPE_CHECKING:
    from collections.abc import Iterator

log = structlog.get_logger(__name__)

_HEX_RE = re.compile(r"[0-9a-f]{64}")
_PART_SUFFIX = ".part"
_HASH_CHUNK = 1024 * 1024


def normalize_sha256(sha256: str) -> str:
    """Return ``sha256`` as 64 lower-case hex digits, or raise :class:`ArtifactError`.

    Every path in the store is built from a validated digest, so a hostile value
    (``../../etc/passwd``) can never name a file outside the store.
    """
    hex_digest = sha256.strip().lower()
    if not _HEX_RE.fullmatch(hex_digest):
        raise ArtifactError(f"invalid sha256 {sha256[:80]!r}: expected 64 hex digits")
    return hex_digest


def short_hex(hex_digest: str) -> str:
    """An abbreviated digest for messages: ``ab12cd34ef56…``."""
    return f"{hex_digest[:12]}…"


def hash_file(path: Path, hasher: hashlib._Hash | None = None) -> tuple[int, hashlib._Hash]:
    """Feed the whole of ``path`` into ``hasher`` (a new SHA-256 by default).

    Returns the number of bytes read and the hasher. Blocking: run it in a thread.
    """
    digest = hasher if hasher is not None else hashlib.sha256()
    total = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            total += len(chunk)
    return total, digest


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """Content-addressed store: root/sha256/<hex> (complete, verified files only),
    root/partial/<hex>.part (resumable partial downloads), root/tmp/ (temp files).

    Digests are accepted in any case and normalised to lower case; a value that is
    not 64 hex digits raises :class:`ArtifactError`.
    """

    #: Files in ``tmp/`` older than this (seconds) are left-overs of a crash and
    #: removed by :meth:`gc`; younger ones may belong to a ``put_bytes`` in progress.
    TMP_STALE_AFTER = 3600.0

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._complete_dir = self.root / "sha256"
        self._partial_dir = self.root / "partial"
        self._tmp_dir = self.root / "tmp"
        try:
            for directory in (self._complete_dir, self._partial_dir, self._tmp_dir):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot create artifact store in {self.root}: {exc}") from exc

    # -- paths ------------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        """Where the complete artifact lives (the file may not exist)."""
        return self._child(self._complete_dir, normalize_sha256(sha256))

    def partial_path(self, sha256: str) -> Path:
        """Where a resumable partial download of the artifact lives (may not exist)."""
        return self._child(self._partial_dir, f"{normalize_sha256(sha256)}{_PART_SUFFIX}")

    @staticmethod
    def _child(directory: Path, name: str) -> Path:
        try:
            return child_path(directory, name)
        except UnsafePath as exc:
            raise ArtifactError(str(exc)) from None

    # -- queries ----------------------------------------------------------------------

    def has(self, sha256: str) -> bool:
        """Whether a complete artifact is stored (without re-hashing it)."""
        return self.path(sha256).is_file()

    def verify(self, sha256: str) -> bool:
        """Re-hash the stored file; if it does not match, delete it and return False.

        A missing file also returns False.
        """
        hex_digest = normalize_sha256(sha256)
        path = self.path(hex_digest)
        try:
            _, digest = hash_file(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ArtifactError(f"cannot read stored artifact {path}: {exc}") from exc
        actual = digest.hexdigest()
        if actual == hex_digest:
            return True
        log.warning("artifact_corrupt_deleted", sha256=hex_digest, actual=actual, path=str(path))
        self._unlink(path)
        return False

    def read(self, sha256: str) -> bytes:
        """The stored artifact's bytes, checked against the digest.

        Raises :class:`ArtifactError` if it is not stored, and :class:`IntegrityError`
        (after deleting the file) if its content no longer matches.
        """
        hex_digest = normalize_sha256(sha256)
        path = self.path(hex_digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"artifact {short_hex(hex_digest)} is not in the store") from None
        except OSError as exc:
            raise ArtifactError(f"cannot read stored artifact {path}: {exc}") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != hex_digest:
            self._unlink(path)
            raise IntegrityError(
                f"stored artifact {short_hex(hex_digest)} is corrupt (hashes to "
                f"{short_hex(actual)}); deleted it"
            )
        return data

    def read_range(self, sha256: str, offset: int, length: int) -> tuple[int, bytes]:
        """(the stored artifact's size, up to ``length`` of its bytes from ``offset``),
        without checking the digest (the reader checks the whole against it).

        Raises :class:`ArtifactError` if it is not stored or cannot be read.
        """
        hex_digest = normalize_sha256(sha256)
        path = self.path(hex_digest)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(min(offset, size))
                return size, f.read(length)
        except FileNotFoundError:
            raise ArtifactError(f"artifact {short_hex(hex_digest)} is not in the store") from None
        except OSError as exc:
            raise ArtifactError(f"cannot read stored artifact {path}: {exc}") from exc

    def usage(self) -> tuple[int, int]:
        """(number of stored artifacts, their total size in bytes)."""
        count = 0
        total = 0
        for entry in self._entries(self._complete_dir):
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size
                count += 1
        return count, total

    # -- writes -----------------------------------------------------------------------

    def commit(self, tmp: Path, sha256: str) -> Path:
        """Move the verified file ``tmp`` into ``sha256/<hex>`` durably and atomically.

        fsyncs the file, ``os.replace``-s it into place and fsyncs ``sha256/``. The
        caller has checked the content; ``tmp`` must be on the store's filesystem
        (in ``tmp/`` or ``partial/``).
        """
        dest = self.path(sha256)
        try:
            _fsync_path(tmp)
            os.replace(tmp, dest)
            _fsync_path(self._complete_dir, directory=True)
        except OSError as exc:
            raise ArtifactError(f"cannot commit artifact {dest.name} from {tmp}: {exc}") from exc
        return dest

    def put_bytes(self, data: bytes, sha256: str) -> Path:
        """Store an artifact that arrived in memory (e.g. over MQTT).

        Raises :class:`IntegrityError` if ``data`` does not hash to ``sha256``.
        """
        hex_digest = normalize_sha256(sha256)
        actual = hashlib.sha256(data).hexdigest()
        if actual != hex_digest:
            raise IntegrityError(
                f"sha256 mismatch: expected {short_hex(hex_digest)}, got {short_hex(actual)}"
            )
        try:
            fd, name = tempfile.mkstemp(prefix=f"{hex_digest[:16]}.", dir=self._tmp_dir)
        except OSError as exc:
            raise ArtifactError(f"cannot create temp file in {self._tmp_dir}: {exc}") from exc
        tmp = Path(name)
        try:
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            except OSError as exc:
                raise ArtifactError(
                    f"cannot write artifact {short_hex(hex_digest)} to {tmp}: {exc}"
                ) from exc
            return self.commit(tmp, hex_digest)
        finally:
            self._unlink(tmp)

    def gc(self, keep: set[str]) -> list[str]:
        """Delete stored artifacts and partials whose digest is not in ``keep``, stray
        files in their directories and ``tmp/`` files older than ``TMP_STALE_AFTER``.

        Returns the sorted digests that were removed. Do not run it while a fetch of
        an artifact that is not in ``keep`` is in progress.
        """
        keep_hex = {normalize_sha256(digest) for digest in keep}
        removed: set[str] = set()
        for entry in self._entries(self._complete_dir, valid_only=False):
            hex_digest = entry.name if _HEX_RE.fullmatch(entry.name) else None
            if hex_digest not in keep_hex and self._unlink(entry) and hex_digest:
                removed.add(hex_digest)
        for entry in self._entries(self._partial_dir, valid_only=False):
            stem = entry.name.removesuffix(_PART_SUFFIX)
            hex_digest = (
                stem if entry.name.endswith(_PART_SUFFIX) and _HEX_RE.fullmatch(stem) else None
            )
            if hex_digest not in keep_hex and self._unlink(entry) and hex_digest:
                removed.add(hex_digest)
        cutoff = time.time() - self.TMP_STALE_AFTER
        for entry in self._entries(self._tmp_dir, valid_only=False):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    self._unlink(entry)
        if removed:
            log.info("artifacts_gc", removed=sorted(removed), kept=len(keep_hex))
        return sorted(removed)

    # -- helpers ----------------------------------------------------------------------

    def _entries(self, directory: Path, *, valid_only: bool = True) -> Iterator[Path]:
        """Regular files in ``directory`` (only hex-named ones unless ``valid_only`` is off)."""
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ArtifactError(f"cannot list {directory}: {exc}") from exc
        for entry in entries:
            if not entry.is_file() or (valid_only and not _HEX_RE.fullmatch(entry.name)):
                continue
            yield entry

    @staticmethod
    def _unlink(path: Path) -> bool:
        """Delete ``path``; True if it existed. Other errors become ArtifactError."""
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ArtifactError(f"cannot delete {path}: {exc}") from exc
        return True

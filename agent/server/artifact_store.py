"""Artifacts on the server's disk, by content: ``{dir}/{sha256[:2]}/{sha256}``.

An upload is streamed to a temporary file in the same directory while its SHA-256
is computed, bounded by a size limit, then renamed into place (so a reader never sees
half a file and a second upload of the same bytes costs nothing). URLs handed to
devices carry an HMAC of the application and the digest (and, for links given to
people, an expiry), so the server does not serve one application's artifacts to
anyone who can guess a digest.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.device._fsutil import child_path
from agent.server.errors import TooLarge, Validation

_SHA = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 16


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
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
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

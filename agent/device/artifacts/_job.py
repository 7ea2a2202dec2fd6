"""One fetch in progress and the rules every source applies to it.

A :class:`Job` is what one ``Fetcher.fetch()`` call is fetching (URL, digest, declared
size, cap, partial file) and how far it got. Whatever the source (http, file, mqtt),
its bytes go through the job's checks and writes: the size cap, the free-space
reserve, the size and SHA-256 check of the result, cancellation-safe writes to the
partial file and the commit into the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from agent.device.artifacts._errors import describe
from agent.device.artifacts._partial import append
from agent.device.artifacts._store import ArtifactStore, short_hex
from agent.errors import ArtifactError, ArtifactTooLarge, IntegrityError

if TYPE_CHECKING:
    import hashlib
    from pathlib import Path

    from agent.device.artifacts._limits import FetchLimits
    from agent.device.artifacts._progress import ProgressReporter

    _Hash = hashlib._Hash

log = structlog.get_logger(__name__)

_T = TypeVar("_T")


async def _to_thread_uninterruptible(func: Callable[..., _T], *args: Any) -> _T:
    """Run blocking ``func`` in a thread; if we are cancelled, wait for it to finish first.

    Used for writes and commits so that a cancelled fetch never leaves a writer running
    behind its back: the partial only ever grows by whole chunks and is quiescent by the
    time the cancellation propagates.
    """
    task = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():  # even if cancelled again: the fd must outlive the write
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation wins
        raise


@dataclass
class Job:
    """One fetch() call: what is being fetched and how far it got."""

    url: str
    display: str
    hex: str
    size: int | None
    cap: int
    part: Path
    progress: ProgressReporter
    store: ArtifactStore
    #: The fetcher's current limits, read at each use (a reload applies to fetches in flight).
    limits: Callable[[], FetchLimits]
    done: int = 0
    total: int | None = None
    resumed: bool = False  # some bytes came from an earlier attempt or process
    started_over: bool = False  # the one restart from byte 0 was used
    retry_after: float | None = None  # the last error status's Retry-After, in seconds

    def position(self) -> str:
        if self.total is not None:
            return f"{self.done} of {self.total} bytes"
        return f"{self.done} bytes"

    def check_disk(self, remaining: int) -> None:
        """Refuse a download that would leave less than ``min_free_bytes`` free."""
        root = self.store.root
        try:
            free = shutil.disk_usage(root).free
        except OSError as exc:
            log.warning("artifact_disk_usage_failed", root=str(root), error=str(exc))
            return
        reserve = self.limits().min_free_bytes
        if max(remaining, 0) + reserve > free:
            raise ArtifactTooLarge(
                f"not enough disk space for {self.display}: need {max(remaining, 0)} bytes "
                f"plus a reserve of {reserve}, but only {free} are free in {root}"
            )

    def too_large(self, amount: int, *, declared: bool) -> ArtifactTooLarge:
        """The error for ``amount`` bytes over the cap (``declared`` by the source or sent)."""
        max_size = self.limits().max_size
        what = "declares" if declared else "sent more than"
        if self.size is not None and self.cap == self.size and self.size < max_size:
            limit = f"the declared size of {self.size} bytes"
        else:
            limit = f"the limit of {max_size} bytes"
        if declared:
            return ArtifactTooLarge(f"{self.display} {what} {amount} bytes, over {limit}")
        return ArtifactTooLarge(f"{self.display} {what} {limit}")

    def check_result(self, hasher: _Hash) -> None:
        """The bytes received match the declared size (if any) and the digest."""
        if self.size is not None and self.done != self.size:
            raise IntegrityError(
                f"size mismatch for {self.display}: expected {self.size} bytes, got {self.done}"
            )
        actual = hasher.hexdigest()
        if actual != self.hex:
            raise IntegrityError(
                f"sha256 mismatch for {self.display}: expected {short_hex(self.hex)}, "
                f"got {short_hex(actual)}"
            )

    async def write(self, fd: int, chunk: bytes, hasher: _Hash) -> None:
        """Append ``chunk`` to the partial open on ``fd`` and to the running digest."""
        try:
            await _to_thread_uninterruptible(append, fd, chunk, hasher)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ArtifactTooLarge(
                    f"not enough disk space for {self.display}: disk full after "
                    f"{self.position()} ({describe(exc)})"
                ) from exc
            raise ArtifactError(
                f"cannot write partial download {self.part}: {describe(exc)}"
            ) from exc

    async def commit(self) -> Path:
        """Move the verified partial into the store and report the final progress."""
        path = await _to_thread_uninterruptible(self.store.commit, self.part, self.hex)
        self.progress.finish(self.done)
        return path

    async def put_bytes(self, payload: bytes) -> Path:
        """Store a verified in-memory artifact and report the final progress."""
        path = await _to_thread_uninterruptible(self.store.put_bytes, payload, self.hex)
        self.progress.finish(self.done)
        return path

"""Fetching artifacts into the :class:`ArtifactStore`.

:class:`Fetcher` owns the transfer of an artifact's bytes from its URL into the store:
``http(s)://`` (streamed with httpx, resumed with ``Range`` from a partial file,
retried with jittered exponential backoff, guarded by a stall watchdog),
``file://`` (copied off the event loop) and ``mqtt:<topic>`` (delegated to the MQTT
layer's ``mqtt_fetch`` callable). Whatever the source, the size cap, the free-space
reserve and the SHA-256 check are enforced here, and third-party exceptions (httpx,
OSError) leave this module only as :mod:`agent.errors` exceptions with one-line
messages.

Concurrent fetches of the same digest are serialised inside one ``Fetcher``; the
second caller finds the artifact in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import httpx
import structlog

from agent.device.artifacts._errors import describe
from agent.device.artifacts._http_source import HttpSource
from agent.device.artifacts._job import Job
from agent.device.artifacts._limits import FetchLimits
from agent.device.artifacts._partial import discard, open_partial
from agent.device.artifacts._progress import Progress, ProgressReporter
from agent.device.artifacts._store import ArtifactStore, normalize_sha256, short_hex
from agent.errors import ArtifactError, ArtifactTooLarge, DownloadError, IntegrityError
from agent.wire.redact import redact_url

if TYPE_CHECKING:
    _Hash = hashlib._Hash

log = structlog.get_logger(__name__)

_COPY_CHUNK = 1024 * 1024  # file:// read size


# -- helpers ------------------------------------------------------------------------------


def _scheme(url: str) -> str | None:
    """The supported scheme ``url`` uses (http, https, file, mqtt), or None."""
    lowered = url[:16].lower()
    for scheme in ("http", "https", "file"):
        if lowered.startswith(f"{scheme}://"):
            return scheme
    if lowered.startswith("mqtt:"):
        return "mqtt"
    return None


def _has_host(url: str) -> bool:
    try:
        return bool(urlsplit(url).hostname)
    except ValueError:
        return False


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ArtifactError(f"file URL {url[:400]} names a remote host; only local paths work")
    if not parts.path:
        raise ArtifactError(f"file URL {url[:400]} has no path")
    return Path(unquote(parts.path))


class _LockEntry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


# -- the fetcher --------------------------------------------------------------------------


class Fetcher:
    """Downloads artifacts into an :class:`ArtifactStore` and verifies them.

    Owns one lazily created ``httpx.AsyncClient`` (closed by :meth:`aclose`).
    ``mqtt_fetch(topic, timeout)`` returns the payload of an ``mqtt:<topic>`` artifact;
    ``transport`` replaces httpx's network transport (proxies, tests).
    """

    def __init__(
        self,
        store: ArtifactStore,
        limits: FetchLimits,
        *,
        mqtt_fetch: Callable[[str, float], Awaitable[bytes]] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._store = store
        self.limits = limits
        self._mqtt_fetch = mqtt_fetch
        self._http = HttpSource(lambda: self.limits, transport)
        self._closed = False
        self._locks: dict[str, _LockEntry] = {}

    async def aclose(self) -> None:
        """Close the HTTP client. Fetches after this raise :class:`ArtifactError`."""
        self._closed = True
        await self._http.aclose()

    async def fetch(
        self,
        url: str,
        sha256: str,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """Make sure the artifact is in the store, verified, and return its path.

        Raises :class:`DownloadError` (transport; retryable later),
        :class:`ArtifactTooLarge`, :class:`IntegrityError` or :class:`ArtifactError`.
        """
        if self._closed:
            raise ArtifactError("artifact fetcher is closed")
        hex_digest = normalize_sha256(sha256)
        display = redact_url(url)  # no user-info or query in messages and logs
        limits = self.limits
        if size is not None:
            if size < 0:
                raise ArtifactError(f"invalid size {size} for {display}")
            if size > limits.max_size:
                raise ArtifactTooLarge(
                    f"{display} is declared as {size} bytes, over the limit of "
                    f"{limits.max_size} bytes"
                )
        scheme = _scheme(url)
        if scheme is None:
            shown = url.partition(":")[0][:20] + ":" if ":" in url else "(none)"
            raise ArtifactError(
                f"unsupported artifact URL scheme {shown} in {display} "
                "(expected http://, https://, file:// or mqtt:<topic>)"
            )
        if scheme in ("http", "https") and not _has_host(url):
            raise ArtifactError(f"invalid artifact URL {display}: no host")
        job = Job(
            url=url,
            display=display,
            hex=hex_digest,
            size=size,
            cap=min(limits.max_size, size) if size is not None else limits.max_size,
            part=self._store.partial_path(hex_digest),
            progress=ProgressReporter(progress, size),
            store=self._store,
            limits=lambda: self.limits,
        )
        async with self._exclusive(hex_digest):
            cached = await self._cached(job)
            if cached is not None:
                return cached
            if scheme == "mqtt":
                path = await self._fetch_mqtt(job)
            elif scheme == "file":
                path = await self._fetch_file(job)
            else:
                path = await self._http.fetch(job)
        log.info("artifact_fetched", url=display, sha256=hex_digest, size=job.done)
        return path

    # -- common -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self, hex_digest: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(hex_digest, _LockEntry())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[hex_digest]

    async def _cached(self, job: Job) -> Path | None:
        """The stored artifact if present and intact (a corrupt one is deleted)."""
        if not self._store.has(job.hex):
            return None
        if not await asyncio.to_thread(self._store.verify, job.hex):
            return None
        path = self._store.path(job.hex)
        try:
            actual = path.stat().st_size
        except OSError:  # removed since (gc): fetch it again
            return None
        if job.size is not None and actual != job.size:
            raise IntegrityError(
                f"size mismatch for {job.display}: expected {job.size} bytes, but the stored "
                f"artifact {short_hex(job.hex)} has {actual}"
            )
        job.done = actual
        job.progress.finish(actual)
        return path

    # -- mqtt: --------------------------------------------------------------------------

    async def _fetch_mqtt(self, job: Job) -> Path:
        topic = job.url[len("mqtt:") :]
        if not topic or "+" in topic or "#" in topic:
            raise ArtifactError(f"invalid MQTT artifact URL {job.display}: needs a plain topic")
        if self._mqtt_fetch is None:
            raise ArtifactError(f"cannot fetch {job.display}: MQTT artifact delivery is off")
        timeout = self.limits.read_timeout
        try:
            payload = await self._mqtt_fetch(topic, timeout)
        except TimeoutError:
            raise DownloadError(
                f"no artifact arrived on MQTT topic {topic} within {timeout:g} s"
            ) from None
        except ArtifactError:
            raise
        except OSError as exc:
            raise DownloadError(f"MQTT fetch of {job.display} failed: {describe(exc)}") from exc
        payload = bytes(payload)
        job.done = len(payload)
        if len(payload) > job.cap:
            raise job.too_large(len(payload), declared=False)
        job.check_disk(len(payload))
        hasher = await asyncio.to_thread(hashlib.sha256, payload)
        job.check_result(hasher)
        return await job.put_bytes(payload)

    # -- file:// ------------------------------------------------------------------------

    async def _fetch_file(self, job: Job) -> Path:
        source = _file_url_path(job.url)
        try:
            st = await asyncio.to_thread(os.stat, source)
        except FileNotFoundError:
            raise ArtifactError(f"artifact file not found: {source}") from None
        except OSError as exc:
            raise ArtifactError(f"cannot read artifact file {source}: {describe(exc)}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"artifact file {source} is not a regular file")
        if st.st_size > job.cap:
            raise job.too_large(st.st_size, declared=True)
        job.check_disk(st.st_size)
        job.total = job.progress.total = st.st_size
        try:
            await self._copy_file(job, source)
        except (ArtifactTooLarge, IntegrityError):
            discard(job.part)
            raise
        return await job.commit()

    async def _copy_file(self, job: Job, source: Path) -> None:
        hasher = hashlib.sha256()
        try:
            src = await asyncio.to_thread(source.open, "rb")
        except OSError as exc:
            raise ArtifactError(f"cannot read artifact file {source}: {describe(exc)}") from exc
        try:
            fd = await asyncio.to_thread(open_partial, job.part, 0)
        except OSError as exc:
            src.close()
            raise ArtifactError(f"cannot create partial file {job.part}: {exc}") from exc
        try:
            while True:
                try:
                    chunk = await asyncio.to_thread(src.read, _COPY_CHUNK)
                except OSError as exc:
                    raise ArtifactError(
                        f"cannot read artifact file {source}: {describe(exc)}"
                    ) from exc
                if not chunk:
                    break
                if job.done + len(chunk) > job.cap:
                    raise job.too_large(job.done + len(chunk), declared=False)
                await job.write(fd, chunk, hasher)
                job.done += len(chunk)
                job.progress.update(job.done)
        finally:
            os.close(fd)
            src.close()
        job.check_result(hasher)

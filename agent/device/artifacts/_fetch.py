"""Fetching artifacts into the :class:`ArtifactStore`: the :class:`Fetcher`.

:class:`Fetcher` is the orchestrator. It checks the request (digest, declared size
against ``max_size``, URL scheme), serialises concurrent fetches of the same digest
(the second caller finds the artifact in the store), returns an intact stored
artifact without fetching it, and hands the others to the source for their scheme:

- ``http(s)://``: :class:`HttpSource` in ``_http_source`` (streamed with httpx,
  resumed with ``Range`` from a partial file, retried with jittered exponential
  backoff, guarded by a stall watchdog);
- ``file://``: ``fetch_file`` in ``_file_source`` (copied off the event loop);
- ``mqtt:<topic>``: ``fetch_mqtt`` in ``_mqtt_source`` (delegated to the MQTT
  layer's ``mqtt_fetch`` callable).

Whatever the source, its bytes go through the :class:`Job` (``_job``): the size cap,
the free-space reserve and the SHA-256 check are enforced there. Third-party
exceptions (httpx, OSError) leave the package only as :mod:`agent.errors` exceptions
with one-line messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from agent.device.artifacts._file_source import fetch_file
from agent.device.artifacts._job import Job
from agent.device.artifacts._limits import FetchLimits
from agent.device.artifacts._mqtt_source import fetch_mqtt
from agent.device.artifacts._progress import Progress, ProgressReporter
from agent.device.artifacts._store import ArtifactStore, normalize_sha256, short_hex
from agent.errors import ArtifactError, ArtifactTooLarge, IntegrityError
from agent.wire.redact import redact_url

if TYPE_CHECKING:
    import httpx

    from agent.device.artifacts._http_source import HttpSource

log = structlog.get_logger(__name__)


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


class _LockEntry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


# -- the fetcher --------------------------------------------------------------------------


class Fetcher:
    """Downloads artifacts into an :class:`ArtifactStore` and verifies them.

    Owns one lazily created ``httpx.AsyncClient`` (in its :class:`HttpSource`, closed
    by :meth:`aclose`). httpx (with httpcore, h11, anyio: ~1.5 MiB and ~60 ms of
    imports) is imported with the first ``http(s)://`` download: an agent restarting
    with its flows in the local store, or fetching over MQTT, never needs it.
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
        self._transport = transport
        self._http: HttpSource | None = None
        self._closed = False
        self._locks: dict[str, _LockEntry] = {}

    async def aclose(self) -> None:
        """Close the HTTP client. Fetches after this raise :class:`ArtifactError`."""
        self._closed = True
        if self._http is not None:
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
                path = await fetch_mqtt(job, self._mqtt_fetch)
            elif scheme == "file":
                path = await fetch_file(job)
            else:
                path = await self._http_source().fetch(job)
        log.info("artifact_fetched", url=display, sha256=hex_digest, size=job.done)
        return path

    def _http_source(self) -> HttpSource:
        if self._http is None:
            from agent.device.artifacts._http_source import HttpSource

            self._http = HttpSource(lambda: self.limits, self._transport)
        return self._http

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

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
import random
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import httpx
import structlog

from agent import __version__
from agent.device.artifacts._errors import describe, download_error
from agent.device.artifacts._job import Job
from agent.device.artifacts._limits import FetchLimits
from agent.device.artifacts._partial import discard, load_partial, open_partial
from agent.device.artifacts._progress import Progress, ProgressReporter
from agent.device.artifacts._store import ArtifactStore, normalize_sha256, short_hex
from agent.errors import ArtifactError, ArtifactTooLarge, DownloadError, IntegrityError
from agent.wire.redact import redact_url

if TYPE_CHECKING:
    _Hash = hashlib._Hash

log = structlog.get_logger(__name__)

_COPY_CHUNK = 1024 * 1024  # file:// read size
_DISK_RECHECK = 4 * 1024 * 1024  # re-check free space this often when the size is unknown
_RETRYABLE_STATUS = frozenset({408, 429})


# -- internal signals ---------------------------------------------------------------------


class _StartOver(Exception):
    """Discard the partial and download from byte 0 (allowed once per fetch)."""

    def __init__(self, error: ArtifactError) -> None:
        super().__init__(str(error))
        self.error = error


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


def _int_header(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """Parse ``bytes <start>-<end>/<total|*>``; None if absent or malformed."""
    if value is None:
        return None
    unit, _, spec = value.strip().partition(" ")
    span, _, total = spec.strip().partition("/")
    start, _, end = span.partition("-")
    if unit.lower() != "bytes" or not start.isdigit() or not end.isdigit():
        return None
    if total != "*" and not total.isdigit():
        return None
    return int(start), int(end), None if total == "*" else int(total)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


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
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self._locks: dict[str, _LockEntry] = {}

    async def aclose(self) -> None:
        """Close the HTTP client. Fetches after this raise :class:`ArtifactError`."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

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
                path = await self._fetch_http(job)
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

    # -- http(s):// ---------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = self.limits
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(
                    connect=limits.connect_timeout,
                    read=limits.read_timeout,
                    write=limits.read_timeout,
                    pool=limits.connect_timeout,
                ),
                follow_redirects=True,
                headers={
                    # The digest is over the stored bytes, and ranges must count them.
                    "Accept-Encoding": "identity",
                    "User-Agent": f"edge-agent/{__version__}",
                },
            )
        return self._client

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        limits = self.limits
        base = min(limits.backoff_max, limits.backoff_initial * 2.0**attempt)
        delay = base * (0.5 + random.random() / 2)  # jitter, not cryptography
        if retry_after is not None:
            delay = max(delay, min(retry_after, limits.backoff_max))
        return delay

    async def _fetch_http(self, job: Job) -> Path:
        """Attempts with retries; a partial survives retryable errors and cancellation."""
        retry = 0
        while True:
            try:
                try:
                    return await self._http_attempt(job)
                except _StartOver as signal:
                    if job.started_over:
                        raise signal.error from None
                    log.warning(
                        "artifact_download_restart", url=job.display, reason=str(signal.error)
                    )
                    job.started_over = True
                    job.resumed = False
                    discard(job.part)
                    continue
            except (ArtifactTooLarge, IntegrityError):
                discard(job.part)
                raise
            except DownloadError as exc:
                if not exc.retryable or retry >= self.limits.retries:
                    raise
                delay = self._backoff(retry, job.retry_after)
                job.retry_after = None
                retry += 1
                log.warning(
                    "artifact_download_retry",
                    url=job.display,
                    error=str(exc),
                    retry=retry,
                    of=self.limits.retries,
                    delay=round(delay, 3),
                )
                await asyncio.sleep(delay)

    async def _http_attempt(self, job: Job) -> Path:
        offset, hasher = await asyncio.to_thread(load_partial, job.part)
        if offset > job.cap:
            discard(job.part)
            offset, hasher = 0, hashlib.sha256()
        job.done = offset
        if offset and job.size is not None and offset == job.size:
            # A previous run downloaded everything but did not commit.
            if hasher.hexdigest() == job.hex:
                return await job.commit()
            raise _StartOver(ArtifactError(f"complete partial of {job.display} is corrupt"))
        if job.size is not None:
            job.check_disk(job.size - offset)
        try:
            result = await self._transfer(job, offset, hasher)
        except httpx.HTTPError as exc:
            raise self._translate(job, exc) from exc
        except httpx.InvalidURL as exc:
            raise ArtifactError(f"invalid artifact URL {job.display}: {describe(exc)}") from exc
        if result is None:
            log.info("artifact_partial_was_complete", url=job.display, size=job.done)
            return await job.commit()
        try:
            job.check_result(result)
        except IntegrityError as exc:
            if job.resumed:  # the old bytes may be the culprit: try once from scratch
                raise _StartOver(exc) from None
            raise
        return await job.commit()

    async def _transfer(self, job: Job, offset: int, hasher: _Hash) -> _Hash | None:
        """One GET (with Range when resuming) under the stall watchdog.

        Returns the digest of the whole partial, or None if the partial turned out to be
        complete already (416 and the digest matches).
        """
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        limits = self.limits
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as watchdog:
                watchdog.reschedule(loop.time() + limits.connect_timeout + limits.stall_timeout)
                async with self._http().stream("GET", job.url, headers=headers) as response:
                    watchdog.reschedule(loop.time() + limits.stall_timeout)
                    accepted = self._accept(job, response, offset, hasher)
                    if accepted is None:
                        return None
                    offset, hasher = accepted
                    await self._receive(job, response, offset, hasher, watchdog)
                    return hasher
        except TimeoutError as exc:
            if not watchdog.expired():
                raise DownloadError(
                    f"download of {job.display} timed out after {job.position()}"
                ) from exc
            raise DownloadError(
                f"download of {job.display} stalled: no data for {limits.stall_timeout:g} s "
                f"after {job.position()}"
            ) from None

    def _translate(self, job: Job, exc: httpx.HTTPError) -> ArtifactError:
        """An httpx exception as the agent error the layers above understand."""
        limits = self.limits
        if isinstance(exc, httpx.ConnectTimeout):
            return DownloadError(
                f"cannot connect for {job.display}: timed out after {limits.connect_timeout:g} s"
            )
        if isinstance(exc, httpx.ReadTimeout):
            return DownloadError(
                f"download of {job.display} timed out: no data for {limits.read_timeout:g} s "
                f"after {job.position()}"
            )
        if isinstance(exc, httpx.ConnectError):
            return DownloadError(f"cannot connect for {job.display}: {describe(exc)}")
        if isinstance(exc, httpx.RemoteProtocolError):
            return DownloadError(
                f"connection dropped during download of {job.display} after {job.position()}: "
                f"{describe(exc)}"
            )
        if isinstance(exc, httpx.UnsupportedProtocol):
            return ArtifactError(f"invalid artifact URL {job.display}: {describe(exc)}")
        if isinstance(exc, httpx.TooManyRedirects):
            return download_error(f"too many redirects for {job.display}", retryable=False)
        if isinstance(exc, httpx.TransportError):
            return DownloadError(
                f"download of {job.display} failed after {job.position()}: "
                f"{type(exc).__name__}: {describe(exc)}"
            )
        return download_error(
            f"download of {job.display} failed: {type(exc).__name__}: {describe(exc)}",
            retryable=False,
        )

    def _accept(
        self, job: Job, response: httpx.Response, offset: int, hasher: _Hash
    ) -> tuple[int, _Hash] | None:
        """Check status and headers; return where the body starts (None: partial complete)."""
        status = response.status_code
        length = _int_header(response.headers.get("content-length"))
        if status == 206:
            content_range = _content_range(response.headers.get("content-range"))
            if content_range is None or content_range[0] != offset:
                raise _StartOver(
                    DownloadError(
                        f"{job.display} answered Range bytes={offset}- with Content-Range "
                        f"{response.headers.get('content-range')!r}"
                    )
                )
            total = content_range[2]
            if total is None and length is not None:
                total = offset + length
            job.resumed = job.resumed or offset > 0
        elif status == 200:
            if offset:
                log.info("artifact_range_ignored", url=job.display, offset=offset)
            offset, hasher = 0, hashlib.sha256()
            job.done = 0
            job.resumed = False
            total = length
        elif status == 416 and offset:
            if hasher.hexdigest() == job.hex:
                return None
            raise _StartOver(
                DownloadError(f"HTTP 416 from {job.display} for Range bytes={offset}-")
            )
        else:
            retryable = status in _RETRYABLE_STATUS or 500 <= status <= 599
            reason = f" {response.reason_phrase}" if response.reason_phrase else ""
            job.retry_after = _retry_after(response.headers.get("retry-after"))
            raise download_error(f"HTTP {status}{reason} from {job.display}", retryable=retryable)
        job.total = total
        if total is not None:
            if total > job.cap:
                raise job.too_large(total, declared=True)
            if job.size is not None and total < job.size:
                raise IntegrityError(
                    f"size mismatch for {job.display}: expected {job.size} bytes, "
                    f"server has {total}"
                )
            if job.size is None:
                job.check_disk(total - offset)
            job.progress.total = total
        elif job.size is None:
            job.check_disk(0)
        return offset, hasher

    async def _receive(
        self,
        job: Job,
        response: httpx.Response,
        offset: int,
        hasher: _Hash,
        watchdog: asyncio.Timeout,
    ) -> None:
        """Append the body to the partial while hashing it; keep the watchdog fed."""
        loop = asyncio.get_running_loop()
        stall = self.limits.stall_timeout
        try:
            fd = await asyncio.to_thread(open_partial, job.part, offset)
        except OSError as exc:
            raise ArtifactError(f"cannot open partial download {job.part}: {exc}") from exc
        next_disk_check = offset + _DISK_RECHECK
        try:
            job.progress.update(job.done)
            async for chunk in response.aiter_raw():
                if not chunk:
                    continue
                if job.done + len(chunk) > job.cap:
                    raise job.too_large(job.done + len(chunk), declared=False)
                await job.write(fd, chunk, hasher)
                job.done += len(chunk)
                watchdog.reschedule(loop.time() + stall)
                job.progress.update(job.done)
                if job.total is None and job.size is None and job.done >= next_disk_check:
                    job.check_disk(0)
                    next_disk_check = job.done + _DISK_RECHECK
        finally:
            os.close(fd)
        if job.total is not None and job.done < job.total:
            raise DownloadError(f"download of {job.display} ended early after {job.position()}")

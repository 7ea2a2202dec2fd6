"""Downloading ``http(s)://`` artifacts.

:class:`HttpSource` streams an artifact with httpx into the job's partial file:
resumed with ``Range`` from what an earlier attempt or process left, retried with
jittered exponential backoff (at least the server's ``Retry-After``, up to
``backoff_max``), guarded by a stall watchdog, restarted from byte 0 once if the
resumed bytes cannot be trusted. httpx exceptions leave it only as
:mod:`agent.errors` exceptions with one-line messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import httpx
import structlog

from agent import __version__
from agent.device.artifacts._errors import describe, download_error
from agent.device.artifacts._partial import discard, load_partial, open_partial
from agent.errors import ArtifactError, ArtifactTooLarge, DownloadError, IntegrityError

if TYPE_CHECKING:
    from pathlib import Path

    from agent.device.artifacts._job import Job
    from agent.device.artifacts._limits import FetchLimits

    _Hash = hashlib._Hash

log = structlog.get_logger(__name__)

_DISK_RECHECK = 4 * 1024 * 1024  # re-check free space this often when the size is unknown
_RETRYABLE_STATUS = frozenset({408, 429})


class _StartOver(Exception):
    """Discard the partial and download from byte 0 (allowed once per fetch)."""

    def __init__(self, error: ArtifactError) -> None:
        super().__init__(str(error))
        self.error = error


# -- headers and errors -------------------------------------------------------------------


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


def _translate(job: Job, exc: httpx.HTTPError, limits: FetchLimits) -> ArtifactError:
    """An httpx exception as the agent error the layers above understand."""
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


# -- the source ---------------------------------------------------------------------------


class _TlsWhenNeeded(httpx.AsyncBaseTransport):
    """httpx's own transport, with TLS set up at the first ``https://`` request.

    httpx builds its SSL context (certifi's CA bundle, parsed: ~3 MiB that stay) when
    the client is made, although a plain ``http://`` artifact server never needs it.
    ``http://`` requests go through a transport whose context trusts no certificate
    at all (it is never used for TLS; were it, verification would fail, not pass).
    Proxies from the environment are the client's mounts, as before.
    """

    def __init__(self) -> None:
        self._plain: httpx.AsyncHTTPTransport | None = None
        self._tls: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "https":
            if self._tls is None:
                self._tls = httpx.AsyncHTTPTransport()
            return await self._tls.handle_async_request(request)
        if self._plain is None:
            self._plain = httpx.AsyncHTTPTransport(verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        return await self._plain.handle_async_request(request)

    async def aclose(self) -> None:
        for transport in (self._plain, self._tls):
            if transport is not None:
                await transport.aclose()


class HttpSource:
    """Fetches ``http(s)://`` artifacts for a :class:`~agent.device.artifacts.Fetcher`.

    Owns one lazily created ``httpx.AsyncClient`` (closed by :meth:`aclose`);
    ``transport`` replaces httpx's network transport (proxies, tests). ``limits``
    returns the fetcher's current limits and is read at each use.
    """

    def __init__(
        self,
        limits: Callable[[], FetchLimits],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._limits = limits
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        """Close the client (a later fetch would create a new one)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        """The client, created on first use with the limits of that moment."""
        if self._client is None:
            limits = self._limits()
            self._client = httpx.AsyncClient(
                transport=self._transport or _TlsWhenNeeded(),
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
        limits = self._limits()
        base = min(limits.backoff_max, limits.backoff_initial * 2.0**attempt)
        delay = base * (0.5 + random.random() / 2)  # jitter, not cryptography
        if retry_after is not None:
            delay = max(delay, min(retry_after, limits.backoff_max))
        return delay

    async def fetch(self, job: Job) -> Path:
        """Attempts with retries; a partial survives retryable errors and cancellation."""
        retry = 0
        while True:
            try:
                try:
                    return await self._attempt(job)
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
                if not exc.retryable or retry >= self._limits().retries:
                    raise
                delay = self._backoff(retry, job.retry_after)
                job.retry_after = None
                retry += 1
                log.warning(
                    "artifact_download_retry",
                    url=job.display,
                    error=str(exc),
                    retry=retry,
                    of=self._limits().retries,
                    delay=round(delay, 3),
                )
                await asyncio.sleep(delay)

    async def _attempt(self, job: Job) -> Path:
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
            raise _translate(job, exc, self._limits()) from exc
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
        limits = self._limits()
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
        stall = self._limits().stall_timeout
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

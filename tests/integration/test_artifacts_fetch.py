"""Fetcher against a real HTTP server (tests/artifact_server.py), file:// and mqtt:."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import shutil
import socket
import time
from collections import namedtuple
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from artifact_server import ArtifactServer, Fault

from agent.device.artifacts import ArtifactStore, Fetcher, FetchLimits
from agent.errors import (
    ArtifactError,
    ArtifactTooLarge,
    DownloadError,
    IntegrityError,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

# Small timeouts and backoff so fault tests stay fast; no disk reserve unless a test asks.
FAST: dict[str, Any] = {
    "connect_timeout": 2.0,
    "read_timeout": 5.0,
    "stall_timeout": 5.0,
    "retries": 3,
    "backoff_initial": 0.01,
    "backoff_max": 0.05,
    "min_free_bytes": 0,
}


def blob(size: int, seed: int = 0) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def server() -> Iterator[ArtifactServer]:
    with ArtifactServer() as srv:
        yield srv


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
async def make_fetcher(store: ArtifactStore) -> AsyncIterator[Callable[..., Fetcher]]:
    fetchers: list[Fetcher] = []

    def make(
        *,
        mqtt_fetch: Any = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **limits: Any,
    ) -> Fetcher:
        fetcher = Fetcher(
            store,
            FetchLimits(**{**FAST, **limits}),
            mqtt_fetch=mqtt_fetch,
            transport=transport,
        )
        fetchers.append(fetcher)
        return fetcher

    yield make
    for fetcher in fetchers:
        await fetcher.aclose()


def ranges(server: ArtifactServer, path: str) -> list[str | None]:
    return [r.range for r in server.requests_for(path)]


def assert_only_committed(store: ArtifactStore, *shas: str) -> None:
    """sha256/ holds exactly these verified artifacts; no partial or temp file is left."""
    assert sorted(p.name for p in (store.root / "sha256").iterdir()) == sorted(shas)
    for sha in shas:
        assert store.verify(sha)
    assert list((store.root / "partial").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# -- plain downloads ----------------------------------------------------------------------


async def test_download_and_verify(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(300_000)
    server.add("/flow.wasm", data)
    calls: list[tuple[int, int | None]] = []
    path = await make_fetcher().fetch(
        server.url("/flow.wasm"), sha, len(data), lambda done, total: calls.append((done, total))
    )
    assert path == store.path(sha)
    assert path.read_bytes() == data
    assert ranges(server, "/flow.wasm") == [None]
    assert server.requests[0].headers.get("Accept-Encoding") == "identity"
    assert_only_committed(store, sha)
    assert calls[-1] == (len(data), len(data))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


async def test_download_without_declared_size(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(70_000, seed=1)
    server.add("/a.wasm", data)
    path = await make_fetcher().fetch(server.url("/a.wasm"), sha.upper())
    assert path.read_bytes() == data
    assert_only_committed(store, sha)


async def test_already_in_store_makes_no_request(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(1000)
    store.put_bytes(data, sha)
    calls: list[tuple[int, int | None]] = []
    path = await make_fetcher().fetch(
        server.url("/not-served.wasm"), sha, len(data), lambda d, t: calls.append((d, t))
    )
    assert path == store.path(sha)
    assert server.requests == []
    assert calls == [(len(data), len(data))]


async def test_corrupt_stored_copy_is_downloaded_again(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(5000)
    store.put_bytes(data, sha).write_bytes(b"bit rot")
    server.add("/a.wasm", data)
    path = await make_fetcher().fetch(server.url("/a.wasm"), sha)
    assert path.read_bytes() == data
    assert len(server.requests) == 1


async def test_concurrent_fetches_of_one_artifact_download_once(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(200_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(chunk_delay=0.005))
    fetcher = make_fetcher()
    paths = await asyncio.gather(*(fetcher.fetch(server.url("/a.wasm"), sha) for _ in range(3)))
    assert set(paths) == {store.path(sha)}
    assert len(server.requests) == 1


async def test_redirect_is_followed(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(1000)
    server.add("/real.wasm", data)
    server.set_fault("/alias.wasm", Fault(status=302, headers=(("Location", "/real.wasm"),)))
    path = await make_fetcher().fetch(server.url("/alias.wasm"), sha)
    assert path.read_bytes() == data
    assert [r.path for r in server.requests] == ["/alias.wasm", "/real.wasm"]


async def test_custom_transport_is_used(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(1000)
    server.add("/a.wasm", data)
    seen: list[str] = []

    class Recording(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(str(request.url))
            return await super().handle_async_request(request)

    path = await make_fetcher(transport=Recording()).fetch(server.url("/a.wasm"), sha)
    assert path.read_bytes() == data
    assert seen == [server.url("/a.wasm")]


async def test_progress_is_rate_limited(
    server: ArtifactServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(40 * 16 * 1024)  # 40 server pieces, 20 ms apart: ~0.8 s
    server.add("/slow.wasm", data)
    server.set_fault("/slow.wasm", Fault(chunk_delay=0.02))
    calls: list[tuple[float, int, int | None]] = []
    started = time.monotonic()
    await make_fetcher().fetch(
        server.url("/slow.wasm"),
        sha,
        progress=lambda d, t: calls.append((time.monotonic(), d, t)),
    )
    elapsed = time.monotonic() - started
    assert 2 <= len(calls) <= elapsed / 0.25 + 2  # not once per received chunk
    assert calls[-1][1:] == (len(data), len(data))
    assert all(total == len(data) for _, _, total in calls)  # from Content-Length
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(calls[:-1])]  # the final call is extra
    assert all(gap >= 0.2 for gap in gaps)


async def test_failing_progress_callback_does_not_fail_the_download(
    server: ArtifactServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(1000)
    server.add("/a.wasm", data)

    def broken(done: int, total: int | None) -> None:
        raise RuntimeError("ui went away")

    path = await make_fetcher().fetch(server.url("/a.wasm"), sha, progress=broken)
    assert path.read_bytes() == data


# -- integrity and size caps --------------------------------------------------------------


async def test_sha_mismatch_is_integrity_error_and_not_retried(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, _ = blob(50_000)
    _, other_sha = blob(50_000, seed=99)
    server.add("/a.wasm", data)
    url = server.url("/a.wasm")
    with pytest.raises(IntegrityError, match="sha256 mismatch for") as info:
        await make_fetcher().fetch(url, other_sha, len(data))
    assert url in str(info.value)
    assert other_sha[:12] in str(info.value)
    assert not info.value.retryable
    assert len(server.requests) == 1
    assert not store.partial_path(other_sha).exists()
    assert_only_committed(store)


async def test_declared_size_mismatch_is_integrity_error(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(10_000)
    server.add("/a.wasm", data)
    with pytest.raises(IntegrityError, match="size mismatch"):
        await make_fetcher().fetch(server.url("/a.wasm"), sha, len(data) + 1)
    assert len(server.requests) == 1
    assert_only_committed(store)


async def test_declared_size_over_cap_refused_before_any_request(
    server: ArtifactServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(2000)
    server.add("/a.wasm", data)
    with pytest.raises(ArtifactTooLarge, match="over the limit of 1000 bytes"):
        await make_fetcher(max_size=1000).fetch(server.url("/a.wasm"), sha, 2000)
    assert server.requests == []


async def test_content_length_over_cap(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(10_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(content_length=10**9))
    with pytest.raises(ArtifactTooLarge, match="declares 1000000000 bytes"):
        await make_fetcher(max_size=50_000).fetch(server.url("/a.wasm"), sha)
    assert len(server.requests) == 1  # not retried
    assert not store.partial_path(sha).exists()


@pytest.mark.parametrize("framing", ["omit_length", "chunked"])
async def test_streamed_size_over_cap_without_content_length(
    server: ArtifactServer,
    store: ArtifactStore,
    make_fetcher: Callable[..., Fetcher],
    framing: str,
) -> None:
    data, sha = blob(300_000)
    server.add("/big.wasm", data)
    server.set_fault("/big.wasm", Fault(**{framing: True}))
    with pytest.raises(ArtifactTooLarge, match="sent more than the limit of 100000 bytes"):
        await make_fetcher(max_size=100_000).fetch(server.url("/big.wasm"), sha)
    assert len(server.requests) == 1
    assert not store.partial_path(sha).exists()
    assert_only_committed(store)


async def test_streamed_size_over_declared_size(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(100_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(chunked=True))
    with pytest.raises(ArtifactTooLarge, match="declared size of 40000 bytes"):
        await make_fetcher().fetch(server.url("/a.wasm"), sha, 40_000)
    assert not store.partial_path(sha).exists()


async def test_content_length_shorter_than_body_is_integrity_error(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(20_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(content_length=5_000))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        await make_fetcher().fetch(server.url("/a.wasm"), sha)
    assert_only_committed(store)


DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.mark.parametrize("declare_size", [True, False])
async def test_not_enough_free_space(
    server: ArtifactServer,
    store: ArtifactStore,
    make_fetcher: Callable[..., Fetcher],
    monkeypatch: pytest.MonkeyPatch,
    declare_size: bool,
) -> None:
    data, sha = blob(10_000)
    server.add("/a.wasm", data)
    seen: list[str] = []

    def fake_disk_usage(path: Any) -> DiskUsage:
        seen.append(str(path))
        return DiskUsage(total=10**9, used=10**9 - 12_000, free=12_000)

    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage)
    fetcher = make_fetcher(min_free_bytes=4096)
    size = len(data) if declare_size else None
    with pytest.raises(ArtifactTooLarge, match="not enough disk space"):
        await fetcher.fetch(server.url("/a.wasm"), sha, size)
    assert seen
    assert seen[0] == str(store.root)
    # With a declared size the refusal comes before any request; otherwise from
    # the Content-Length, before any body byte is written.
    assert len(server.requests) == (0 if declare_size else 1)
    assert not store.partial_path(sha).exists()
    # Within the reserve it fits.
    path = await make_fetcher(min_free_bytes=2000).fetch(server.url("/a.wasm"), sha, size)
    assert path.read_bytes() == data


async def test_free_space_check_subtracts_the_existing_partial(
    server: ArtifactServer,
    store: ArtifactStore,
    make_fetcher: Callable[..., Fetcher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, sha = blob(10_000)
    server.add("/a.wasm", data)
    store.partial_path(sha).write_bytes(data[:8000])
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: DiskUsage(10**9, 0, 3000))
    path = await make_fetcher(min_free_bytes=1000).fetch(server.url("/a.wasm"), sha, len(data))
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == ["bytes=8000-"]


# -- retries ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429, 408])
async def test_retryable_status_then_success(
    server: ArtifactServer,
    store: ArtifactStore,
    make_fetcher: Callable[..., Fetcher],
    status: int,
) -> None:
    data, sha = blob(20_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(status=status, times=2))
    path = await make_fetcher(retries=3).fetch(server.url("/a.wasm"), sha, len(data))
    assert path.read_bytes() == data
    assert len(server.requests) == 3
    assert_only_committed(store, sha)


async def test_retries_exhausted_raises_last_download_error(
    server: ArtifactServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(1000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(status=503))
    with pytest.raises(DownloadError, match="HTTP 503") as info:
        await make_fetcher(retries=2).fetch(server.url("/a.wasm"), sha)
    assert info.value.retryable
    assert len(server.requests) == 3


async def test_retry_after_is_honoured_up_to_backoff_max(
    server: ArtifactServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(1000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(status=429, retry_after=60, times=1))
    started = time.monotonic()
    await make_fetcher(backoff_max=0.3).fetch(server.url("/a.wasm"), sha)
    assert time.monotonic() - started >= 0.25  # not the jittered 10 ms, not 60 s
    assert len(server.requests) == 2


async def test_404_is_not_retried(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    _, sha = blob(10)
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        await make_fetcher(retries=3).fetch(server.url("/missing.wasm"), sha)
    assert not info.value.retryable
    assert len(server.requests) == 1
    assert_only_committed(store)


async def test_query_string_is_not_leaked_into_errors(
    server: ArtifactServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    _, sha = blob(10)
    url = server.url("/missing.wasm") + "?X-Amz-Signature=s3cr3t"
    server.set_fault("/missing.wasm", Fault(status=403))
    with pytest.raises(DownloadError, match="HTTP 403") as info:
        await make_fetcher().fetch(url, sha)
    assert "s3cr3t" not in str(info.value)
    assert server.requests[0].target.endswith("?X-Amz-Signature=s3cr3t")


async def test_connection_refused_is_retried_then_raised(
    make_fetcher: Callable[..., Fetcher],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, sha = blob(10)
    with pytest.raises(DownloadError, match="cannot connect") as info:
        await make_fetcher(retries=1).fetch(f"http://127.0.0.1:{port}/a.wasm", sha)
    assert info.value.retryable
    assert "\n" not in str(info.value)


# -- resume -------------------------------------------------------------------------------


async def test_dropped_connection_is_resumed_with_range(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(300_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(drop_after=100_000, times=1))
    path = await make_fetcher().fetch(server.url("/a.wasm"), sha, len(data))
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == [None, "bytes=100000-"]
    assert_only_committed(store, sha)


async def test_dropped_connection_without_retries_keeps_partial(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(300_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(drop_after=100_000, times=1))
    fetcher = make_fetcher(retries=0)
    with pytest.raises(DownloadError, match=r"connection dropped .* after 100000 of 300000 bytes"):
        await fetcher.fetch(server.url("/a.wasm"), sha)
    assert store.partial_path(sha).read_bytes() == data[:100_000]
    assert not store.has(sha)
    # The caller's own retry later resumes.
    path = await fetcher.fetch(server.url("/a.wasm"), sha)
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == [None, "bytes=100000-"]


async def test_content_length_longer_than_body_is_resumed(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    # The first answer promises 1000 bytes more than it sends; the resume then asks
    # for bytes past the end, gets 416, and finds the partial complete.
    data, sha = blob(50_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(content_length=51_000, times=1))
    path = await make_fetcher().fetch(server.url("/a.wasm"), sha)
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == [None, "bytes=50000-"]
    assert_only_committed(store, sha)


async def test_partial_from_previous_process_is_resumed(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(200_000)
    server.add("/a.wasm", data)
    store.partial_path(sha).write_bytes(data[:123_456])
    calls: list[tuple[int, int | None]] = []
    path = await make_fetcher().fetch(
        server.url("/a.wasm"), sha, progress=lambda d, t: calls.append((d, t))
    )
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == ["bytes=123456-"]
    assert calls[0][0] >= 123_456  # progress counts the resumed bytes
    assert calls[-1] == (len(data), len(data))
    assert_only_committed(store, sha)


async def test_corrupt_partial_is_discarded_and_downloaded_again(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(100_000)
    server.add("/a.wasm", data)
    store.partial_path(sha).write_bytes(b"\xff" * 30_000)  # not a prefix of the artifact
    path = await make_fetcher().fetch(server.url("/a.wasm"), sha, len(data))
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == ["bytes=30000-", None]
    assert_only_committed(store, sha)


async def test_server_ignoring_range_restarts_from_zero(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(100_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(ignore_range=True))
    store.partial_path(sha).write_bytes(data[:60_000])
    path = await make_fetcher().fetch(server.url("/a.wasm"), sha, len(data))
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == ["bytes=60000-"]
    assert_only_committed(store, sha)


async def test_416_discards_partial_and_starts_over_once(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(10_000)
    server.add("/a.wasm", data)
    store.partial_path(sha).write_bytes(b"\0" * 12_000)  # longer than the artifact
    path = await make_fetcher().fetch(server.url("/a.wasm"), sha)
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == ["bytes=12000-", None]
    assert_only_committed(store, sha)


async def test_complete_partial_is_committed_after_416(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(10_000)
    server.add("/a.wasm", data)
    store.partial_path(sha).write_bytes(data)  # killed after downloading, before commit
    path = await make_fetcher().fetch(server.url("/a.wasm"), sha)
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == ["bytes=10000-"]
    assert_only_committed(store, sha)


async def test_complete_partial_with_known_size_needs_no_request(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(10_000)
    store.partial_path(sha).write_bytes(data)
    path = await make_fetcher().fetch(server.url("/a.wasm"), sha, len(data))
    assert path.read_bytes() == data
    assert server.requests == []
    assert_only_committed(store, sha)


# -- stall and cancellation ---------------------------------------------------------------


@pytest.mark.parametrize("stall_after", [0, 40_000])
async def test_stall_is_aborted(
    server: ArtifactServer,
    store: ArtifactStore,
    make_fetcher: Callable[..., Fetcher],
    stall_after: int,
) -> None:
    data, sha = blob(100_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(stall_after=stall_after, stall_for=30))
    fetcher = make_fetcher(stall_timeout=0.3, read_timeout=10.0, retries=0)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"stalled: no data for 0\.3 s") as info:
        await fetcher.fetch(server.url("/a.wasm"), sha)
    assert time.monotonic() - started < 5  # far below read_timeout and the server's 30 s
    assert f"after {stall_after} of 100000 bytes" in str(info.value)
    assert info.value.retryable
    part = store.partial_path(sha)
    assert part.read_bytes() == data[:stall_after]


async def test_stall_is_retried_and_resumed(
    server: ArtifactServer, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(200_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(stall_after=65_536, times=1))
    path = await make_fetcher(stall_timeout=0.3, retries=1).fetch(server.url("/a.wasm"), sha)
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == [None, "bytes=65536-"]
    assert_only_committed(store, sha)


async def test_silent_server_is_aborted_by_read_timeout(
    server: ArtifactServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(1000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(header_delay=30))
    fetcher = make_fetcher(read_timeout=0.3, stall_timeout=10.0, retries=0)
    with pytest.raises(DownloadError, match="timed out"):
        await fetcher.fetch(server.url("/a.wasm"), sha)


@pytest.mark.parametrize("fault", [Fault(stall_after=100_000), Fault(chunk_delay=0.03)])
async def test_cancellation_keeps_a_consistent_resumable_partial(
    server: ArtifactServer,
    store: ArtifactStore,
    make_fetcher: Callable[..., Fetcher],
    fault: Fault,
) -> None:
    data, sha = blob(400_000)
    server.add("/a.wasm", data)
    server.set_fault("/a.wasm", Fault(**{**fault.__dict__, "times": 1}))
    fetcher = make_fetcher(stall_timeout=10.0)
    part = store.partial_path(sha)
    task = asyncio.create_task(fetcher.fetch(server.url("/a.wasm"), sha, len(data)))
    await wait_until(lambda: part.exists() and part.stat().st_size >= 100_000)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    kept = part.read_bytes()
    assert len(kept) >= 100_000
    assert kept == data[: len(kept)]  # only whole, in-order chunks
    assert not store.has(sha)
    path = await fetcher.fetch(server.url("/a.wasm"), sha, len(data))
    assert path.read_bytes() == data
    assert ranges(server, "/a.wasm") == [None, f"bytes={len(kept)}-"]
    assert_only_committed(store, sha)


# -- file:// ------------------------------------------------------------------------------


async def test_file_url(
    tmp_path: Path, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(3 * 1024 * 1024 + 17)  # several copy chunks
    source = tmp_path / "my flow.wasm"
    source.write_bytes(data)
    calls: list[tuple[int, int | None]] = []
    path = await make_fetcher().fetch(
        source.as_uri(), sha, len(data), lambda d, t: calls.append((d, t))
    )
    assert path.read_bytes() == data
    assert source.exists()  # copied, not moved
    assert calls[-1] == (len(data), len(data))
    assert_only_committed(store, sha)


async def test_file_url_missing(tmp_path: Path, make_fetcher: Callable[..., Fetcher]) -> None:
    _, sha = blob(10)
    with pytest.raises(ArtifactError, match="not found") as info:
        await make_fetcher().fetch((tmp_path / "nope.wasm").as_uri(), sha)
    assert not isinstance(info.value, DownloadError)


async def test_file_url_directory_and_remote_host(
    tmp_path: Path, make_fetcher: Callable[..., Fetcher]
) -> None:
    _, sha = blob(10)
    fetcher = make_fetcher()
    with pytest.raises(ArtifactError, match="not a regular file"):
        await fetcher.fetch(tmp_path.as_uri(), sha)
    with pytest.raises(ArtifactError, match="remote host"):
        await fetcher.fetch("file://fileserver/share/a.wasm", sha)


async def test_file_url_too_large_and_mismatch(
    tmp_path: Path, store: ArtifactStore, make_fetcher: Callable[..., Fetcher]
) -> None:
    data, sha = blob(5000)
    source = tmp_path / "a.wasm"
    source.write_bytes(data)
    with pytest.raises(ArtifactTooLarge):
        await make_fetcher(max_size=4000).fetch(source.as_uri(), sha)
    _, other_sha = blob(5000, seed=7)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        await make_fetcher().fetch(source.as_uri(), other_sha)
    assert_only_committed(store)


# -- mqtt: --------------------------------------------------------------------------------


class FakeMqtt:
    """Stands in for the MQTT layer's retained-message fetch."""

    def __init__(self, payloads: dict[str, bytes]) -> None:
        self.payloads = payloads
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, topic: str, timeout: float) -> bytes:
        self.calls.append((topic, timeout))
        await asyncio.sleep(0)
        if topic not in self.payloads:
            raise TimeoutError
        return self.payloads[topic]


async def test_mqtt_url(store: ArtifactStore, make_fetcher: Callable[..., Fetcher]) -> None:
    data, sha = blob(4000)
    mqtt = FakeMqtt({f"edge/artifacts/{sha}": data})
    fetcher = make_fetcher(mqtt_fetch=mqtt, read_timeout=7.0)
    calls: list[tuple[int, int | None]] = []
    path = await fetcher.fetch(
        f"mqtt:edge/artifacts/{sha}", sha, len(data), lambda d, t: calls.append((d, t))
    )
    assert path.read_bytes() == data
    assert mqtt.calls == [(f"edge/artifacts/{sha}", 7.0)]
    assert calls == [(len(data), len(data))]
    assert_only_committed(store, sha)
    # Second time: from the store, MQTT is not asked.
    await fetcher.fetch(f"mqtt:edge/artifacts/{sha}", sha)
    assert len(mqtt.calls) == 1


async def test_mqtt_failures(store: ArtifactStore, make_fetcher: Callable[..., Fetcher]) -> None:
    data, sha = blob(4000)
    _, other_sha = blob(4000, seed=3)
    with pytest.raises(ArtifactError, match="MQTT artifact delivery is off"):
        await make_fetcher().fetch("mqtt:t", sha)
    mqtt = FakeMqtt({"t": data})
    fetcher = make_fetcher(mqtt_fetch=mqtt)
    with pytest.raises(DownloadError, match="no artifact arrived on MQTT topic other"):
        await fetcher.fetch("mqtt:other", sha)
    with pytest.raises(IntegrityError, match="sha256 mismatch for mqtt:t"):
        await fetcher.fetch("mqtt:t", other_sha)
    with pytest.raises(ArtifactTooLarge):
        await make_fetcher(mqtt_fetch=mqtt, max_size=1000).fetch("mqtt:t", sha)
    with pytest.raises(ArtifactError, match="plain topic"):
        await fetcher.fetch("mqtt:edge/#", sha)
    assert_only_committed(store)


# -- argument checks ----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://h/a.wasm", "gopher:x", "/local/path.wasm", "http:/x"])
async def test_unsupported_scheme(
    url: str, server: ArtifactServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    _, sha = blob(10)
    with pytest.raises(ArtifactError, match="unsupported artifact URL scheme") as info:
        await make_fetcher().fetch(url, sha)
    assert not isinstance(info.value, DownloadError)


async def test_http_url_without_host_is_refused(make_fetcher: Callable[..., Fetcher]) -> None:
    _, sha = blob(10)
    with pytest.raises(ArtifactError, match="invalid artifact URL") as info:
        await make_fetcher().fetch("http:///x.wasm", sha)
    assert not isinstance(info.value, DownloadError)


async def test_invalid_sha256_is_refused(make_fetcher: Callable[..., Fetcher]) -> None:
    with pytest.raises(ArtifactError, match="invalid sha256"):
        await make_fetcher().fetch("http://127.0.0.1:1/a.wasm", "../../etc/passwd")


async def test_closed_fetcher_refuses(make_fetcher: Callable[..., Fetcher]) -> None:
    fetcher = make_fetcher()
    await fetcher.aclose()
    _, sha = blob(10)
    with pytest.raises(ArtifactError, match="closed"):
        await fetcher.fetch("http://127.0.0.1:1/a.wasm", sha)


# -- TLS only when an https:// artifact needs it (issue 14) -------------------------------


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An https server on 127.0.0.1 with a self-signed certificate serving ``tmp_path``;
    (its port, its certificate)."""
    import datetime
    import functools
    import http.server
    import ipaddress
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_a: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path))
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], cert_path
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_a_plain_http_download_sets_up_no_tls(
    server: ArtifactServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    """httpx would parse the whole CA bundle (~3 MiB kept) for a client that only ever
    speaks plain http; the fetcher's transport sets TLS up at the first https URL."""
    from agent.device.artifacts._http_source import _TlsWhenNeeded

    data, sha = blob(1000)
    server.add("/plain.wasm", data)
    fetcher = make_fetcher()
    await fetcher.fetch(server.url("/plain.wasm"), sha)
    assert fetcher._http is not None
    assert fetcher._http._client is not None
    transport = fetcher._http._client._transport
    assert isinstance(transport, _TlsWhenNeeded)
    assert transport._plain is not None
    assert transport._tls is None


async def test_https_downloads_still_verify_the_server(
    https_server: tuple[int, Path],
    make_fetcher: Callable[..., Fetcher],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A server whose certificate is not trusted is refused; trusted (SSL_CERT_FILE,
    as httpx reads it), the same download succeeds."""
    port, cert = https_server
    data, sha = blob(1000, seed=3)
    (tmp_path / "tls.wasm").write_bytes(data)
    url = f"https://127.0.0.1:{port}/tls.wasm"
    import certifi

    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", certifi.where())  # public CAs only
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
        await make_fetcher(retries=0).fetch(url, sha)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    path = await make_fetcher(retries=0).fetch(url, sha)
    assert path.read_bytes() == data

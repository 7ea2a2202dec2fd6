"""A real HTTP server for artifact downloads in tests, with fault injection.

:class:`ArtifactServer` runs ``http.server.ThreadingHTTPServer`` on 127.0.0.1 with an
ephemeral port in a background thread. It serves blobs registered with
:meth:`ArtifactServer.add` (GET and HEAD, single ``Range: bytes=`` ranges with 206 /
416), records every request, and misbehaves on demand per path through a
:class:`Fault` (error status for the first K requests, stall, dropped connection,
ignored Range, lying or missing Content-Length, chunked encoding, trickling).

Usage::

    with ArtifactServer() as server:
        server.add("/a.wasm", data)
        server.set_fault("/a.wasm", Fault(status=503, times=2))
        url = server.url("/a.wasm")
        ...
        assert server.requests_for("/a.wasm")[-1].range == "bytes=4096-"

Every wait inside the server is interruptible: :meth:`ArtifactServer.stop` wakes
stalled handlers and shuts open connections, so shutdown takes milliseconds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from types import TracebackType

_CHUNK = 16 * 1024


@dataclass(frozen=True)
class Fault:
    """How to misbehave on one path. Fields combine; unset fields mean "behave".

    ``times``: the fault applies to the first ``times`` requests of the path after
    :meth:`ArtifactServer.set_fault` (None: to every request); later requests are
    served normally.
    """

    times: int | None = None
    #: Wait this long (or until the server stops) before answering at all.
    header_delay: float = 0.0
    #: Answer with this status (and a short text body) instead of the blob.
    status: int | None = None
    #: Retry-After header (seconds) to send with ``status``.
    retry_after: int | None = None
    #: Send the headers and this many body bytes, then go silent for ``stall_for`` s
    #: (or until the server stops), then close the connection.
    stall_after: int | None = None
    stall_for: float = 60.0
    #: Send this many body bytes, then close the connection.
    drop_after: int | None = None
    #: Ignore Range headers: always answer 200 with the whole blob.
    ignore_range: bool = False
    #: Advertise this Content-Length instead of the true one (the true body is sent).
    content_length: int | None = None
    #: Send no Content-Length; the body ends when the connection closes.
    omit_length: bool = False
    #: Use ``Transfer-Encoding: chunked`` (no Content-Length).
    chunked: bool = False
    #: Sleep this long before each 16 KiB piece of the body (a slow link).
    chunk_delay: float = 0.0
    #: Extra response headers.
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str  # without the query string
    target: str  # as sent, query included
    range: str | None  # the Range header, e.g. "bytes=4096-"
    headers: dict[str, str] = field(default_factory=dict)
    fault: Fault | None = None  # the fault applied to it, if any


@dataclass
class _Blob:
    data: bytes
    content_type: str


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: ArtifactServer

    def __init__(self, owner: ArtifactServer) -> None:
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._handler_threads: set[threading.Thread] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._connections.add(request)
        thread = threading.Thread(
            target=self._run_handler, args=(request, client_address), daemon=True
        )
        with self._conn_lock:
            self._handler_threads.add(thread)
        thread.start()

    def _run_handler(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._connections.discard(request)
                self._handler_threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hang up on purpose in these tests (aborted downloads); stay quiet.
        pass

    def close_connections(self, timeout: float) -> None:
        with self._conn_lock:
            connections = list(self._connections)
            threads = list(self._handler_threads)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ArtifactServer/1"
    timeout = 30  # idle keep-alive connections do not hold a thread forever
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    # -- serving ------------------------------------------------------------------------

    def _serve(self, *, head: bool) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        range_header = self.headers.get("Range")
        blob, fault = owner._begin(
            RecordedRequest(
                method=self.command,
                path=path,
                target=self.path,
                range=range_header,
                headers=dict(self.headers.items()),
            )
        )
        if fault is not None and fault.header_delay and owner._stopping.wait(fault.header_delay):
            self.close_connection = True
            return
        if fault is not None and fault.status is not None:
            extra = [("Retry-After", str(fault.retry_after))] if fault.retry_after else []
            self._send_simple(fault.status, extra + list(fault.headers), head=head)
            return
        if blob is None:
            self._send_simple(404, [], head=head)
            return
        data = blob.data
        status = 200
        extra_headers: list[tuple[str, str]] = [("Accept-Ranges", "bytes")]
        if range_header is not None and not (fault and fault.ignore_range):
            parsed = _parse_range(range_header, len(data))
            if parsed == "unsatisfiable":
                self._send_simple(
                    416, [("Content-Range", f"bytes */{len(data)}")], head=head, body=b""
                )
                return
            if parsed is not None:
                start, end = parsed
                status = 206
                extra_headers.append(("Content-Range", f"bytes {start}-{end}/{len(data)}"))
                data = data[start : end + 1]
        self._send_body(status, data, blob.content_type, extra_headers, fault, head=head)

    def _send_simple(
        self,
        status: int,
        headers: list[tuple[str, str]],
        *,
        head: bool,
        body: bytes | None = None,
    ) -> None:
        if body is None:
            body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_body(
        self,
        status: int,
        data: bytes,
        content_type: str,
        headers: list[tuple[str, str]],
        fault: Fault | None,
        *,
        head: bool,
    ) -> None:
        fault = fault or Fault()
        chunked = fault.chunked
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not fault.omit_length:
            length = fault.content_length if fault.content_length is not None else len(data)
            self.send_header("Content-Length", str(length))
        messes_framing = (
            fault.omit_length
            or fault.content_length is not None
            or fault.drop_after is not None
            or fault.stall_after is not None
        )
        if messes_framing:
            self.send_header("Connection", "close")
            self.close_connection = True
        for name, value in [*headers, *fault.headers]:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()
        if head:
            return
        limit = len(data)
        for cut in (fault.drop_after, fault.stall_after):
            if cut is not None:
                limit = min(limit, cut)
        stopping = self.server.owner._stopping
        sent = 0
        while sent < limit:
            if fault.chunk_delay and stopping.wait(fault.chunk_delay):
                return
            piece = data[sent : min(limit, sent + _CHUNK)]
            self._write_piece(piece, chunked=chunked)
            sent += len(piece)
        if fault.stall_after is not None and fault.stall_after <= len(data):
            stopping.wait(fault.stall_for)
            return
        if fault.drop_after is not None and fault.drop_after < len(data):
            return  # close_connection is set: the socket closes mid-body
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_piece(self, piece: bytes, *, chunked: bool) -> None:
        if chunked:
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        else:
            self.wfile.write(piece)
        self.wfile.flush()


def _parse_range(header: str, length: int) -> tuple[int, int] | str | None:
    """A single ``bytes=`` range as (start, end inclusive), "unsatisfiable", or None
    (malformed or multiple ranges: serve the whole blob, as RFC 9110 allows)."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":  # suffix range: the last N bytes
            count = int(last)
            if count <= 0:
                return "unsatisfiable"
            return max(0, length - count), length - 1
        start = int(first)
        end = int(last) if last else length - 1
    except ValueError:
        return None
    if start >= length:
        return "unsatisfiable"
    if end < start:
        return None
    return start, min(end, length - 1)


class ArtifactServer:
    """Threaded HTTP server on 127.0.0.1 serving blobs with per-path fault injection.

    A context manager (``with ArtifactServer() as server``); :meth:`start` and
    :meth:`stop` do the same explicitly. Thread-safe: tests may change blobs and
    faults while requests are in flight.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, _Blob] = {}
        self._faults: dict[str, Fault] = {}
        self._fault_hits: dict[str, int] = {}
        self._requests: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("ArtifactServer already started")
        self._stopping.clear()
        self._httpd = _Server(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="artifact-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.close_connections(timeout=5.0)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("ArtifactServer is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (a leading "/" is added if missing)."""
        return f"{self.base_url}/{path.lstrip('/')}"

    # -- content and faults -------------------------------------------------------------

    def add(self, path: str, data: bytes, *, content_type: str = "application/wasm") -> None:
        """Serve ``data`` at ``path`` (replacing what was there)."""
        with self._lock:
            self._blobs[_norm(path)] = _Blob(bytes(data), content_type)

    def remove(self, path: str) -> None:
        with self._lock:
            self._blobs.pop(_norm(path), None)

    def set_fault(self, path: str, fault: Fault | None = None, **fields: Any) -> None:
        """Misbehave on ``path``: pass a :class:`Fault`, or its fields as keywords.

        Resets the path's ``times`` counter. ``set_fault(path, None)`` clears it.
        """
        if fault is not None and fields:
            raise TypeError("pass a Fault or keyword fields, not both")
        if fault is None and fields:
            fault = Fault(**fields)
        with self._lock:
            key = _norm(path)
            self._fault_hits[key] = 0
            if fault is None:
                self._faults.pop(key, None)
            else:
                self._faults[key] = fault

    def clear_fault(self, path: str) -> None:
        self.set_fault(path, None)

    # -- request log --------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str) -> list[RecordedRequest]:
        key = _norm(path)
        return [r for r in self.requests if r.path == key]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- called by the handler ----------------------------------------------------------

    def _begin(self, request: RecordedRequest) -> tuple[_Blob | None, Fault | None]:
        with self._lock:
            blob = self._blobs.get(request.path)
            fault = self._faults.get(request.path)
            if fault is not None:
                hits = self._fault_hits.get(request.path, 0)
                if fault.times is not None and hits >= fault.times:
                    fault = None
                else:
                    self._fault_hits[request.path] = hits + 1
            self._requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.path,
                    target=request.target,
                    range=request.range,
                    headers=request.headers,
                    fault=fault,
                )
            )
            return blob, fault


def _norm(path: str) -> str:
    return "/" + urlsplit(path).path.lstrip("/")

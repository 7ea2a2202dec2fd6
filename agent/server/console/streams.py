"""Live pages' server-sent event streams: how many may be open, and their framing.

Each open stream reads the database once a second on a worker thread, so their
number is bounded twice: per session (a person's tabs) and per server process
(everyone's: AnyIO's worker pool, which every other route shares, has 40 threads).
A slot is taken before the response starts and given back however it ends (the
browser gone, the server stopping, or the body never started at all).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterable

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from agent.server.errors import ApiError

#: Streams one session may have open at once.
PER_SESSION = 4
#: Streams one server process serves at once.
PER_PROCESS = 32


class TooManyStreams(ApiError):
    status = 429
    type = "TooManyRequests"


class Slots:
    """Open streams, counted per session and in all."""

    def __init__(self, per_session: int = PER_SESSION, per_process: int = PER_PROCESS) -> None:
        self.per_session = per_session
        self.per_process = per_process
        self._lock = threading.Lock()
        self._by_session: dict[str, int] = {}
        self._total = 0

    def take(self, session: str) -> None:
        """One more stream for ``session``, or :class:`TooManyStreams` (429)."""
        with self._lock:
            if self._by_session.get(session, 0) >= self.per_session:
                raise TooManyStreams(f"at most {self.per_session} live pages per session")
            if self._total >= self.per_process:
                raise TooManyStreams("too many live pages open on this server: try again soon")
            self._by_session[session] = self._by_session.get(session, 0) + 1
            self._total += 1

    def give_back(self, session: str) -> None:
        with self._lock:
            left = self._by_session.get(session, 0) - 1
            if left > 0:
                self._by_session[session] = left
            else:
                self._by_session.pop(session, None)
            self._total = max(0, self._total - 1)

    def open(self, session: str | None = None) -> int:
        """Streams open for ``session``, or in all."""
        with self._lock:
            return self._total if session is None else self._by_session.get(session, 0)


class SlotResponse(StreamingResponse):
    """A ``text/event-stream`` response holding a slot of ``slots`` until it ends."""

    def __init__(self, content: AsyncIterable[str], slots: Slots, session: str) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
        )
        self._slots = slots
        self._session = session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slots.give_back(self._session)


def event(name: str, html: str) -> str:
    """One server-sent event: a line per line of the fragment, so none can end it early."""
    lines = "".join(f"data: {line}\n" for line in html.splitlines() or [""])
    return f"event: {name}\n{lines}\n"

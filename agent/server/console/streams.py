"""Live pages' server-sent event streams: how many may be open, and their framing.

Each open stream holds a connection and reads the database once a second (on a
worker thread, for the moment of the read), so their number is bounded three ways:
per session (a person's tabs), per application (so that one tenant, however many
sessions it opens, cannot take every stream of the server from the others) and per
server process. A slot is taken before the response starts and given back however
it ends (the browser gone, the server stopping, or the body never started at all).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterable

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from agent.server.errors import ApiError

#: Streams one session may have open at once.
PER_SESSION = 4
#: Streams the sessions of one application may have open at once.
PER_APPLICATION = 16
#: Streams one server process serves at once.
PER_PROCESS = 64


class TooManyStreams(ApiError):
    status = 429
    type = "TooManyRequests"


class Slots:
    """Open streams, counted per session, per application and in all."""

    def __init__(
        self,
        per_session: int = PER_SESSION,
        per_application: int = PER_APPLICATION,
        per_process: int = PER_PROCESS,
    ) -> None:
        self.per_session = per_session
        self.per_application = per_application
        self.per_process = per_process
        self._lock = threading.Lock()
        self._sessions: Counter[str] = Counter()
        self._applications: Counter[str] = Counter()
        self._total = 0

    def take(self, session: str, application: str) -> None:
        """One more stream for ``session`` of ``application``, or
        :class:`TooManyStreams` (429)."""
        with self._lock:
            if self._sessions[session] >= self.per_session:
                raise TooManyStreams(f"at most {self.per_session} live pages per session")
            if self._applications[application] >= self.per_application:
                raise TooManyStreams(
                    f"at most {self.per_application} live pages per application: "
                    "close some, or try again soon"
                )
            if self._total >= self.per_process:
                raise TooManyStreams("too many live pages open on this server: try again soon")
            self._sessions[session] += 1
            self._applications[application] += 1
            self._total += 1

    def give_back(self, session: str, application: str) -> None:
        with self._lock:
            for counts, key in ((self._sessions, session), (self._applications, application)):
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]
            self._total = max(0, self._total - 1)

    def open(self, session: str | None = None, application: str | None = None) -> int:
        """Streams open for ``session``, or ``application``, or in all."""
        with self._lock:
            if session is not None:
                return self._sessions[session]
            if application is not None:
                return self._applications[application]
            return self._total


class SlotResponse(StreamingResponse):
    """A ``text/event-stream`` response holding a slot of ``slots`` until it ends."""

    def __init__(
        self, content: AsyncIterable[str], slots: Slots, session: str, application: str
    ) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
        )
        self._slots = slots
        self._held = (session, application)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slots.give_back(*self._held)


def event(name: str, html: str) -> str:
    """One server-sent event: a line per line of the fragment, so none can end it early."""
    lines = "".join(f"data: {line}\n" for line in html.splitlines() or [""])
    return f"event: {name}\n{lines}\n"

"""Hand work from other threads to the event loop, one loop wake-up per batch.

``loop.call_soon_threadsafe`` writes one byte to the loop's self-pipe per call. A
thread that posts per message (paho's network thread, wasm workers publishing) then
costs a syscall per message, and while the loop is busy the bytes pile up: a Unix
socket holds only a few hundred one-byte writes, and once it is full the loop's
signal wake-up fd (the same socket) drops signals. :class:`Handoff` queues calls
and wakes the loop only when the queue goes from empty to non-empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("agent.handoff")


class Handoff:
    """``post(fn, *args)`` from any thread; ``fn(*args)`` runs on ``loop``, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._scheduled = False
        #: How many times the loop was woken (for tests and benchmarks).
        self.wakeups = 0

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            self._calls.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        if self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed in between: nothing will run them
            with self._lock:
                self._scheduled = False

    def _drain(self) -> None:
        self.wakeups += 1
        with self._lock:
            calls = list(self._calls)
            self._calls.clear()
            self._scheduled = False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:
                log.exception("callback from another thread failed", callback=repr(fn))


def post_or_drop(handoff: Handoff | None, fn: Callable[..., Any], *args: Any) -> None:
    """``handoff.post`` when there is a loop to run it; during shutdown, nothing."""
    if handoff is not None:
        with contextlib.suppress(RuntimeError):
            handoff.post(fn, *args)

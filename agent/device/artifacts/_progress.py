"""The caller's progress callback and the reporter that rate-limits it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

#: Progress callback: ``(bytes_done, total or None)``; called at most every 0.25 s
#: while data flows, plus once at the end with ``(size, size)``. Must not block.
Progress = Callable[[int, int | None], None]

_PROGRESS_INTERVAL = 0.25  # seconds between two progress callbacks


class ProgressReporter:
    """Rate-limits the caller's progress callback; a failing callback is logged, not raised."""

    def __init__(self, callback: Progress | None, total: int | None) -> None:
        self._callback = callback
        self.total = total
        self._last = float("-inf")
        self._broken = False

    def update(self, done: int) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._last >= _PROGRESS_INTERVAL:
            self._last = now
            self._call(done, self.total)

    def finish(self, done: int) -> None:
        self._call(done, done)

    def _call(self, done: int, total: int | None) -> None:
        if self._callback is None or self._broken:
            return
        try:
            self._callback(done, total)
        except Exception:  # a broken UI callback must not fail the download
            self._broken = True
            log.exception("artifact_progress_callback_failed")

"""Sliding-window publish pacing (Losant: 30 messages / 15 s per topic, 300 per connection).

Messages are queued and released when both windows allow, in order within each
topic (MQTT's ordering guarantee); another topic's message may pass one that waits
for its topic's window. Nothing is dropped for pacing (the queue is bounded; past
it the oldest waiting message goes, counted). The window arithmetic is a pure class
with an injectable clock, so it is tested without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("agent.device.pacer")


@dataclass(frozen=True)
class PaceLimits:
    window_s: float = 15.0
    per_topic: int = 30
    per_connection: int = 300
    queue: int = 10_000


class Windows:
    """Which sends the sliding windows allow now, and when the next one may go."""

    def __init__(self, limits: PaceLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._all: deque[float] = deque()
        self._topic: dict[str, deque[float]] = defaultdict(deque)

    def _trim(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.limits.window_s:
            q.popleft()

    def wait_for(self, topic: str) -> float:
        """Seconds until ``topic`` may be sent (0 = now)."""
        now = self.clock()
        lim = self.limits
        self._trim(self._all, now)
        per = self._topic[topic]
        self._trim(per, now)
        waits = [0.0]
        if len(self._all) >= lim.per_connection:
            waits.append(self._all[0] + lim.window_s - now)
        if len(per) >= lim.per_topic:
            waits.append(per[0] + lim.window_s - now)
        return max(waits)

    def sent(self, topic: str) -> None:
        now = self.clock()
        self._all.append(now)
        self._topic[topic].append(now)


@dataclass
class _Item:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any
    future: asyncio.Future[None]


class Pacer:
    """FIFO publisher that respects :class:`PaceLimits` (one task, :meth:`run`)."""

    def __init__(
        self, publish: Callable[..., asyncio.Future[None]], limits: PaceLimits | None = None
    ) -> None:
        self._publish = publish
        self.limits = limits or PaceLimits()
        self.windows = Windows(self.limits)
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self.dropped = 0
        self.delayed = 0

    def set_limits(self, limits: PaceLimits) -> None:
        """New limits (a reload); the windows keep what was sent."""
        self.limits = limits
        self.windows.limits = limits

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Any = None,
    ) -> asyncio.Future[None]:
        """Queue a message; the future resolves when it was published (and acked)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self._queue) >= self.limits.queue:
            old = self._queue.popleft()
            old.future.cancel()
            self.dropped += 1
        self._queue.append(_Item(topic, payload, qos, retain, properties, fut))
        self._wake.set()
        return fut

    def _next(self) -> tuple[_Item | None, float]:
        """The first queued message that may go now, keeping order within each topic
        (a chatty topic waiting for its window must not hold up the others); else how
        long until one may."""
        blocked: set[str] = set()
        soonest = float("inf")
        for item in self._queue:
            if item.topic in blocked:
                continue
            wait = self.windows.wait_for(item.topic)
            if wait <= 0:
                return item, 0.0
            blocked.add(item.topic)
            soonest = min(soonest, wait)
        return None, soonest

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            item, wait = self._next()
            if item is None:
                self.delayed += 1
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            self._queue.remove(item)
            self.windows.sent(item.topic)
            try:
                inner = self._publish(
                    item.topic,
                    item.payload,
                    qos=item.qos,
                    retain=item.retain,
                    properties=item.properties,
                )
            except (RuntimeError, ValueError) as exc:
                log.warning("paced message refused", topic=item.topic, error=str(exc))
                item.future.set_result(None)
                continue
            _chain(inner, item.future)


def _chain(src: asyncio.Future[None], dst: asyncio.Future[None]) -> None:
    def done(f: asyncio.Future[None]) -> None:
        if dst.done():
            return
        if f.cancelled():
            dst.cancel()
        elif f.exception() is not None:
            dst.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            dst.set_result(None)

    src.add_done_callback(done)

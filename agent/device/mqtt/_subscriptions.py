"""The topics a session holds, the SUBACKs that answer them, and the waiters of
:meth:`~agent.device.mqtt.MqttSession.fetch_retained`.

- Subscriptions are made again on every connect: a broker without persistence
  forgets them.
- A broker can refuse a subscription for a while (an ACL not yet loaded, a clustered
  broker failing over): it is asked for again, with backoff, without reconnecting.
- A fetch of a topic the session holds anyway (its command topic, a flow's trigger)
  takes a copy of the next message; only a subscription made for the fetch alone
  keeps its messages from the session's queue.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as paho
import structlog

from agent.device.mqtt._netloop import backoff_delay

log = structlog.get_logger("agent.device.mqtt")


@dataclass
class _Sub:
    qos: int
    waiters: list[asyncio.Future[bytes]] = field(default_factory=list)
    #: Made only for a :meth:`MqttSession.fetch_retained`: its messages go to the
    #: waiters alone. A subscription the agent holds anyway (its command topic, a
    #: flow's trigger) still delivers every message to the queue as well.
    fetch_only: bool = False
    #: Refusals in a row (SUBACK failure codes): the retry backs off with them.
    refusals: int = 0
    retry: asyncio.TimerHandle | None = None


class Subscriptions:
    """The subscription registry of one session (kept across its reconnects and
    reconfigures).

    The event loop owns it. The network thread only sends SUBSCRIBE for every topic
    after a connect (:meth:`send_all`) and looks SUBACKs up (:meth:`topic_of`); the
    message ids of SUBSCRIBEs in flight are shared under a lock. ``resend(topic, qos)``
    (event loop) subscribes again now if the session is connected: the retry after a
    refusal.
    """

    def __init__(self, rng: random.Random, resend: Callable[[str, int], None]) -> None:
        self._subs: dict[str, _Sub] = {}
        self._lock = threading.Lock()
        self._mids: dict[int, str] = {}
        self._rng = rng
        self._resend = resend

    def __contains__(self, topic: object) -> bool:
        return topic in self._subs

    # ------------------------------------------ network thread (and event loop)
    def send(self, client: paho.Client, topic: str, qos: int) -> None:
        """SUBSCRIBE, remembering the topic by message id to read the SUBACK."""
        with self._lock:
            _rc, mid = client.subscribe(topic, qos=qos)
            if mid is not None:
                self._mids[mid] = topic

    def send_all(self, client: paho.Client) -> None:
        for topic, sub in list(self._subs.items()):
            self.send(client, topic, sub.qos)

    def topic_of(self, mid: int) -> str | None:
        """The topic a SUBACK answers (None: no SUBSCRIBE of ours)."""
        with self._lock:
            return self._mids.pop(mid, None)

    # -------------------------------------------------------------- event loop
    def hold(self, topic: str, qos: int) -> None:
        if topic not in self._subs:
            self._subs[topic] = _Sub(qos)
        else:
            self._subs[topic].fetch_only = False  # held for its own sake now

    def drop(self, topic: str) -> bool:
        """Forget ``topic`` (its waiters are cancelled); whether it was held."""
        sub = self._subs.pop(topic, None)
        if sub is None:
            return False
        for waiter in sub.waiters:
            waiter.cancel()
        if sub.retry is not None:
            sub.retry.cancel()
        return True

    def add_waiter(self, topic: str, waiter: asyncio.Future[bytes], *, fetch_only: bool) -> None:
        """``waiter`` gets the next payload on ``topic`` (held already). ``fetch_only``:
        the subscription was made for this fetch."""
        sub = self._subs[topic]
        if fetch_only:
            sub.fetch_only = True
        sub.waiters.append(waiter)

    def fetch_only(self, topic: str) -> bool:
        """Whether ``topic`` is held for fetches alone (then the last one drops it)."""
        sub = self._subs.get(topic)
        return sub is not None and sub.fetch_only

    def fetched(self, topic: str, payload: bytes) -> bool:
        """Hand ``payload`` to the waiters of ``topic``; True when the message is theirs
        alone (a subscription made for a fetch), False when it goes to the queue too."""
        sub = self._subs.get(topic)
        if sub is None or not sub.waiters:
            return False
        waiters, sub.waiters = sub.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(payload)
        return sub.fetch_only

    def cancel_waiters(self) -> None:
        for sub in self._subs.values():
            for waiter in sub.waiters:
                waiter.cancel()

    def answered(self, topic: str, refusal: str | None) -> bool:
        """A SUBACK for ``topic``: None accepted it, else the broker's reason. Whether it
        is a refusal of a topic still held (then asked for again, with backoff)."""
        sub = self._subs.get(topic)
        if sub is None:
            return False
        if refusal is None:
            if sub.refusals:
                log.info("subscription accepted after refusals", topic=topic, refusals=sub.refusals)
            sub.refusals = 0
            return False
        # Without the subscription the agent would never hear its desired document or
        # commands: ask again, backing off.
        delay = backoff_delay(sub.refusals, 1.0, 60.0, self._rng)
        sub.refusals += 1
        log.warning(
            "mqtt subscription refused",
            topic=topic,
            reason=refusal,
            retry_in_s=round(delay, 1),
            refusals=sub.refusals,
        )
        if sub.retry is not None:
            sub.retry.cancel()
        loop = asyncio.get_running_loop()
        sub.retry = loop.call_later(delay, self._retry, topic)
        return True

    def _retry(self, topic: str) -> None:
        sub = self._subs.get(topic)
        if sub is None:
            return
        sub.retry = None
        self._resend(topic, sub.qos)

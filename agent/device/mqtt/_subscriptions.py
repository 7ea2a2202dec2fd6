"""The topics a session holds, the SUBACKs that answer them, and the waiters of
:meth:`~agent.device.mqtt.MqttSession.fetch_retained`.

- Subscriptions are made again on every connect: a broker without persistence
  forgets them.
- Whether a SUBSCRIBE goes out now or at the next connect is decided by the network
  thread's view of the connection, in one step with the registry (under its lock):
  the event loop hears of a connect only after the network thread has subscribed the
  held topics, and a topic added in between was once sent by neither.
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

    The event loop owns it. The network thread reports the connection
    (:meth:`connected`, which subscribes every held topic, and :meth:`disconnected`)
    and looks SUBACKs up (:meth:`topic_of`). The set of topics, whether the connection
    is up and the message ids of SUBSCRIBEs in flight are shared under a lock.
    ``resend(topic, qos)`` (event loop) subscribes again if the connection is up: the
    retry after a refusal.
    """

    def __init__(self, rng: random.Random, resend: Callable[[str, int], None]) -> None:
        self._subs: dict[str, _Sub] = {}
        self._lock = threading.Lock()
        self._mids: dict[int, str] = {}
        self._rng = rng
        self._resend = resend
        #: CONNACK accepted and no disconnect since, as the network thread sees it.
        self._online = False

    def __contains__(self, topic: object) -> bool:
        return topic in self._subs

    def __len__(self) -> int:
        return len(self._subs)

    @property
    def online(self) -> bool:
        """Whether SUBSCRIBE and UNSUBSCRIBE go out now (else: the next connect)."""
        return self._online

    # ------------------------------------------ network thread (and event loop)
    def send(self, client: paho.Client, topic: str, qos: int) -> None:
        """SUBSCRIBE, remembering the topic by message id to read the SUBACK."""
        with self._lock:
            _rc, mid = client.subscribe(topic, qos=qos)
            if mid is not None:
                self._mids[mid] = topic

    def connected(self, client: paho.Client) -> None:
        """The broker accepted the connection: subscribe every held topic."""
        with self._lock:
            self._online = True
            held = [(topic, sub.qos) for topic, sub in self._subs.items()]
        for topic, qos in held:
            self.send(client, topic, qos)

    def disconnected(self) -> None:
        with self._lock:
            self._online = False

    def topic_of(self, mid: int) -> str | None:
        """The topic a SUBACK answers (None: no SUBSCRIBE of ours)."""
        with self._lock:
            return self._mids.pop(mid, None)

    # -------------------------------------------------------------- event loop
    def hold(self, topic: str, qos: int) -> bool:
        """Hold ``topic``; whether to SUBSCRIBE now (else the next connect does)."""
        with self._lock:
            if topic not in self._subs:
                self._subs[topic] = _Sub(qos)
            else:
                self._subs[topic].fetch_only = False  # held for its own sake now
            return self._online

    def drop(self, topic: str) -> bool:
        """Forget ``topic`` (its waiters are cancelled); whether to UNSUBSCRIBE now."""
        with self._lock:
            sub = self._subs.pop(topic, None)
            online = self._online
        if sub is None:
            return False
        for waiter in sub.waiters:
            waiter.cancel()
        if sub.retry is not None:
            sub.retry.cancel()
        return online

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

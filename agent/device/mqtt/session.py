"""The MQTT session: the asyncio face of one paho client and its network thread.

Design (measured pitfalls are in the comments where they bite):

- paho runs on a network thread of its own (:mod:`agent.device.mqtt._netloop`), which
  connects, drives the socket and reconnects; it alone touches the socket.
- paho callbacks only copy data and hand it to the event loop through a
  :class:`~agent.device.runtime._handoff.Handoff` (one loop wake-up per batch, not per message);
  long work in a paho callback has deadlocked paho.
- ``publish()`` is called on the event loop thread: it only queues the packet and
  pokes the network thread. Its completion future is registered in the same
  synchronous step, before any ``on_publish`` the network thread might already have
  queued for that mid can run on the loop.
- QoS 1 messages published while offline stay in paho's queue and go out after the
  reconnect (paho answers "not connected" but keeps them), so that is not an error.
- Subscriptions are made again on every connect: a broker without persistence
  forgets them.
- A reconfigure builds a new client and network thread; subscriptions, callbacks and
  the last error carry over.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties

from agent.device.config import MqttConfig
from agent.device.mqtt._netloop import NetLoop, Problems, backoff_delay
from agent.device.mqtt.client import Will, build_client
from agent.device.runtime._handoff import Handoff, post_or_drop

log = structlog.get_logger("agent.device.mqtt")


@dataclass(frozen=True)
class Message:
    """An incoming message, copied out of paho on its network thread."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None


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


class MqttSession:
    """One MQTT connection with automatic reconnect, usable from asyncio.

    Use as ``async with MqttSession(...) as session:``. Incoming messages on topics
    subscribed with :meth:`subscribe` are put on :attr:`messages`. ``on_connect``
    callbacks run on the event loop after every successful connect.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        *,
        will: Will | None = None,
        on_connect: Iterable[Callable[[], None]] = (),
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = cfg
        self._client_id = client_id
        self._will = will
        self._on_connect_cbs = list(on_connect)
        self._on_disconnect_cbs: list[Callable[[], None]] = []
        self._rng = rng or random.Random()
        self._handoff: Handoff | None = None
        self._problems = Problems()
        self._subs: dict[str, _Sub] = {}
        self._sub_lock = threading.Lock()
        self._sub_mids: dict[int, str] = {}
        self._pending: dict[int, asyncio.Future[None]] = {}
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.connects = 0
        self._client, self._net = self._new_connection()

    # ----------------------------------------------------------------- set-up
    @property
    def protocol5(self) -> bool:
        return self._cfg.protocol == "5"

    @property
    def last_error(self) -> str | None:
        """The latest connection or subscription problem; None since the last connect."""
        return self._problems.last

    @last_error.setter
    def last_error(self, text: str | None) -> None:
        self._problems.last = text

    def _new_connection(self) -> tuple[paho.Client, NetLoop]:
        client = build_client(self._cfg, self._client_id, will=self._will)
        net = NetLoop(
            client,
            self._cfg,
            rng=self._rng,
            problems=self._problems,
            on_connected=self._on_connect,
            on_disconnected=self._on_disconnect,
        )
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client, net

    async def __aenter__(self) -> MqttSession:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        self._handoff = Handoff(asyncio.get_running_loop())
        self._net.start(f"mqtt-{self._client_id}")

    async def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and join the network thread."""
        await self._net.stop(timeout)
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        for sub in self._subs.values():
            for waiter in sub.waiters:
                waiter.cancel()
        self.connected.clear()

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        post_or_drop(self._handoff, fn, *args)

    # paho callbacks: network thread, keep them tiny.
    def _on_connect(self, client: paho.Client) -> None:
        for topic, sub in list(self._subs.items()):
            self._send_subscribe(client, topic, sub.qos)
        self._call(self._connected_on_loop)

    def _send_subscribe(self, client: paho.Client, topic: str, qos: int) -> None:
        """SUBSCRIBE, remembering the topic by message id to read the SUBACK."""
        with self._sub_lock:
            _rc, mid = client.subscribe(topic, qos=qos)
            if mid is not None:
                self._sub_mids[mid] = topic

    def _on_subscribe(
        self, _client: paho.Client, _ud: Any, mid: int, reasons: list[Any], _props: Any
    ) -> None:
        with self._sub_lock:
            topic = self._sub_mids.pop(mid, None)
        if topic is None:
            return
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        self._call(self._suback_on_loop, topic, str(refused[0]) if refused else None)

    def _on_disconnect(self) -> None:
        self._call(self._disconnected_on_loop)

    def _on_message(self, _client: paho.Client, _ud: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        self._call(
            self._deliver,
            Message(
                topic=msg.topic,
                payload=bytes(msg.payload),
                qos=msg.qos,
                retain=bool(msg.retain),
                response_topic=response_topic,
                correlation_data=correlation,
            ),
        )

    def _on_publish(
        self, _client: paho.Client, _ud: Any, mid: int, _reason: Any, _props: Any
    ) -> None:
        self._call(self._published, mid)

    # ------------------------------------------------------------ event loop
    def _connected_on_loop(self) -> None:
        self.connects += 1
        self.last_error = None
        self.connected.set()
        log.info("mqtt connected", broker=self._cfg.broker, connects=self.connects)
        for cb in self._on_connect_cbs:
            try:
                cb()
            except Exception:
                log.exception("on-connect callback failed")

    def _disconnected_on_loop(self) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            for cb in self._on_disconnect_cbs:
                try:
                    cb()
                except Exception:
                    log.exception("on-disconnect callback failed")

    def add_on_disconnect(self, cb: Callable[[], None]) -> None:
        self._on_disconnect_cbs.append(cb)

    def _deliver(self, msg: Message) -> None:
        sub = self._subs.get(msg.topic)
        if sub is not None and sub.waiters:
            waiters, sub.waiters = sub.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(msg.payload)
            if sub.fetch_only:
                return
        self.messages.put_nowait(msg)

    def _published(self, mid: int) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def add_on_connect(self, cb: Callable[[], None]) -> None:
        self._on_connect_cbs.append(cb)

    def _suback_on_loop(self, topic: str, refusal: str | None) -> None:
        sub = self._subs.get(topic)
        if sub is None:
            return
        if refusal is None:
            if sub.refusals:
                log.info("subscription accepted after refusals", topic=topic, refusals=sub.refusals)
            sub.refusals = 0
            return
        # A broker can refuse a subscription for a while (an ACL not yet loaded, a
        # clustered broker failing over): without it the agent would never hear its
        # desired document or commands, so it asks again, backing off.
        delay = backoff_delay(sub.refusals, 1.0, 60.0, self._rng)
        sub.refusals += 1
        text = f"broker {self._cfg.broker} refused the subscription to {topic}: {refusal}"
        self.last_error = text
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
        sub.retry = loop.call_later(delay, self._retry_subscribe, topic)

    def _retry_subscribe(self, topic: str) -> None:
        sub = self._subs.get(topic)
        if sub is None:
            return
        sub.retry = None
        if self.connected.is_set():
            self._send_subscribe(self._client, topic, sub.qos)
            self._net.poke()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and again after every reconnect; a refused
        subscription is asked for again, with backoff."""
        if topic not in self._subs:
            self._subs[topic] = _Sub(qos)
        else:
            self._subs[topic].fetch_only = False  # held for its own sake now
        if self.connected.is_set():
            self._send_subscribe(self._client, topic, qos)
            self._net.poke()

    def unsubscribe(self, topic: str) -> None:
        sub = self._subs.pop(topic, None)
        if sub is not None:
            for waiter in sub.waiters:
                waiter.cancel()
            if sub.retry is not None:
                sub.retry.cancel()
            if self.connected.is_set():
                self._client.unsubscribe(topic)
                self._net.poke()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> asyncio.Future[None]:
        """Queue a message; the future resolves when the broker acknowledged it (QoS 1).

        Offline QoS 1 messages stay queued and go out after the reconnect. Raises
        :class:`RuntimeError` only when paho's queue is full or the payload is refused.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        self._net.poke()
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish to {topic} refused: {paho.error_string(info.rc)}")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            fut.cancel()  # QoS 0 while offline is dropped by design
            return fut
        # Registered before control returns to the loop, so an on_publish already
        # queued by the network thread for this mid finds it.
        old = self._pending.pop(info.mid, None)
        if old is not None and not old.done():
            old.cancel()
        self._pending[info.mid] = fut
        return fut

    async def fetch_retained(self, topic: str, timeout: float) -> bytes:
        """Subscribe to ``topic``, return the first (retained) payload, unsubscribe."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        owned = topic not in self._subs
        if owned:
            self.subscribe(topic, qos=1)
            self._subs[topic].fetch_only = True
        self._subs[topic].waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            sub = self._subs.get(topic)
            if owned and sub is not None and sub.fetch_only:
                self.unsubscribe(topic)

    @property
    def cfg(self) -> MqttConfig:
        """The settings the session connects with."""
        return self._cfg

    @property
    def client_id(self) -> str:
        return self._client_id

    async def reconfigure(self, cfg: MqttConfig, client_id: str) -> None:
        """Reconnect with new settings (a config reload): subscriptions are kept and made
        again on the new connection; QoS 1 messages in flight are sent again by the
        outbox, which deletes nothing unacknowledged."""
        await self.stop()
        self._cfg = cfg
        self._client_id = client_id
        self._client, self._net = self._new_connection()
        self.start()

    def wake(self) -> None:
        """Cut a reconnect backoff short (used after configuration changes)."""
        self._net.wake()

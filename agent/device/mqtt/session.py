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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties

from agent.device.config import MqttConfig
from agent.device.mqtt._netloop import NetLoop, Problems
from agent.device.mqtt._subscriptions import Subscriptions
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
        self._subs = Subscriptions(self._rng, resend=self._resubscribe)
        self._pending: dict[int, asyncio.Future[None]] = {}
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.connected = asyncio.Event()
        #: Connected, and the broker has answered a SUBSCRIBE since (accepted or not):
        #: it serves this session. A clustered broker failing over can accept a
        #: connection long before it can store a retained message.
        self.established = asyncio.Event()
        self._on_established_cbs: list[Callable[[], None]] = []
        self.connects = 0
        self._client, self._net = self._new_connection()

    # ---------------------------------------------------------------- settings
    @property
    def cfg(self) -> MqttConfig:
        """The settings the session connects with."""
        return self._cfg

    @property
    def client_id(self) -> str:
        return self._client_id

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

    # --------------------------------------------------------------- lifecycle
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
        self._subs.cancel_waiters()
        self._subs.disconnected()  # also when stop() gave up waiting for the thread
        self.connected.clear()

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

    # -------------------------------------------------------- API (event loop)
    def add_on_connect(self, cb: Callable[[], None]) -> None:
        self._on_connect_cbs.append(cb)

    def add_on_disconnect(self, cb: Callable[[], None]) -> None:
        self._on_disconnect_cbs.append(cb)

    def add_on_established(self, cb: Callable[[], None]) -> None:
        """``cb`` runs on the event loop each time :attr:`established` is set."""
        self._on_established_cbs.append(cb)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and again after every reconnect; a refused
        subscription is asked for again, with backoff."""
        if self._subs.hold(topic, qos):
            self._subs.send(self._client, topic, qos)
            self._net.poke()

    def unsubscribe(self, topic: str) -> None:
        if self._subs.drop(topic):
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
        self._subs.add_waiter(topic, waiter, fetch_only=owned)
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            if owned and self._subs.fetch_only(topic):
                self.unsubscribe(topic)

    # --------------------------------------------------------------- internals
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

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        post_or_drop(self._handoff, fn, *args)

    def _resubscribe(self, topic: str, qos: int) -> None:
        """The registry's retry of a refused subscription (else the next connect)."""
        if self._subs.online:
            self._subs.send(self._client, topic, qos)
            self._net.poke()

    # ------------------------------------- network thread (keep these tiny)
    def _on_connect(self, client: paho.Client) -> None:
        """A CONNACK accepted the connection (see :class:`NetLoop`)."""
        self._subs.connected(client)
        self._call(self._connected_on_loop)

    def _on_disconnect(self) -> None:
        self._subs.disconnected()
        self._call(self._disconnected_on_loop)

    def _on_subscribe(
        self, _client: paho.Client, _ud: Any, mid: int, reasons: list[Any], _props: Any
    ) -> None:
        topic = self._subs.topic_of(mid)
        if topic is None:
            return
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        self._call(self._suback_on_loop, topic, str(refused[0]) if refused else None)

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
        _run_all(self._on_connect_cbs, "on-connect")
        if not len(self._subs):  # nothing to be answered: established at once
            self._established()

    def _established(self) -> None:
        if self.connected.is_set() and not self.established.is_set():
            self.established.set()
            _run_all(self._on_established_cbs, "on-established")

    def _disconnected_on_loop(self) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.established.clear()
        if was:
            for cb in self._on_disconnect_cbs:
                try:
                    cb()
                except Exception:
                    log.exception("on-disconnect callback failed")

    def _deliver(self, msg: Message) -> None:
        if not self._subs.fetched(msg.topic, msg.payload):
            self.messages.put_nowait(msg)

    def _published(self, mid: int) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _suback_on_loop(self, topic: str, refusal: str | None) -> None:
        self._established()
        if self._subs.answered(topic, refusal):
            text = f"broker {self._cfg.broker} refused the subscription to {topic}: {refusal}"
            self.last_error = text


def _run_all(callbacks: list[Callable[[], None]], what: str) -> None:
    for cb in callbacks:
        try:
            cb()
        except Exception:
            log.exception(f"{what} callback failed")

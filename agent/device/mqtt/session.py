"""The MQTT session: one paho-mqtt 2.x client, its network thread, and the asyncio bridge.

Design (measured pitfalls are in the comments where they bite):

- paho runs on one thread owned by this class (``mqtt-<client id>``). That thread
  connects (connect and TLS set-up block, so they never run on the event loop),
  drives the socket with :mod:`selectors` (epoll) and paho's ``loop_read`` /
  ``loop_write`` / ``loop_misc``, and reconnects with jittered, capped exponential
  backoff. Not ``client.loop()``: it uses ``select()``, which fails on a file
  descriptor >= 1024, and paho turns that into a silent "connection lost" forever
  (found with 500 simulated agents in one process; any busy process can get there).
- paho callbacks only copy data and hand it to the event loop through a
  :class:`~agent.device.runtime._handoff.Handoff` (one loop wake-up per batch, not per message);
  long work in a paho callback has deadlocked paho.
- Only the network thread touches the socket: a no-op ``on_socket_register_write``
  hook stops paho from writing on the publishing thread (see ``_make_client``); the
  thread that queued a packet pokes the network thread through a socketpair.
- ``publish()`` is called on the event loop thread. Its completion future is
  registered in the same synchronous step, before any ``on_publish`` the network
  thread might already have queued for that mid can run on the loop.
- QoS 1 messages published while offline stay in paho's queue and go out after the
  reconnect (paho answers "not connected" but keeps them), so that is not an error.
- max in-flight is kept at or below the broker's receive maximum (Mosquitto: 20),
  because paho ignores the value the broker advertises.
- Subscriptions are made again on every connect: a broker without persistence
  forgets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties

from agent.device.config import MqttConfig
from agent.device.mqtt.client import Will, build_client, connect, setup_tls
from agent.device.runtime._handoff import Handoff, post_or_drop

log = structlog.get_logger("agent.device.mqtt")
#: While the broker stays unreachable, a warning says so at most this often (s).
STILL_FAILING_EVERY_S = 60.0


def _ignore_socket(_client: paho.Client, _userdata: Any, _sock: Any) -> None:
    return None


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


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay before reconnect ``attempt`` (0-based): min(cap, base*2^n), jittered in [50%, 100%]."""
    ceiling = min(cap, base * float(1 << min(attempt, 30)))
    return ceiling * (0.5 + 0.5 * rng.random())


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handoff: Handoff | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        # The network thread's wake-up line (opened by start(), closed by stop()).
        self._poke_r: socket.socket | None = None
        self._poke_w: socket.socket | None = None
        self._subs: dict[str, _Sub] = {}
        self._sub_lock = threading.Lock()
        self._sub_mids: dict[int, str] = {}
        self._pending: dict[int, asyncio.Future[None]] = {}
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.connects = 0
        self.last_error: str | None = None
        self._error_repeats = 0
        self._still_failing_at = 0.0
        self._client = self._make_client()

    # ----------------------------------------------------------------- set-up
    @property
    def protocol5(self) -> bool:
        return self._cfg.protocol == "5"

    def _make_client(self) -> paho.Client:
        client = build_client(self._cfg, self._client_id, will=self._will)
        # Single writer: with our own network thread (not loop_start), paho would call
        # loop_write() from whichever thread publishes, racing the network thread on an
        # unlocked deque. Registering a write hook makes publish() only queue the packet
        # and wake the network thread, which does all socket I/O.
        client.on_socket_register_write = _ignore_socket
        client.on_socket_unregister_write = _ignore_socket
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    async def __aenter__(self) -> MqttSession:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handoff = Handoff(self._loop)
        self._poke_r, self._poke_w = socket.socketpair()
        self._poke_r.setblocking(False)
        self._poke_w.setblocking(False)
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self._client_id}", daemon=True
        )
        self._thread.start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and join the network thread."""
        self._stop.set()
        self._wake.set()
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._poke()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if not self._thread.is_alive():
                # paho closes its socket and wake-up socketpair only in __del__, whose
                # timing in a reference cycle is arbitrary: close them now.
                with contextlib.suppress(Exception):
                    self._client._reset_sockets()
                self._close_poke()
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        for sub in self._subs.values():
            for waiter in sub.waiters:
                waiter.cancel()
        self.connected.clear()

    # --------------------------------------------------------- network thread
    def _run(self) -> None:
        attempt = 0
        tls_ready = False
        while not self._stop.is_set():
            try:
                if self._cfg.tls and not tls_ready:
                    setup_tls(self._client, self._cfg)  # blocking: not on the event loop
                    tls_ready = True
                connect(self._client, self._cfg)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._note_error(f"cannot connect to {self._cfg.broker}: {exc}")
            else:
                self._loop_until_disconnected()
                if self._connected_once_in_this_round:
                    attempt = 0
            if self._stop.is_set():
                break
            delay = backoff_delay(
                attempt, self._cfg.reconnect_min, self._cfg.reconnect_max, self._rng
            )
            attempt += 1
            self._wake.wait(delay)
            self._wake.clear()

    _connected_once_in_this_round = False
    _connack_in_this_round = False

    def _loop_until_disconnected(self) -> None:
        self._connected_once_in_this_round = False
        self._connack_in_this_round = False
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        sock = self._client.socket()
        if sock is None or self._poke_r is None:
            return
        with selectors.DefaultSelector() as sel:
            sel.register(self._poke_r, selectors.EVENT_READ)
            registered = selectors.EVENT_READ
            sel.register(sock, registered)
            while not self._stop.is_set():
                want = selectors.EVENT_READ
                if self._client.want_write():
                    want |= selectors.EVENT_WRITE
                if want != registered:
                    sel.modify(sock, want)
                    registered = want
                rc = self._step(sel, sock, self._idle_wait)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            if self._stop.is_set():
                # Flush the DISCONNECT that stop() queued.
                with contextlib.suppress(Exception):
                    self._client.loop_write()
                return
        if not self._connack_in_this_round:
            # The socket opened but no CONNACK came: say so (it used to be silent).
            self._note_error(
                f"connection to {self._cfg.broker} lost before the broker accepted it: "
                f"{paho.error_string(rc)}"
            )

    @property
    def _idle_wait(self) -> float:
        """How long the network thread sleeps with nothing to do. Writes wake it at once
        (the poke); the timeout only paces keepalive work in ``loop_misc``, which a
        quarter of the keepalive serves (1,000 simulated agents at 0.5 s: 2,000 thread
        wake-ups a second, each taking the GIL)."""
        return max(0.5, min(5.0, self._cfg.keepalive / 4))

    def _step(self, sel: selectors.BaseSelector, sock: Any, timeout: float) -> MQTTErrorCode:
        """One turn of the network loop: what ``client.loop()`` does, on ``sel``."""
        client = self._client
        pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS-buffered bytes
        try:
            ready = sel.select(0.0 if pending else timeout)
        except (OSError, ValueError):
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        readable = pending > 0
        writable = False
        for key, events in ready:
            if key.fileobj is self._poke_r:
                with contextlib.suppress(OSError):
                    self._poke_r.recv(4096)
                writable = True  # something was queued: try to send it now
            else:
                readable = readable or bool(events & selectors.EVENT_READ)
                writable = writable or bool(events & selectors.EVENT_WRITE)
        if readable:
            rc = client.loop_read()
            if rc or client.socket() is None:
                return rc
        if writable:
            rc = client.loop_write()
            if rc or client.socket() is None:
                return rc
        return client.loop_misc()

    def _poke(self) -> None:
        """Wake the network thread: a packet was queued from another thread."""
        if self._poke_w is not None:
            with contextlib.suppress(OSError):  # full (already poked) or closed
                self._poke_w.send(b"\0")

    def _close_poke(self) -> None:
        for sock in (self._poke_r, self._poke_w):
            if sock is not None:
                sock.close()
        self._poke_r = self._poke_w = None

    def _note_error(self, text: str) -> None:
        # The first occurrence of a problem is a warning; identical repeats during
        # the backoff are debug lines, plus a warning at most every
        # STILL_FAILING_EVERY_S, so a long outage neither floods the journal nor
        # goes silent.
        repeat = text == self.last_error
        self.last_error = text
        self._error_repeats = self._error_repeats + 1 if repeat else 0
        now = time.monotonic()
        if not repeat:
            self._still_failing_at = now
            log.warning("mqtt connection problem", error=text)
        elif now - self._still_failing_at >= STILL_FAILING_EVERY_S:
            self._still_failing_at = now
            log.warning(
                "mqtt still cannot connect; retrying",
                error=text,
                attempts=self._error_repeats + 1,
                broker=self._cfg.broker,
            )
        else:
            log.debug("mqtt connection problem (repeated)", error=text, repeats=self._error_repeats)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        post_or_drop(self._handoff, fn, *args)

    # paho callbacks: network thread, keep them tiny.
    def _on_connect(
        self, client: paho.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._connack_in_this_round = True
        if reason.is_failure:
            hint = ""
            if "authori" in str(reason).lower() or "password" in str(reason).lower():
                hint = " (check mqtt.username / mqtt.password / client certificate)"
            elif "protocol version" in str(reason).lower() and self.protocol5:
                hint = ' (a broker that speaks only MQTT 3.1.1, like NATS: mqtt.protocol = "3.1.1")'
            self._note_error(f"broker {self._cfg.broker} refused the connection: {reason}{hint}")
            return
        self._connected_once_in_this_round = True
        for topic, sub in list(self._subs.items()):
            self._send_subscribe(topic, sub.qos)
        self._call(self._connected_on_loop)

    def _send_subscribe(self, topic: str, qos: int) -> None:
        """SUBSCRIBE, remembering the topic by message id to read the SUBACK."""
        with self._sub_lock:
            _rc, mid = self._client.subscribe(topic, qos=qos)
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

    def _on_disconnect(
        self, _client: paho.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        # After a refused CONNACK the refusal is the useful reason: keep it.
        if not self._stop.is_set() and self._connected_once_in_this_round:
            self._note_error(f"disconnected from {self._cfg.broker}: {reason}")
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
            self._send_subscribe(topic, sub.qos)
            self._poke()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and again after every reconnect; a refused
        subscription is asked for again, with backoff."""
        if topic not in self._subs:
            self._subs[topic] = _Sub(qos)
        else:
            self._subs[topic].fetch_only = False  # held for its own sake now
        if self.connected.is_set():
            self._send_subscribe(topic, qos)
            self._poke()

    def unsubscribe(self, topic: str) -> None:
        sub = self._subs.pop(topic, None)
        if sub is not None:
            for waiter in sub.waiters:
                waiter.cancel()
            if sub.retry is not None:
                sub.retry.cancel()
            if self.connected.is_set():
                self._client.unsubscribe(topic)
                self._poke()

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
        self._poke()
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
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cfg = cfg
        self._client_id = client_id
        self._client = self._make_client()
        self.start()

    def wake(self) -> None:
        """Cut a reconnect backoff short (used after configuration changes)."""
        self._wake.set()

"""The network thread of one paho client: it connects, drives the socket, reconnects.

- The thread (``mqtt-<client id>``) connects (connect and TLS set-up block, so they
  never run on the event loop), drives the socket with :mod:`selectors` (epoll) and
  paho's ``loop_read`` / ``loop_write`` / ``loop_misc``, and reconnects with
  jittered, capped exponential backoff. Not ``client.loop()``: it uses ``select()``,
  which fails on a file descriptor >= 1024, and paho turns that into a silent
  "connection lost" forever (found with 500 simulated agents in one process; any
  busy process can get there).
- Only this thread touches the socket: a no-op ``on_socket_register_write`` hook
  stops paho from writing on the publishing thread (see :class:`NetLoop`); the
  thread that queued a packet pokes this one through a socketpair (:meth:`NetLoop.poke`).
- A :class:`NetLoop` serves one client and is not restarted: a reconfigured session
  makes a new one, so a thread that outlives its stop (blocked in a TLS handshake
  longer than stop waits) touches only its own client, and then ends.
- Connection problems go to :class:`Problems`: a warning the first time, then at a
  bounded rate while they last.
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
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode

from agent.device.config import MqttConfig
from agent.device.mqtt.client import connect, setup_tls

log = structlog.get_logger("agent.device.mqtt")
#: While the broker stays unreachable, a warning says so at most this often (s).
STILL_FAILING_EVERY_S = 60.0


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay before reconnect ``attempt`` (0-based): min(cap, base*2^n), jittered in [50%, 100%]."""
    ceiling = min(cap, base * float(1 << min(attempt, 30)))
    return ceiling * (0.5 + 0.5 * rng.random())


def _ignore_socket(_client: paho.Client, _userdata: Any, _sock: Any) -> None:
    return None


class Problems:
    """A session's latest connection problem (:attr:`MqttSession.last_error`), told to
    the log at a bounded rate. Kept across reconfigures, like the session."""

    def __init__(self) -> None:
        self.last: str | None = None
        #: Identical problems in a row, after the first.
        self.repeats = 0
        self._still_failing_at = 0.0

    def note(self, text: str, broker: str) -> None:
        # The first occurrence of a problem is a warning; identical repeats during
        # the backoff are debug lines, plus a warning at most every
        # STILL_FAILING_EVERY_S, so a long outage neither floods the journal nor
        # goes silent.
        repeat = text == self.last
        self.last = text
        self.repeats = self.repeats + 1 if repeat else 0
        now = time.monotonic()
        if not repeat:
            self._still_failing_at = now
            log.warning("mqtt connection problem", error=text)
        elif now - self._still_failing_at >= STILL_FAILING_EVERY_S:
            self._still_failing_at = now
            log.warning(
                "mqtt still cannot connect; retrying",
                error=text,
                attempts=self.repeats + 1,
                broker=broker,
            )
        else:
            log.debug("mqtt connection problem (repeated)", error=text, repeats=self.repeats)


class NetLoop:
    """The network thread of ``client``, from :meth:`start` to :meth:`stop`.

    It takes paho's ``on_connect`` and ``on_disconnect``: ``on_connected(client)``
    runs on the network thread after a CONNACK that accepts the connection, and
    ``on_disconnected()`` after every disconnect; both must stay tiny.
    """

    def __init__(
        self,
        client: paho.Client,
        cfg: MqttConfig,
        *,
        rng: random.Random,
        problems: Problems,
        on_connected: Callable[[paho.Client], None],
        on_disconnected: Callable[[], None],
    ) -> None:
        self._client = client
        self._cfg = cfg
        self._rng = rng
        self._problems = problems
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._thread: threading.Thread | None = None
        # Whether the thread has left _run / stop() gave up waiting for it (a TLS
        # handshake blocks for up to connect_timeout): whichever comes second closes
        # the poke line.
        self._lock = threading.Lock()
        self._ended = False
        self._abandoned = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        # The wake-up line (opened by start(), closed by stop()).
        self._poke_r: socket.socket | None = None
        self._poke_w: socket.socket | None = None
        self._connected_once_in_this_round = False
        self._connack_in_this_round = False
        # Single writer: with our own network thread (not loop_start), paho would call
        # loop_write() from whichever thread publishes, racing the network thread on an
        # unlocked deque. Registering a write hook makes publish() only queue the packet
        # and wake the network thread, which does all socket I/O.
        client.on_socket_register_write = _ignore_socket
        client.on_socket_unregister_write = _ignore_socket
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect

    def start(self, name: str) -> None:
        self._poke_r, self._poke_w = socket.socketpair()
        self._poke_r.setblocking(False)
        self._poke_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def stop(self, timeout: float) -> None:
        """Disconnect cleanly (no last will) and join the thread (``timeout`` s at most)."""
        self._stop.set()
        self._wake.set()
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self.poke()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            with self._lock:
                self._abandoned = not self._ended
            if not self._abandoned:
                # paho closes its socket and wake-up socketpair only in __del__, whose
                # timing in a reference cycle is arbitrary: close them now.
                with contextlib.suppress(Exception):
                    self._client._reset_sockets()
                self._close_poke()

    def wake(self) -> None:
        """Cut a reconnect backoff short."""
        self._wake.set()

    def poke(self) -> None:
        """Wake the network thread: a packet was queued from another thread."""
        poke_w = self._poke_w
        if poke_w is not None:
            with contextlib.suppress(OSError):  # full (already poked) or closed
                poke_w.send(b"\0")

    def _close_poke(self) -> None:
        for sock in (self._poke_r, self._poke_w):
            if sock is not None:
                sock.close()
        self._poke_r = self._poke_w = None

    def _note_error(self, text: str) -> None:
        self._problems.note(text, self._cfg.broker)

    # --------------------------------------------------------- network thread
    def _run(self) -> None:
        try:
            self._serve()
        finally:
            with self._lock:
                self._ended = True
                abandoned = self._abandoned
            if abandoned:
                # stop() has returned without closing the poke line: close it here.
                # (paho's sockets are left to its __del__: the event loop may still
                # publish on this client, and paho writes to its socketpair then.)
                self._close_poke()

    def _serve(self) -> None:
        attempt = 0
        tls_ready = False
        while not self._stop.is_set():
            try:
                if self._cfg.tls and not tls_ready:
                    setup_tls(self._client, self._cfg)
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

    # paho callbacks: network thread, keep them tiny.
    def _on_connect(
        self, client: paho.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._connack_in_this_round = True
        if reason.is_failure:
            hint = ""
            if "authori" in str(reason).lower() or "password" in str(reason).lower():
                hint = " (check mqtt.username / mqtt.password / client certificate)"
            elif "protocol version" in str(reason).lower() and self._cfg.protocol == "5":
                hint = ' (a broker that speaks only MQTT 3.1.1, like NATS: mqtt.protocol = "3.1.1")'
            self._note_error(f"broker {self._cfg.broker} refused the connection: {reason}{hint}")
            return
        self._connected_once_in_this_round = True
        self._on_connected(client)

    def _on_disconnect(
        self, _client: paho.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        # After a refused CONNACK the refusal is the useful reason: keep it.
        if not self._stop.is_set() and self._connected_once_in_this_round:
            self._note_error(f"disconnected from {self._cfg.broker}: {reason}")
        self._on_disconnected()

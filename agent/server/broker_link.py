"""The server's MQTT connection: it hears its devices and writes their desired documents.

One paho client on paho's own network thread (``loop_start``), built from the agent's
``[mqtt]`` settings (TLS included). For every application it subscribes to
``{prefix}/+/status``, ``/state``, the deployment logs
(``/deployments/+/log``, kept for Mender's API), the events and the command
responses (for the console); on MQTT 5 through a shared
subscription (``$share/edge-server/…``) so that several server processes split the
messages instead of each handling all of them. The subscriptions are renewed on every
(re)connect; what arrives goes to ``on_message(topic, payload, retained)`` on the
network thread (the handler only queues it).

A shared subscription gets no retained messages (MQTT 5, 4.8.2; Mosquitto 2.0 sends
them anyway, other brokers do not), and reports sent to a server process that dies
with them unread are gone (its session ends with it). So the devices' retained
``status``, ``state`` and deployment logs are read again (:meth:`BrokerLink.resync`:
a plain subscription, dropped once they stop coming) after every connect, when an
application appears, and when the owner asks (periodically, or after the database
refused reports).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog

from agent.device.config import MqttConfig
from agent.device.mqtt import client as mqtt_client
from agent.server.errors import ServerError

log = structlog.get_logger("agent.server.broker")

SHARE_GROUP = "edge-server"
#: What the server records: the retained reports (status, state, and the deployment
#: logs, one per failed attempt, that Mender's API serves) ...
RETAINED = ("status", "state", "deployments/+/log")
#: ... and the live messages (never retained: not read again by a resync): the
#: events for the console's timeline, and the responses to the server's commands.
WATCHED = (*RETAINED, "events", "command/response")
#: A resync ends once no retained message came for this long (seconds) ...
RESYNC_QUIET_S = 1.0
#: ... or after this long at most.
RESYNC_MAX_S = 120.0
OnMessage = Callable[[str, bytes, bool], None]


class BrokerUnavailable(ServerError):
    """The broker did not take a message (not connected, or no PUBACK in time)."""


class BrokerLink:
    def __init__(self, cfg: MqttConfig, client_id: str, on_message: OnMessage) -> None:
        # A server's session ends with it: documents are retained, and a persistent
        # session would queue every device's reports for a process that is gone.
        self.cfg = cfg.model_copy(update={"persistent_session": False, "max_queued": 0})
        self.on_message = on_message
        self.connected = threading.Event()
        self._prefixes: set[str] = set()
        self._lock = threading.Lock()
        self.client = mqtt_client.build_client(self.cfg, client_id, reconnect_on_failure=True)
        if cfg.tls:
            mqtt_client.setup_tls(self.client, cfg)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.shared = cfg.protocol == "5"
        self._last_retained = 0.0
        self._resyncing = False
        self._resync_again = False
        #: Resyncs done (tests and benchmarks).
        self.resyncs = 0

    def start(self) -> None:
        """Connect in the background (paho retries until the broker is there)."""
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        self.connected.clear()  # (a disconnect asked for: no "lost the broker")
        self.client.disconnect()
        self.client.loop_stop()
        # paho closes its socket and wake-up socketpair only in __del__, whose timing in
        # a reference cycle is arbitrary (a collection in another test's middle).
        with contextlib.suppress(Exception):
            self.client._reset_sockets()

    def watch(self, prefix: str) -> None:
        """Hear the devices under ``prefix`` (now, and after every reconnect)."""
        with self._lock:
            if prefix in self._prefixes:
                return
            self._prefixes.add(prefix)
        if self.connected.is_set():
            self._subscribe(prefix)
            self.resync()

    def _filters(self, prefix: str) -> list[str]:
        share = f"$share/{SHARE_GROUP}/" if self.shared else ""
        return [f"{share}{prefix}/+/{what}" for what in WATCHED]

    def _subscribe(self, prefix: str) -> None:
        self.client.subscribe([(f, 1) for f in self._filters(prefix)])

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker refused the connection", reason=str(reason))
            return
        self.connected.set()
        with self._lock:
            prefixes = sorted(self._prefixes)
        for prefix in prefixes:
            self._subscribe(prefix)
        log.info("connected to the broker", broker=self.cfg.broker, applications=len(prefixes))
        self.resync()

    def _on_disconnect(self, *_args: Any) -> None:
        if self.connected.is_set():
            log.warning("lost the broker; reconnecting", broker=self.cfg.broker)
        self.connected.clear()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.retain:
            self._last_retained = time.monotonic()
        self.on_message(msg.topic, bytes(msg.payload), bool(msg.retain))

    def resync(self) -> None:
        """Read every device's retained ``status``, ``state`` and logs again, in the
        background (one at a time; asked again meanwhile, it runs once more after).
        Without shared subscriptions the renewed plain ones bring them already."""
        if not self.shared:
            return
        with self._lock:
            if self._resyncing:
                self._resync_again = True
                return
            self._resyncing = True
        threading.Thread(target=self._resync_loop, name="broker-resync", daemon=True).start()

    def _resync_loop(self) -> None:
        while True:
            with self._lock:
                self._resync_again = False
                prefixes = sorted(self._prefixes)
            try:
                self._resync_once(prefixes)
            except Exception:  # paho refusing (disconnected): the next connect resyncs
                log.exception("could not read the retained reports again")
            with self._lock:
                if not self._resync_again:
                    self._resyncing = False
                    return

    def _resync_once(self, prefixes: list[str]) -> None:
        filters = [f"{p}/+/{what}" for p in prefixes for what in RETAINED]
        if not filters or not self.connected.is_set():
            return
        started = time.monotonic()
        self.client.subscribe([(f, 1) for f in filters])
        while self.connected.is_set():
            now = time.monotonic()
            if now - max(started, self._last_retained) > RESYNC_QUIET_S:
                break
            if now - started > RESYNC_MAX_S:
                log.warning("retained reports still coming; resync cut short")
                break
            time.sleep(0.1)
        if self.connected.is_set():
            self.client.unsubscribe(filters)
        self.resyncs += 1
        log.debug("retained reports read again", seconds=round(time.monotonic() - started, 2))

    def publish_many(self, messages: list[tuple[str, bytes, bool]], timeout: float = 10.0) -> None:
        """Publish ``(topic, payload, retain)`` at QoS 1 and wait for every PUBACK;
        raises :class:`BrokerUnavailable` if the broker did not take them all."""
        if not self.connected.is_set():
            raise BrokerUnavailable(f"not connected to {self.cfg.broker}")
        infos = []
        for topic, payload, retain in messages:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise BrokerUnavailable(f"publish to {topic}: {paho.error_string(info.rc)}")
            infos.append(info)
        deadline = time.monotonic() + timeout
        for info in infos:
            left = deadline - time.monotonic()
            try:
                info.wait_for_publish(max(left, 0.001))
            except (RuntimeError, ValueError) as exc:  # paho: connection lost / queue full
                raise BrokerUnavailable(str(exc)) from None
            if not info.is_published():
                raise BrokerUnavailable(f"no PUBACK from {self.cfg.broker} within {timeout:g} s")

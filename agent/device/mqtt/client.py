"""A paho-mqtt 2.x client configured from :class:`~agent.device.config.MqttConfig`.

The one place where the project's MQTT clients get their protocol, session,
credentials, limits, last will and TLS: the agent's :class:`~agent.device.mqtt.MqttSession`
and the fleet tool build theirs here. Building and connecting are separate steps
because they run on different threads: :func:`build_client` only configures (cheap,
any thread), while :func:`setup_tls` reads files and :func:`connect` opens the
connection (both block: the session calls them on its network thread).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.device.config import MqttConfig


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def build_client(
    cfg: MqttConfig,
    client_id: str,
    *,
    will: Will | None = None,
    reconnect_on_failure: bool = False,
) -> paho.Client:
    """A new, unconnected client: protocol, clean session (3.1.1; MQTT 5 decides at
    :func:`connect`), in-flight and queue limits, connect timeout, credentials
    (``password_file`` read now), last will.

    ``reconnect_on_failure`` is paho's: only for a client on paho's own network thread
    (``loop_start``); the session reconnects by itself.
    """
    protocol5 = cfg.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if protocol5 else paho.MQTTv311,
        clean_session=None if protocol5 else not cfg.persistent_session,
        reconnect_on_failure=reconnect_on_failure,
    )
    # At or below the broker's receive maximum (Mosquitto: 20): paho ignores the value
    # the broker advertises.
    client.max_inflight_messages_set(cfg.max_inflight)
    client.max_queued_messages_set(cfg.max_queued)
    client.connect_timeout = cfg.connect_timeout
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.resolved_password())
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    client.on_socket_open = _socket_opened
    return client


def setup_tls(client: paho.Client, cfg: MqttConfig) -> None:
    """TLS for ``mqtts://``: the server's certificate must verify against ``ca_file``
    (default: the system's CAs) and name the host; ``cert_file`` and ``key_file`` are
    the client's certificate for mutual TLS. Blocking (reads files); once per client.
    """
    client.tls_set(
        ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
        certfile=str(cfg.cert_file) if cfg.cert_file else None,
        keyfile=str(cfg.key_file) if cfg.key_file else None,
        cert_reqs=ssl.CERT_REQUIRED,
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )


def connect(client: paho.Client, cfg: MqttConfig) -> None:
    """Open the connection and send CONNECT; the CONNACK arrives on the network loop.

    Blocking (TCP connect and TLS handshake, up to ``connect_timeout``). A persistent
    MQTT 5 session asks the broker to keep it ``session_expiry`` seconds; 3.1.1 has
    the clean session flag set by :func:`build_client` instead.
    """
    protocol5 = cfg.protocol == "5"
    props = None
    if protocol5 and cfg.persistent_session:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = cfg.session_expiry
    client.connect(
        cfg.host,
        cfg.port,
        keepalive=cfg.keepalive,
        clean_start=(not cfg.persistent_session) if protocol5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=props,
    )


def _socket_opened(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    # Small MQTT packets must not wait for Nagle + delayed ACK (~40 ms on Linux).
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

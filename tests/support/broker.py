"""A private Mosquitto for tests, and an operator-side MQTT client.

:class:`Broker` runs ``mosquitto`` on a free loopback port with its own config and
persistence directory, so a test can stop, kill and restart it (retained messages
survive a clean stop, as on a real broker with persistence).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_conf(self) -> Path:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + ("" if "allow_anonymous" in self.extra_conf else "allow_anonymous true\n")
            + "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "autosave_interval 1\n"
            "user root\n"
            f"log_dest file {self.dir}/mosquitto.log\n"
            f"{self.extra_conf}\n"
        )
        return conf

    def start(self, timeout: float = 10.0) -> None:
        conf = self._write_conf()
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "mosquitto.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        """Clean stop (saves retained messages to the persistence file)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Operator:
    """An operator-side MQTT client: publishes retained documents, watches topics.

    Runs paho's own network thread (``loop_start``); the latest message per topic is
    kept, and :meth:`wait_for` waits on a condition with a timeout.
    """

    def __init__(self, broker: Broker, client_id: str = "") -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"op-{os.getpid()}-{id(self)}",
            protocol=paho.MQTTv5,
        )
        self.broker = broker
        self.latest: dict[str, bytes] = {}
        self.history: list[tuple[str, bytes]] = []
        self.correlation: dict[str, bytes | None] = {}
        self.cond = threading.Condition()
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._subs: list[str] = []

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        for topic in self._subs:
            client.subscribe(topic, qos=1)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.latest[msg.topic] = bytes(msg.payload)
            self.history.append((msg.topic, bytes(msg.payload)))
            props = getattr(msg, "properties", None)
            self.correlation[msg.topic] = getattr(props, "CorrelationData", None)
            self.cond.notify_all()

    def request(
        self, topic: str, doc: dict[str, Any] | bytes, response_topic: str, correlation: bytes
    ) -> None:
        """Publish an MQTT 5 request with a response topic and correlation data."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        data = json.dumps(doc).encode() if isinstance(doc, dict) else doc
        self.client.publish(topic, data, qos=1, properties=props).wait_for_publish(5)

    def connect(self) -> Operator:
        self.client.connect("127.0.0.1", self.broker.port)
        self.client.loop_start()
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str) -> None:
        self._subs.append(topic)
        self.client.subscribe(topic, qos=1)

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any],
        retain: bool = True,
        timeout: float = 5.0,
    ) -> None:
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        info = self.client.publish(topic, data, qos=1, retain=retain)
        info.wait_for_publish(timeout)

    def messages(self, topic: str) -> list[bytes]:
        with self.cond:
            return [p for t, p in self.history if t == topic]

    def _wait(self, check: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                result = check()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    return result
                self.cond.wait(min(left, 0.1))

    async def wait_for(
        self, topic: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        """Wait until the latest JSON message on ``topic`` satisfies ``predicate``."""

        def check() -> dict[str, Any] | None:
            raw = self.latest.get(topic)
            if not raw:
                return None
            try:
                doc = json.loads(raw)
            except ValueError:
                return None
            return doc if predicate(doc) else None

        found = await asyncio.to_thread(self._wait, check, timeout)
        if not found:
            last = self.latest.get(topic)
            raise AssertionError(
                f"timed out after {timeout} s waiting on {topic}; last message: "
                f"{last.decode(errors='replace') if last else None}"
            )
        result: dict[str, Any] = found
        return result

    async def wait_messages(
        self, topic: str, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        """Wait until the list of all JSON messages seen on ``topic`` satisfies ``predicate``."""

        def check() -> list[dict[str, Any]] | None:
            docs = [json.loads(p) for t, p in self.history if t == topic and p]
            return docs if predicate(docs) else None

        found = await asyncio.to_thread(self._wait, check, timeout)
        if not found:
            raise AssertionError(f"timed out after {timeout} s waiting on messages of {topic}")
        result: list[dict[str, Any]] = found
        return result

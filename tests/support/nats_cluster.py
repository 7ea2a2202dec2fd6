"""A private NATS cluster with MQTT listeners, for the clustered-broker tests.

Three ``nats-server`` processes on free loopback ports, routed to each other, with
JetStream (NATS keeps MQTT sessions and retained messages in JetStream streams,
replicated across the cluster). NATS speaks MQTT 3.1.1 only.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
from broker import free_port
from paho.mqtt.enums import CallbackAPIVersion

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsNode:
    def __init__(self, root: Path, name: str, routes: list[int]) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.client_port = free_port()
        self.mqtt_port = free_port()
        self.route_port = routes.pop(0)
        self.all_routes = [self.route_port, *routes]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def start(self) -> None:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in sorted(self.all_routes))
        conf = self.dir / "nats.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{self.client_port}\n"
            f"server_name: {self.name}\n"
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}\n'
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}\n"
            f"cluster {{ name: edge-test; listen: 127.0.0.1:{self.route_port}; "
            f"routes: [{routes}] }}\n"
        )
        with (self.dir / "nats.log").open("ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=log, stderr=log)

    def kill(self) -> None:
        """``kill -9``: no clean shutdown, as when a broker node's machine dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def mqtt_ready(self) -> bool:
        """A client can connect and get a retained message back (JetStream is up)."""
        got: list[bytes] = []
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"probe-{self.name}", protocol=paho.MQTTv311
        )
        client.on_message = lambda _c, _u, m: got.append(m.payload)
        try:
            client.connect("127.0.0.1", self.mqtt_port, keepalive=10)
        except OSError:
            return False
        client.loop_start()
        try:
            deadline = time.monotonic() + 3
            while not client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not client.is_connected():
                return False
            topic = f"probe/{self.name}"
            client.publish(topic, b"up", qos=1, retain=True).wait_for_publish(3)
            client.subscribe(topic, qos=1)
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
            return got == [b"up"]
        finally:
            client.disconnect()
            client.loop_stop()


class NatsCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        self.nodes = self._make_nodes(root)

    def _make_nodes(self, root: Path) -> list[NatsNode]:
        routes = [free_port() for _ in range(self.size)]
        return [NatsNode(root, f"n{i + 1}", routes[i:] + routes[:i]) for i in range(self.size)]

    def start(self, timeout: float = 45.0, attempts: int = 2) -> None:
        """Start the nodes and wait until each serves MQTT with JetStream. A free port
        picked for a route can be taken before its node binds it (by any process's
        outgoing connection); that node then never joins, and the three-replica
        streams cannot be placed. So a cluster that does not come up is started once
        more on fresh ports, in a fresh directory, before the tests are failed."""
        for attempt in range(1, attempts + 1):
            for node in self.nodes:
                node.start()
            try:
                self.wait_ready(self.nodes, timeout)
                return
            except RuntimeError:
                if attempt == attempts:
                    raise
                self.stop()
                self.nodes = self._make_nodes(self.root / f"retry{attempt}")

    @staticmethod
    def wait_ready(nodes: list[NatsNode], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            pending = [n for n in pending if not n.mqtt_ready()]
            if pending and time.monotonic() > deadline:
                logs = "\n".join(
                    (n.dir / "nats.log").read_text(errors="replace")[-1500:] for n in pending
                )
                raise RuntimeError(f"NATS nodes {[n.name for n in pending]} not ready:\n{logs}")
            if pending:
                time.sleep(0.5)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

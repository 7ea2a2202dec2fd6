"""``edge-agent demo``: a local demonstration that needs nothing but Mosquitto.

It starts a private Mosquitto on a free port, an HTTP server for artifacts, and
the agent as a real ``edge-agent run`` process; then, as an operator would, it
publishes desired documents (deploy v1, upgrade to v2, remove) and prints the
agent's retained state as it converges. Everything runs in a temp directory that
is removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import wasmtime
from paho.mqtt.enums import CallbackAPIVersion

DEVICE = "demo-device"
PREFIX = "edge"


def example_flow(version: str) -> bytes:
    """A WASI reactor whose start-up prints a greeting (compiled from WAT)."""
    msg = f"hello from the demo flow {version}\n"
    escaped = "".join(c if c.isalnum() or c in " .-" else f"\\{ord(c):02x}" for c in msg)
    return bytes(
        wasmtime.wat2wasm(f"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{escaped}")
  (func (export "_initialize")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len(msg)}))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))""")
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@contextlib.contextmanager
def mosquitto_server(workdir: Path, *, tcp_nodelay: bool = True) -> Iterator[int]:
    """A private Mosquitto on a free loopback port. ``tcp_nodelay``: without it a
    request/response through the broker waits ~40 ms per leg (Nagle + delayed ACK)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise RuntimeError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"log_dest file {workdir / 'mosquitto.log'}\n"
        + ("set_tcp_nodelay true\n" if tcp_nodelay else "")
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class _Watcher:
    """Operator-side MQTT client that keeps the latest message per topic."""

    def __init__(self, port: int) -> None:
        self.latest: dict[str, bytes] = {}
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="edge-demo-operator")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{PREFIX}/{DEVICE}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.latest[msg.topic] = bytes(msg.payload)
            if msg.topic.endswith("/events"):
                self.events.append(json.loads(msg.payload))
            self.cond.notify_all()

    def publish_desired(self, doc: dict[str, Any]) -> None:
        topic = f"{PREFIX}/{DEVICE}/desired"
        self.client.publish(topic, json.dumps(doc), qos=1, retain=True).wait_for_publish(5)

    def wait_state(self, check: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        topic = f"{PREFIX}/{DEVICE}/state"
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                raw = self.latest.get(topic)
                if raw:
                    doc: dict[str, Any] = json.loads(raw)
                    if check(doc):
                        return doc
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"state did not converge within {timeout} s: {raw!r}")
                self.cond.wait(left)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _print_state(title: str, state: dict[str, Any], started: float) -> None:
    print(f"\n== {title}  (converged in {time.monotonic() - started:.2f} s)")
    print(f"   device {state['deviceId']}  generation {state['generation']}")
    print(f"   {'flow':<10} {'desired':<9} {'current':<9} {'status':<18} attempts")
    for flow_id, f in state["flows"].items():
        print(
            f"   {flow_id:<10} {f['desiredVersion'] or '-':<9} {f['currentVersion'] or '-':<9} "
            f"{f['status']:<18} {f['attempts']}"
        )


def main(keep: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    print(f"edge-agent demo: working in {work}")
    artifacts = work / "www"
    artifacts.mkdir()
    agent_log = work / "agent.log"
    try:
        with mosquitto_server(work) as mqtt_port, http_server(artifacts) as http_port:
            print(
                f"  broker: mqtt://127.0.0.1:{mqtt_port}   artifacts: http://127.0.0.1:{http_port}"
            )
            config = work / "agent.toml"
            config.write_text(
                f'device_id = "{DEVICE}"\ndevice_type = "demo"\nstate_dir = "{work / "state"}"\n'
                f'[mqtt]\nbroker = "mqtt://127.0.0.1:{mqtt_port}"\n'
            )
            with agent_log.open("wb") as logf:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "agent", "run", "--config", str(config)],
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                )
            watcher = _Watcher(mqtt_port)
            try:
                _demo_steps(watcher, artifacts, http_port)
            finally:
                watcher.close()
                agent.send_signal(signal.SIGTERM)
                code = agent.wait(20)
                print(
                    f"\nagent stopped (exit {code}); its log: {agent_log}"
                    if keep
                    else f"\nagent stopped (exit {code})"
                )
    except Exception as exc:  # noqa: BLE001 - any failure ends the demo, with the agent's log
        print(f"demo failed: {exc}", file=sys.stderr)
        if agent_log.exists():
            print("--- agent log (last lines) ---", file=sys.stderr)
            print("\n".join(agent_log.read_text().splitlines()[-30:]), file=sys.stderr)
        return 1
    else:
        print("demo finished: desired and current state converged at every step.")
        return 0
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _demo_steps(watcher: _Watcher, artifacts: Path, http_port: int) -> None:
    def artifact(version: str) -> dict[str, Any]:
        data = example_flow(version)
        sha = hashlib.sha256(data).hexdigest()
        (artifacts / f"hello-{version}.wasm").write_bytes(data)
        return {
            "url": f"http://127.0.0.1:{http_port}/hello-{version}.wasm",
            "sha256": sha,
            "size": len(data),
        }

    def flow_is(version: str | None, status: str) -> Callable[[dict[str, Any]], bool]:
        return lambda d: (
            d["flows"].get("hello", {}).get("status") == status
            and (d["flows"]["hello"]["currentVersion"] == version)
        )

    steps: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
        (
            "deploy hello v1",
            {
                "generation": 1,
                "flows": {
                    "hello": {"version": "v1", "artifact": artifact("v1"), "deploymentId": "demo-1"}
                },
            },
            flow_is("v1", "success"),
        ),
        (
            "upgrade hello to v2 (blue/green)",
            {
                "generation": 2,
                "flows": {
                    "hello": {"version": "v2", "artifact": artifact("v2"), "deploymentId": "demo-2"}
                },
            },
            flow_is("v2", "success"),
        ),
        (
            "remove hello (blank version)",
            {"generation": 3, "flows": {"hello": {"version": ""}}},
            flow_is(None, "removed"),
        ),
    ]
    for title, doc, check in steps:
        print(f"\n-> publish desired generation {doc['generation']}: {title}")
        started = time.monotonic()
        watcher.publish_desired(doc)
        state = watcher.wait_state(check, timeout=30)
        _print_state(title, state, started)
    print("\nstatus events seen:", ", ".join(e["status"] for e in watcher.events))

"""Command benchmark: round trips through the agent, next to a raw paho echo.

A private Mosquitto; the agent as a real ``edge-agent run`` process running the C
example flow ``counter.wasm`` with a ``counter.get`` command trigger. Measured from an
operator client in this process:

- ``agent.ping``: command in -> built-in -> response out (through the outbox);
- ``counter.get``: command in -> flow (wasm) -> the flow's own reply on
  ``flows/counter/reply``;
- baseline: a raw paho echo — a second client, subscribed to a request topic, that
  publishes every message it gets to a reply topic (QoS 1 both ways), same broker.

Sequential round trips give p50/p99 latency; a window of 50 in flight gives
throughput. Usage: python bench/commands.py [--n 2000] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from _harness import pct, start_agent, stop_agent
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.demo import mosquitto_server

ROOT = Path(__file__).resolve().parent.parent
COUNTER = ROOT / "examples" / "flows" / "counter" / "counter.wasm"
DEVICE = "bench-cmd"
WINDOW = 50


def nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    """As the agent does: small MQTT packets must not wait for Nagle + delayed ACK."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Client:
    """A paho client whose messages on one topic are counted and timestamped."""

    def __init__(self, port: int, client_id: str, listen: str) -> None:
        self.cond = threading.Condition()
        self.count = 0
        self.stamps: list[float] = []
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.c.max_inflight_messages_set(20)
        self.c.on_socket_open = nodelay
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *_: subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(listen, qos=1)
        self.c.loop_start()
        if not subscribed.wait(5):
            raise RuntimeError("no SUBACK")

    def _on_message(self, *_: Any) -> None:
        with self.cond:
            self.count += 1
            self.stamps.append(time.perf_counter())
            self.cond.notify_all()

    def wait_count(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.count < n:
                if not self.cond.wait(deadline - time.monotonic()):
                    raise RuntimeError(f"got {self.count} of {n} replies")

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def measure(client: Client, send: Callable[[], None], n: int) -> dict[str, float]:
    lat = []
    for _ in range(n):  # sequential: latency
        base = client.count
        t = time.perf_counter()
        send()
        client.wait_count(base + 1)
        lat.append((client.stamps[-1] - t) * 1e6)
    start_count = client.count
    t0 = time.perf_counter()
    for i in range(n):  # a window of WINDOW in flight: throughput
        if i >= WINDOW:
            client.wait_count(start_count + i - WINDOW + 1)
        send()
    client.wait_count(start_count + n)
    rate = n / (time.perf_counter() - t0)
    return {
        "per_s": rate,
        "p50_us": pct(lat, 50),
        "p99_us": pct(lat, 99),
        "mean_us": statistics.fmean(lat),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--nagle",
        action="store_true",
        help="leave Mosquitto's default (no TCP_NODELAY) to see its cost",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-cmd-"))
    data = COUNTER.read_bytes()
    results: dict[str, Any] = {}
    with mosquitto_server(work, tcp_nodelay=not args.nagle) as port:
        # Baseline: a raw paho echo responder.
        echo = paho.Client(CallbackAPIVersion.VERSION2, client_id="echo", protocol=paho.MQTTv5)
        echo.on_message = lambda c, _u, m: c.publish("bench/reply", m.payload, qos=1)
        echo.on_socket_open = nodelay
        echo.connect("127.0.0.1", port)
        echo.subscribe("bench/request", qos=1)
        echo.loop_start()
        baseline = Client(port, "bench-baseline", "bench/reply")
        time.sleep(0.2)  # let the echo's SUBACK land (it has no waiter of its own)
        results["baseline_paho_echo"] = measure(
            baseline, lambda: baseline.c.publish("bench/request", b'{"name":"x"}', qos=1), args.n
        )
        baseline.close()
        echo.loop_stop()
        echo.disconnect()

        agent = start_agent(work, port, DEVICE)
        try:
            op = Client(port, "bench-operator", f"edge/{DEVICE}/command/response")
            flow_replies = Client(port, "bench-flow", f"edge/{DEVICE}/flows/counter/reply")
            states = Client(port, "bench-state", f"edge/{DEVICE}/state")
            desired = {
                "generation": 1,
                "flows": {
                    "counter": {
                        "version": "1",
                        "artifact": {
                            "url": COUNTER.as_uri(),
                            "sha256": hashlib.sha256(data).hexdigest(),
                        },
                        "triggers": [{"type": "command", "command": "counter.get"}],
                        "permissions": {"publishRate": 10000},
                    }
                },
            }
            op.c.publish(f"edge/{DEVICE}/desired", json.dumps(desired), qos=1, retain=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until the flow runs
                base = flow_replies.count
                op.c.publish(f"edge/{DEVICE}/command", b'{"name":"counter.get"}', qos=1)
                try:
                    flow_replies.wait_count(base + 1, timeout=1)
                    break
                except RuntimeError:
                    continue
            ping = json.dumps({"name": "agent.ping"}).encode()
            results["agent_ping"] = measure(
                op, lambda: op.c.publish(f"edge/{DEVICE}/command", ping, qos=1), args.n
            )
            get = json.dumps({"name": "counter.get"}).encode()
            results["flow_command"] = measure(
                flow_replies, lambda: op.c.publish(f"edge/{DEVICE}/command", get, qos=1), args.n
            )
            for c in (op, flow_replies, states):
                c.close()
        finally:
            stop_agent(agent)
    results["machine"] = (
        f"{platform.machine()}, Python {platform.python_version()}, "
        f"{args.n} round trips per measure, window {WINDOW}, "
        f"mosquitto set_tcp_nodelay {'false' if args.nagle else 'true'}"
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {results['machine']}")
    print(f"{'path':<58} {'per s':>8} {'p50 us':>9} {'p99 us':>9}")
    for name, key in [
        ("agent.ping: command -> built-in -> response", "agent_ping"),
        ("counter.get: command -> flow (wasm) -> flow's publish", "flow_command"),
        ("baseline: raw paho echo client, same broker", "baseline_paho_echo"),
    ]:
        r = results[key]
        print(f"{name:<58} {r['per_s']:>8.0f} {r['p50_us']:>9.0f} {r['p99_us']:>9.0f}")


if __name__ == "__main__":
    main()

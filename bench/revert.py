"""Revert benchmark: a release that breaks goes back to the previous version.

Runs a private Mosquitto, an HTTP artifact server on loopback and the agent as a
real ``edge-agent run`` process. Each round deploys a good version over HTTP (the
baseline: an ordinary deployment, measured from publishing the desired document to
the state reporting it running), then a bad version whose first interval tick traps.
With the health window on (its default), the agent puts the good version back. The
HTTP server counts requests: each good version must have been fetched exactly once,
so every revert came from the device's own store.

Measured per round:
- inside the agent (from its JSON log): the bad version's trap to the good version
  running again ("flow failed; restarting" -> "reverted");
- end to end: publishing the bad release to the state reporting ``reverted: true``
  with the good version ``running`` (a download, an install, the first tick after
  ``TICK_MS``, the revert, and the state report);
- baseline, same run: the forward deployment of the good version over HTTP, from
  publishing to the state reporting it running.

Usage: python bench/revert.py [--rounds 20] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import wasmtime
from _harness import start_agent, stop_agent, summary
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.demo import mosquitto_server

DEVICE = "bench-dev"
TICK_MS = 20


def good(salt: int) -> bytes:
    return wasmtime.wat2wasm(
        f'(module (memory (export "memory") 1) (global i32 (i32.const {salt}))'
        ' (func (export "_initialize")))'
    )


def bad(salt: int) -> bytes:
    """Traps on its first event (the first interval tick)."""
    return wasmtime.wat2wasm(
        f'(module (memory (export "memory") 2) (global i32 (i32.const {salt}))'
        ' (func (export "_initialize"))'
        ' (func (export "edge_alloc") (param i32) (result i32) (i32.const 65536))'
        ' (func (export "edge_on_event") (param i32 i32 i32 i32 i32) (result i32) unreachable))'
    )


class Server:
    """An HTTP artifact server that counts the requests for each path."""

    def __init__(self, port: int, requests: dict[str, int]) -> None:
        self.port = port
        self.requests = requests


@contextmanager
def artifact_server(root: Path) -> Iterator[Server]:
    """Serves ``root`` on loopback."""
    requests: dict[str, int] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self) -> None:
            requests[self.path] = requests.get(self.path, 0) + 1
            super().do_GET()

        def log_message(self, *_a: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(server.server_address[1], requests)
    finally:
        server.shutdown()
        server.server_close()


class StateWatch:
    def __init__(self, port: int) -> None:
        self.cond = threading.Condition()
        self.flow: dict[str, Any] = {}
        self.received = 0.0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-operator")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edge/{DEVICE}/state", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.flow = json.loads(msg.payload).get("flows", {}).get("bench", {})
            self.received = time.perf_counter()
            self.cond.notify_all()

    def wait(self, want: Callable[[dict[str, Any]], bool], timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not want(self.flow):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out; the flow's state is {self.flow}")
                self.cond.wait(0.5)
            return self.received


def running(version: str, **more: Any) -> Callable[[dict[str, Any]], bool]:
    def check(f: dict[str, Any]) -> bool:
        return (
            f.get("currentVersion") == version
            and (f.get("runtime") or {}).get("health") == "running"
            and all(f.get(k) == v for k, v in more.items())
        )

    return check


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edge-bench-revert-"))
    www = work / "www"
    www.mkdir()
    forward: list[float] = []
    end_to_end: list[float] = []
    with mosquitto_server(work) as mqtt_port, artifact_server(www) as server:
        http_port = server.port
        agent = start_agent(work, mqtt_port, DEVICE, log='level = "info"\nformat = "json"')
        watch = StateWatch(mqtt_port)
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-release")
        pub.connect("127.0.0.1", mqtt_port)
        pub.loop_start()
        generation = 0

        def release(version: str, data: bytes, **entry: Any) -> float:
            nonlocal generation
            generation += 1
            (www / f"{version}.wasm").write_bytes(data)
            doc = {
                "generation": generation,
                "flows": {
                    "bench": {
                        "version": version,
                        "artifact": {
                            "url": f"http://127.0.0.1:{http_port}/{version}.wasm",
                            "sha256": hashlib.sha256(data).hexdigest(),
                        },
                        **entry,
                    }
                },
            }
            t0 = time.perf_counter()
            pub.publish(f"edge/{DEVICE}/desired", json.dumps(doc), qos=1, retain=True)
            return t0

        try:
            for i in range(args.rounds + 1):
                t0 = release(f"good-{i}", good(i), deploymentId=f"good-{i}")
                t1 = watch.wait(running(f"good-{i}", status="success"))
                release(
                    f"bad-{i}",
                    bad(i),
                    deploymentId=f"bad-{i}",
                    triggers=[{"type": "interval", "ms": TICK_MS}],
                )
                t2 = time.perf_counter()
                t3 = watch.wait(running(f"good-{i}", reverted=True, status="failure"))
                if i > 0:  # the first round warms the agent up
                    forward.append((t1 - t0) * 1000)
                    end_to_end.append((t3 - t2) * 1000)
        finally:
            pub.loop_stop()
            pub.disconnect()
            watch.client.loop_stop()
            stop_agent(agent)

    fetched = {path: n for path, n in server.requests.items() if path.startswith("/good-")}
    if any(n != 1 for n in fetched.values()) or len(fetched) != args.rounds + 1:
        raise RuntimeError(f"a revert used the network: requests {fetched}")
    inside = _trap_to_reverted(work / "agent.log")[1:]
    result = {
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        "rounds": len(end_to_end),
        "trap_to_reverted_ms": summary(inside),
        "bad_release_to_reverted_ms": summary(end_to_end),
        "baseline_deploy_ms": summary(forward),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}")
    print(f"{result['rounds']} rounds; the bad version traps on its first tick ({TICK_MS} ms)")
    print(f"{'measure':<58} {'median ms':>10} {'p95 ms':>10}")
    for name, v in (
        ("inside the agent: trap -> previous version running", result["trap_to_reverted_ms"]),
        ("end to end: bad release -> state reports reverted", result["bad_release_to_reverted_ms"]),
        ("baseline: deploy over HTTP -> state reports running", result["baseline_deploy_ms"]),
    ):
        print(f"{name:<58} {v['median']:>10.1f} {v['p95']:>10.1f}")


def _trap_to_reverted(log: Path) -> list[float]:
    """Per round, ms from the bad version's first trap to "reverted" (agent's log)."""
    from datetime import datetime

    out: list[float] = []
    trapped: float | None = None
    for line in log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        when = datetime.fromisoformat(event.get("timestamp", "").replace("Z", "+00:00"))
        if event.get("event") == "flow failed; restarting" and trapped is None:
            trapped = when.timestamp()
        elif event.get("event") == "reverted" and trapped is not None:
            out.append((when.timestamp() - trapped) * 1000)
            trapped = None
    return out


if __name__ == "__main__":
    main()

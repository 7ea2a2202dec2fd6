"""Convergence benchmark: publish a desired document -> retained state reports it.

Runs a private Mosquitto, an HTTP artifact server on loopback and the agent as a
real ``edge-agent run`` process. Each deployment releases a new ~100 KB module
(1,100 functions of real code, so compilation is not trivial) and measures the time
from publishing the desired document to the retained state reporting the new
version with status ``success``.

Baselines measured in the same run, on the same module bytes:
- wasmtime alone compiling the module (``wasmtime.Module(engine, bytes)``, same
  engine settings as the agent);
- a raw paho QoS 1 publish -> subscribe round trip through the same broker.

``--functions 1`` makes the module tiny (compilation ~1 ms), so that the figure is
the agent's own path: intake, state writes, swap, and the state report.

Then ``--rollbacks`` deployments go back and forth between the last two versions: a
version the device ran before, whose artifact is still in its store and whose
compiled module is still cached (no download, no compile).

Usage: python bench/convergence.py [--deployments 60] [--functions 1100]
       [--rollbacks 20] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import wasmtime
from _harness import pct, start_agent, stop_agent
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.demo import http_server, mosquitto_server

DEVICE = "bench-dev"


def module(salt: int, functions: int = 1100) -> bytes:
    body = []
    for i in range(functions):
        body.append(
            f'(func (export "f{i}") (param $x i32) (result i32) (local $i i32) (local $a i32)'
            f" (local.set $a (i32.const {salt * 7919 + i}))"
            " (loop $l (local.set $a (i32.add (i32.mul (local.get $a) (i32.const 31))"
            " (i32.xor (local.get $x) (local.get $i))))"
            " (local.set $i (i32.add (local.get $i) (i32.const 1)))"
            " (br_if $l (i32.lt_u (local.get $i) (i32.const 10))))"
            " (if (result i32) (i32.gt_u (local.get $a) (i32.const 1000))"
            " (then (i32.rem_u (local.get $a) (i32.const 7)))"
            " (else (i32.shl (local.get $a) (i32.const 2)))))"
        )
    return bytes(
        wasmtime.wat2wasm(
            '(module (memory (export "memory") 1) (func (export "_initialize"))'
            + "\n".join(body)
            + ")"
        )
    )


def compile_baseline(data: list[bytes]) -> list[float]:
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True  # the agent's engine settings
    cfg.cranelift_opt_level = "speed"
    engine = wasmtime.Engine(cfg)
    times = []
    for d in data:
        t = time.perf_counter()
        wasmtime.Module(engine, d)
        times.append((time.perf_counter() - t) * 1000)
    return times


def paho_round_trips(port: int, n: int = 200) -> list[float]:
    got = threading.Event()
    subscribed = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-echo-sub")
    sub.on_message = lambda *_: got.set()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.subscribe("bench/echo", qos=1)
    sub.loop_start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-echo-pub")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    if not subscribed.wait(5):
        raise RuntimeError("the echo subscription was not acknowledged")
    times = []
    for _ in range(n):
        got.clear()
        t = time.perf_counter()
        pub.publish("bench/echo", b"x" * 512, qos=1)
        got.wait(5)
        times.append((time.perf_counter() - t) * 1000)
    for c in (sub, pub):
        c.loop_stop()
        c.disconnect()
    return times


class StateWatch:
    def __init__(self, port: int) -> None:
        self.cond = threading.Condition()
        self.state: dict[str, Any] = {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-operator")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edge/{DEVICE}/state", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.state = json.loads(msg.payload)
            self.state["_received"] = time.perf_counter()
            self.cond.notify_all()

    def wait_version(self, version: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                f = self.state.get("flows", {}).get("bench", {})
                if f.get("currentVersion") == version and f.get("status") == "success":
                    return float(self.state["_received"])
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no convergence on {version}: {self.state}")
                self.cond.wait(0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deployments", type=int, default=60)
    ap.add_argument("--functions", type=int, default=1100, help="module size (1: tiny)")
    ap.add_argument("--rollbacks", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    modules = [module(i, args.functions) for i in range(args.deployments + 1)]
    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    www = work / "www"
    www.mkdir()
    for i, data in enumerate(modules):
        (www / f"m{i}.wasm").write_bytes(data)

    compile_ms = compile_baseline(modules[1:])
    latencies: list[float] = []
    back: list[float] = []
    with mosquitto_server(work) as mqtt_port, http_server(www) as http_port:
        rtt_ms = paho_round_trips(mqtt_port)
        agent = start_agent(work, mqtt_port, DEVICE)
        watch = StateWatch(mqtt_port)
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-release")
        pub.connect("127.0.0.1", mqtt_port)
        pub.loop_start()

        def deploy(generation: int, i: int) -> float:
            doc = {
                "generation": generation,
                "flows": {
                    "bench": {
                        "version": f"v{i}",
                        "artifact": {
                            "url": f"http://127.0.0.1:{http_port}/m{i}.wasm",
                            "sha256": hashlib.sha256(modules[i]).hexdigest(),
                            "size": len(modules[i]),
                        },
                    }
                },
            }
            t0 = time.perf_counter()
            pub.publish(f"edge/{DEVICE}/desired", json.dumps(doc), qos=1, retain=True)
            return (watch.wait_version(f"v{i}") - t0) * 1000

        try:
            for i in range(len(modules)):
                ms = deploy(i + 1, i)
                if i > 0:  # the first deployment also warms up the agent
                    latencies.append(ms)
            last = len(modules) - 1
            for j in range(args.rollbacks):  # back and forth between the last two
                back.append(deploy(len(modules) + j + 1, last - 1 if j % 2 == 0 else last))
        finally:
            pub.loop_stop()
            pub.disconnect()
            watch.client.loop_stop()
            stop_agent(agent)

    result = {
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, wasmtime {wasmtime.__name__ and _wt_version()}",
        "module_bytes": len(modules[1]),
        "deployments": len(latencies),
        "converge_ms": {
            "median": statistics.median(latencies),
            "p95": pct(latencies, 95),
            "min": min(latencies),
            "max": max(latencies),
        },
        "back_to_previous_ms": {
            "median": statistics.median(back) if back else None,
            "p95": pct(back, 95) if back else None,
        },
        "baseline_compile_ms": {
            "median": statistics.median(compile_ms),
            "p95": pct(compile_ms, 95),
        },
        "baseline_paho_rtt_ms": {"median": statistics.median(rtt_ms), "p95": pct(rtt_ms, 95)},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    c, b, r = result["converge_ms"], result["baseline_compile_ms"], result["baseline_paho_rtt_ms"]
    back_ms = result["back_to_previous_ms"]
    print(f"machine: {result['machine']}")
    print(f"module: {result['module_bytes']} bytes, {result['deployments']} deployments over HTTP")
    rows = [
        ("desired published -> state reports version", c),
        *([("the same, back to the previous version", back_ms)] if back else []),
        ("baseline: wasmtime compile of that module", b),
        ("baseline: raw paho QoS1 pub->sub round trip", r),
    ]
    print(f"{'measure':<44} {'median ms':>10} {'p95 ms':>10}")
    for name, v in rows:
        print(f"{name:<44} {v['median']:>10.2f} {v['p95']:>10.2f}")
    print(f"agent overhead beyond compile (median): {c['median'] - b['median']:.1f} ms")


def _wt_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


if __name__ == "__main__":
    main()

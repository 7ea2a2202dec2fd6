"""Footprint benchmark: the agent's memory (RSS) by number of flows, and its restart.

Runs a private Mosquitto (``set_tcp_nodelay true``), an HTTP artifact server on
loopback and the agent as a real ``edge-agent run`` process, and reads the agent's
``VmRSS`` from ``/proc/PID/status``:

- idle: connected, no flows;
- + 1 EEA bundle: a Losant sample bundle from ``../shared/eea-samples`` (``kind``
  ``eea``, with a Losant device id in its config);
- + 10 flows, + 20 flows: that bundle and 9 (19) copies of the committed C example
  ``examples/flows/counter/counter.wasm`` under other flow ids (same bytes, so one
  compiled module; every copy its own Store, instance, runner and storage).

Each RSS figure is read once the retained state reports every flow ``running`` and
the agent has been left alone for ``--settle`` seconds.

Restart: with the 20 flows installed, the agent is stopped (SIGTERM, a clean
shutdown), started again, and timed from just before the process is started until
both the retained status says ``online`` and a state report (received after the
start) has all 20 flows ``running``. Repeated ``--restarts`` times: median and p95.
Wall-clock figures on a shared 2-core machine are noisy; RSS is not.

Baselines, measured in the same run: for RSS, a bare Python process that imports
paho and wasmtime, makes an engine with the agent's settings and instantiates the
counter once (its imports stubbed; median of three processes); for reference the
same instantiating it 20 times, and instantiating the EEA sample once. For the
restart, a bare Python process that imports paho and wasmtime, deserializes the two
compiled modules, instantiates 20 instances, connects to the broker and publishes a
retained QoS 1 message: from its start to the PUBACK.

The agent's package is byte-compiled first (a device gets its byte-code from the
package's postinst; a checkout run with PYTHONDONTWRITEBYTECODE would otherwise
compile every module of the agent at each start).

Usage: python bench/footprint.py [--restarts 7] [--settle 2] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from _harness import start_agent, stop_agent, summary
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.demo import http_server, mosquitto_server

REPO = Path(__file__).resolve().parents[1]
COUNTER = REPO / "examples" / "flows" / "counter" / "counter.wasm"
COUNTER_MANIFEST = REPO / "examples" / "flows" / "counter" / "counter.json"
EEA_SAMPLE = REPO.parent / "shared" / "eea-samples" / "hello-world-memory-export.wasm"
DEVICE = "bench-footprint"
LOSANT_ID = "5f0c3e9a1b2c3d4e5f6a7b8c"  # the sample bundles need a Losant device id

#: The engine settings of the agent (agent/device/runtime/sandbox.py engine_config).
ENGINE = """
cfg = wasmtime.Config()
cfg.epoch_interruption = True
cfg.consume_fuel = True
cfg.cranelift_opt_level = "speed"
cfg.parallel_compilation = False
engine = wasmtime.Engine(cfg)
"""

#: Instantiate ``module`` ``n`` times into ``keep``, every import stubbed.
INSTANTIATE = """
def instantiate(module, n, keep):
    for _ in range(n):
        store = wasmtime.Store(engine)
        store.set_fuel(10**9)
        store.set_epoch_deadline(1 << 30)
        store.set_wasi(wasmtime.WasiConfig())
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        linker.allow_shadowing = True
        for imp in module.imports:
            if imp.module != "wasi_snapshot_preview1" and isinstance(imp.type, wasmtime.FuncType):
                results = imp.type.results
                linker.define_func(imp.module, imp.name, imp.type,
                                   lambda *a, _r=results: 0 if _r else None)
        instance = linker.instantiate(store, module)
        init = instance.exports(store).get("_initialize")
        if init is not None:
            init(store)
        keep.append((store, instance))
"""

#: RSS baseline: paho + wasmtime, the agent's engine settings, N instances of a module.
BASELINE = (
    "import sys, wasmtime, paho.mqtt.client\n"
    + ENGINE
    + INSTANTIATE
    + """
path, n = sys.argv[1], int(sys.argv[2])
keep = []
instantiate(wasmtime.Module(engine, open(path, "rb").read()), n, keep)
for line in open("/proc/self/status"):
    if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
        print(line.split()[0], int(line.split()[1]))
for store, _ in keep:
    store.close()
"""
)

#: Restart baseline: paho + wasmtime, deserialize two modules, 20 instances, connect,
#: a retained QoS 1 publish and its PUBACK.
RESTART_BASELINE = (
    "import sys, threading, wasmtime\n"
    "import paho.mqtt.client as paho\n"
    "from paho.mqtt.enums import CallbackAPIVersion\n"
    + ENGINE
    + INSTANTIATE
    + """
port, first, second = int(sys.argv[1]), sys.argv[2], sys.argv[3]
keep = []
instantiate(wasmtime.Module.deserialize_file(engine, first), 1, keep)
instantiate(wasmtime.Module.deserialize_file(engine, second), 19, keep)
acked = threading.Event()
client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-footprint-baseline")
client.on_publish = lambda *a: acked.set()
client.connect("127.0.0.1", port)
client.loop_start()
client.publish("bench/baseline/status", b'{"online": true}', qos=1, retain=True)
acked.wait(10)
print("ready", flush=True)
client.disconnect()
client.loop_stop()
for store, _ in keep:
    store.close()
"""
)


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def baseline_rss(path: Path, n: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (KiB) of the RSS baseline process."""
    out = subprocess.run(
        [sys.executable, "-c", BASELINE, str(path), str(n)],
        check=True,
        capture_output=True,
        text=True,
    )
    return {k.rstrip(":"): int(v) for k, v in (line.split() for line in out.stdout.splitlines())}


def rss_split(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (KiB) of ``pid``."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) ``pid`` has used so far, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def restart_baseline(port: int, first: Path, second: Path) -> tuple[float, float]:
    """ms from starting the restart baseline process to its PUBACK; its CPU ms then."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", RESTART_BASELINE, str(port), str(first), str(second)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t1 = time.perf_counter()
    cpu = cpu_ms(proc.pid)
    proc.wait(20)
    if line.strip() != "ready":
        raise RuntimeError("the restart baseline failed")
    return (t1 - t0) * 1000, cpu


def compiled(data: bytes, path: Path) -> Path:
    """``data`` compiled with the agent's engine settings, serialized to ``path``."""
    import wasmtime

    scope: dict[str, Any] = {"wasmtime": wasmtime}
    exec(ENGINE, scope)
    path.write_bytes(wasmtime.Module(scope["engine"], data).serialize())
    return path


class Watch:
    """The device's retained status and state, with the time each last arrived."""

    def __init__(self, port: int) -> None:
        self.cond = threading.Condition()
        self.online = False
        self.state: dict[str, Any] = {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-footprint-watch")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edge/{DEVICE}/state", qos=1)
        self.client.subscribe(f"edge/{DEVICE}/status", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            doc = json.loads(msg.payload)
            if msg.topic.endswith("/status"):
                self.online = bool(doc.get("online"))
            else:
                self.state = doc
            self.cond.notify_all()

    def forget(self) -> None:
        with self.cond:
            self.online = False
            self.state = {}

    def wait_running(self, flows: set[str], timeout: float = 60) -> float:
        """Until online and every flow in ``flows`` (and no other) runs; returns when."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = self.state.get("flows", {})
                if (
                    self.online
                    and set(got) == flows
                    and all(
                        f.get("status") == "success"
                        and (f.get("runtime") or {}).get("health") == "running"
                        for f in got.values()
                    )
                ):
                    return time.perf_counter()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out: online={self.online}, state={self.state}")
                self.cond.wait(0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--restarts", type=int, default=7)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds idle before each RSS")
    ap.add_argument("--quick", action="store_true", help="3 restarts, 1 s settle")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.restarts, args.settle = 3, 1.0
    if not EEA_SAMPLE.exists():
        raise SystemExit(f"{EEA_SAMPLE} is missing (the EEA sample bundles)")
    import agent

    compileall.compile_dir(Path(agent.__file__).parent, quiet=1)

    work = Path(tempfile.mkdtemp(prefix="edge-bench-footprint-"))
    www = work / "www"
    www.mkdir()
    counter = COUNTER.read_bytes()
    eea = EEA_SAMPLE.read_bytes()
    (www / "counter.wasm").write_bytes(counter)
    (www / "eea.wasm").write_bytes(eea)
    triggers = json.loads(COUNTER_MANIFEST.read_text())["triggers"]

    def median_baseline(path: Path, n: int) -> dict[str, int]:
        runs = [baseline_rss(path, n) for _ in range(3)]
        return {k: int(statistics.median(r[k] for r in runs)) for k in runs[0]}

    base = {
        "1 instance": median_baseline(COUNTER, 1),
        "20 instances": median_baseline(COUNTER, 20),
        "1 EEA instance": median_baseline(EEA_SAMPLE, 1),
    }
    cwasm = (compiled(eea, work / "eea.cwasm"), compiled(counter, work / "counter.cwasm"))
    rss: dict[str, dict[str, int]] = {}
    nthreads: dict[str, int] = {}
    restarts: list[float] = []
    restart_base: list[float] = []
    restart_cpu: list[float] = []  # the agent's CPU time when it was seen ready
    restart_base_cpu: list[float] = []
    with mosquitto_server(work) as mqtt_port, http_server(www) as http_port:

        def entry(name: str, data: bytes, **more: Any) -> dict[str, Any]:
            return {
                "version": "1",
                "artifact": {
                    "url": f"http://127.0.0.1:{http_port}/{name}",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    **more.pop("artifact", {}),
                },
                **more,
            }

        def flows(n: int) -> dict[str, Any]:
            out = {
                "eea": entry(
                    "eea.wasm",
                    eea,
                    artifact={"kind": "eea"},
                    config={"eea": {"deviceId": LOSANT_ID}},
                )
            }
            for i in range(1, n):
                out[f"counter-{i:02d}"] = entry("counter.wasm", counter, triggers=triggers)
            return out

        def measure(label: str) -> None:
            time.sleep(args.settle)
            rss[label], nthreads[label] = rss_split(agent.pid), threads(agent.pid)

        watch = Watch(mqtt_port)
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-footprint-release")
        pub.connect("127.0.0.1", mqtt_port)
        pub.loop_start()
        agent = start_agent(work, mqtt_port, DEVICE)
        try:
            watch.wait_running(set())
            measure("idle")
            for generation, (label, n) in enumerate(
                (("+ 1 EEA bundle", 1), ("+ 10 flows", 10), ("+ 20 flows", 20)), start=1
            ):
                doc = {"generation": generation, "flows": flows(n)}
                pub.publish(f"edge/{DEVICE}/desired", json.dumps(doc), qos=1, retain=True)
                watch.wait_running(set(doc["flows"]))
                measure(label)
            every = set(flows(20))
            for _ in range(args.restarts):
                stop_agent(agent)
                time.sleep(0.3)  # the old process's last messages arrive first
                watch.forget()
                t0 = time.perf_counter()
                agent = start_agent(work, mqtt_port, DEVICE)
                restarts.append((watch.wait_running(every) - t0) * 1000)
                restart_cpu.append(cpu_ms(agent.pid))
                wall, cpu = restart_baseline(mqtt_port, *cwasm)
                restart_base.append(wall)
                restart_base_cpu.append(cpu)
            measure("20 flows, after a restart")
        finally:
            stop_agent(agent)
            pub.loop_stop()
            watch.client.loop_stop()

    def mib(d: dict[str, int]) -> dict[str, float]:
        return {k: round(v / 1024, 1) for k, v in d.items()}

    result = {
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        "rss_mib": {k: mib(v) for k, v in rss.items()},
        "threads": nthreads,
        "baseline_rss_mib": {k: mib(v) for k, v in base.items()},
        "restart_ms": summary(restarts),
        "restarts": [round(r, 1) for r in restarts],
        "restart_cpu_ms": summary(restart_cpu),
        "baseline_restart_ms": summary(restart_base),
        "baseline_restart_cpu_ms": summary(restart_base_cpu),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    b1 = result["baseline_rss_mib"]["1 instance"]
    print(f"machine: {result['machine']}")
    print(
        f"{'agent':<28} {'VmRSS MiB':>9} {'anon':>6} {'file':>6} {'threads':>8}"
        f"   baseline VmRSS (anon/file), same run"
    )
    for label, m in result["rss_mib"].items():
        print(
            f"{label:<28} {m['VmRSS']:>9.1f} {m['RssAnon']:>6.1f} {m['RssFile']:>6.1f}"
            f" {nthreads[label]:>8}   {b1['VmRSS']:.1f} ({b1['RssAnon']:.1f}/{b1['RssFile']:.1f})"
        )
    print(
        "baseline: bare Python + paho + wasmtime (the agent's engine settings), VmRSS: "
        + ", ".join(f"{k} {v['VmRSS']:.1f} MiB" for k, v in result["baseline_rss_mib"].items())
    )
    r, b = result["restart_ms"], result["baseline_restart_ms"]
    rc, bc = result["restart_cpu_ms"], result["baseline_restart_cpu_ms"]
    print(
        f"restart with 20 flows (SIGTERM; start -> online + all 20 running), {len(restarts)} "
        f"runs: median {r['median']:.0f} ms, p95 {r['p95']:.0f} ms "
        f"(min {r['min']:.0f}, max {r['max']:.0f}); CPU used by then: median {rc['median']:.0f} ms"
    )
    print(
        f"baseline: bare Python + paho + wasmtime, 2 modules deserialized, 20 instances, "
        f"connect + retained publish acked: median {b['median']:.0f} ms, p95 {b['p95']:.0f} ms; "
        f"CPU median {bc['median']:.0f} ms"
    )
    print("(wall-clock figures on a shared 2-core machine are noisy; RSS is not)")


if __name__ == "__main__":
    main()

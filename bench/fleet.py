"""Fleet benchmark: N simulated devices converging on one release through one Mosquitto.

For each fleet size it starts a private Mosquitto and ``edge-agent sim --devices N``
(N real agents in one process, sharing one wasmtime runtime), releases the counter
example to every device with ``FleetClient.update_many`` (the artifact delivered as a
retained MQTT message) and measures:

- the time from the first desired write until every device reports ``success``
  (and the time the operator spent writing the N desired documents);
- CPU seconds used by the broker and by the simulated fleet during that window, and
  while the fleet is idle;
- resident memory per simulated device, idle and running the flow.

Baselines measured in the same run:
- raw paho: N plain paho clients (driven by one epoll thread) that on their desired
  document fetch the same retained artifact and publish a retained ``success`` state:
  the MQTT traffic of a deployment with no agent work at all;
- bare wasmtime: the counter module compiled once and instantiated N times in one
  engine (the wasm floor of running the flow on N devices).

CPU per device (the fleet's CPU during convergence / N) is printed beside the raw
paho clients' CPU per device, the baseline measured in the same run: CPU seconds
depend much less on other load on the machine than wall-clock times do.

Usage: python bench/fleet.py [--devices 100 500 1000] [--json] [--py-spy DIR]

``--py-spy DIR`` records a py-spy profile of the simulator during each convergence
(``DIR/fleet-<N>.txt``, raw collapsed stacks; needs ``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import wasmtime
from paho.mqtt.enums import CallbackAPIVersion

from agent.device.config import MqttConfig
from agent.fleet.controller import FleetClient, flow_status
from agent.fleet.demo import COUNTER_MANIFEST, counter_wasm, mosquitto_server

TICK = os.sysconf("SC_CLK_TCK")
COUNTER = counter_wasm()


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK  # utime, stime


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def mosquitto_pid(port: int) -> int:
    out = subprocess.run(
        ["pgrep", "-f", "mosquitto -c"], capture_output=True, text=True, check=False
    )
    for pid in out.stdout.split():
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        conf = cmd.split(" -c ", 1)[-1].strip()
        if Path(conf).exists() and f"listener {port} " in Path(conf).read_text():
            return int(pid)
    raise RuntimeError("cannot find the benchmark's mosquitto")


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------ the agent fleet
def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` (threads on a CPU, not idle ones) until it gets SIGINT."""
    spy = Path(sys.executable).with_name("py-spy")
    opts = ["--rate", "200", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(
        [str(spy) if spy.exists() else "py-spy", "record", "--pid", str(pid), *opts],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def agent_fleet(
    n: int, broker: str, broker_pid: int, work: Path, profile: Path | None = None
) -> dict[str, Any]:
    # Output goes to files: an unread pipe would block the fleet once it fills.
    out_path, err_path = work / "sim.out", work / "sim.err"
    with out_path.open("w") as out_f, err_path.open("w") as err_f:
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "sim",
                "--devices",
                str(n),
                "--broker",
                broker,
                "--state-root",
                str(work / f"sim-{n}"),
                "--log-level",
                "warning",
            ],
            stdout=out_f,
            stderr=err_f,
            text=True,
        )
    started = time.monotonic()
    client = FleetClient(MqttConfig.model_validate({"broker": broker}), f"bench-op-{n}")
    try:
        wait(
            lambda: sum(d.online for d in client.devices().values()) == n,
            60 + n / 10,
            f"{n} devices online",
        )
        startup_s = time.monotonic() - started
        time.sleep(2)  # let start-up work finish before measuring idle
        idle_rss = rss_bytes(sim.pid)
        broker_rss = rss_bytes(broker_pid)
        c0, b0 = cpu_seconds(sim.pid), cpu_seconds(broker_pid)
        time.sleep(5)
        idle_cpu = (cpu_seconds(sim.pid) - c0) / 5, (cpu_seconds(broker_pid) - b0) / 5

        artifact = client.publish_artifact(COUNTER, 1 << 20)
        entry = {
            "version": "1.0.0",
            "artifact": artifact.entry(),
            "deploymentId": f"b{n}",
            **COUNTER_MANIFEST,
        }
        devices = sorted(client.devices())
        spy = start_profiler(sim.pid, profile) if profile is not None else None
        if spy is not None:
            time.sleep(1)  # py-spy attaches
        c0, b0 = cpu_seconds(sim.pid), cpu_seconds(broker_pid)
        u0, s0 = cpu_split(sim.pid)
        t0 = time.monotonic()
        client.update_many(devices, lambda _d, doc: {**doc, "flows": {"counter": entry}})
        written_s = time.monotonic() - t0

        def done() -> bool:
            known = client.devices()
            return all(flow_status(known[d], "counter") == "success" for d in devices)

        wait(done, 120 + n / 5, "every device to report success")
        converge_s = time.monotonic() - t0
        cpu = cpu_seconds(sim.pid) - c0, cpu_seconds(broker_pid) - b0
        u1, s1 = cpu_split(sim.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        time.sleep(2)
        running_rss = rss_bytes(sim.pid)
    finally:
        client.close()
        sim.send_signal(signal.SIGINT)
        t_stop = time.monotonic()
        sim.wait(timeout=120)
        stop_s = time.monotonic() - t_stop
    out, err = out_path.read_text(), err_path.read_text()
    warnings = [line for line in err.splitlines() if "[warning" in line or "[error" in line]
    m = re.search(r"RSS (\d+) MiB, (\d+) KiB per device", out)
    if sim.returncode != 0 or m is None:
        raise RuntimeError(f"sim failed ({sim.returncode}): {out}\n{err[-2000:]}")
    base_rss = int(m.group(1)) * 2**20 - int(m.group(2)) * 1024 * n  # before the agents
    return {
        "startup_s": round(startup_s, 2),
        "write_s": round(written_s, 2),
        "converge_s": round(converge_s, 2),
        "sim_cpu_s": round(cpu[0], 2),
        "cpu_ms_per_device": round(cpu[0] / n * 1000, 2),
        "sim_user_s": round(u1 - u0, 2),
        "sim_system_s": round(s1 - s0, 2),
        "broker_cpu_s": round(cpu[1], 2),
        "idle_sim_cpu_pct": round(idle_cpu[0] * 100, 1),
        "idle_broker_cpu_pct": round(idle_cpu[1] * 100, 1),
        "idle_kib_per_device": round((idle_rss - base_rss) / n / 1024),
        "running_kib_per_device": round((running_rss - base_rss) / n / 1024),
        "broker_rss_mib": round(broker_rss / 2**20, 1),
        "stop_s": round(stop_s, 2),
        "warnings": len(warnings),
        "first_warnings": warnings[:3],
    }


# ------------------------------------------------------------------ baseline: raw paho
class RawDevice:
    """Desired in -> fetch the retained artifact -> retained state out; nothing else."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{device_id}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"raw/{device_id}/desired", qos=1)
        self.client.connect("127.0.0.1", port)

    def _on_message(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/desired"):
            doc = json.loads(msg.payload)
            topic = doc["flows"]["counter"]["artifact"]["url"].removeprefix("mqtt:")
            client.subscribe(topic, qos=1)
        else:  # the artifact
            client.unsubscribe(msg.topic)
            state = {"deviceId": self.device_id, "status": "success", "bytes": len(msg.payload)}
            client.publish(f"raw/{self.device_id}/state", json.dumps(state), qos=1, retain=True)


class EpollDriver(threading.Thread):
    """Drives every raw client from one epoll loop (paho's loop_start() uses select(),
    which fails once descriptors pass 1024): the cheapest way to run N paho clients."""

    def __init__(self, clients: list[paho.Client]) -> None:
        super().__init__(name="raw-paho-epoll", daemon=True)
        self.clients = clients
        self.stop = threading.Event()
        self.sel = selectors.DefaultSelector()
        self.want: dict[int, int] = {}
        for c in clients:
            sock = c.socket()
            assert sock is not None
            self.want[id(c)] = selectors.EVENT_READ
            self.sel.register(sock, selectors.EVENT_READ, c)

    def run(self) -> None:
        last_misc = 0.0
        while not self.stop.is_set():
            for c in self.clients:
                sock = c.socket()
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.want_write() else 0)
                if sock is not None and want != self.want[id(c)]:
                    self.sel.modify(sock, want, c)
                    self.want[id(c)] = want
            for key, events in self.sel.select(0.01):
                client = key.data
                if events & selectors.EVENT_READ:
                    client.loop_read()
                if events & selectors.EVENT_WRITE:
                    client.loop_write()
            if time.monotonic() - last_misc > 1:
                last_misc = time.monotonic()
                for c in self.clients:
                    c.loop_misc()
        self.sel.close()


def raw_paho_fleet(n: int, port: int, broker_pid: int) -> dict[str, Any]:
    states: set[str] = set()
    lock = threading.Lock()
    # The operator connects first, so its own loop_start() select() sees a low fd.
    op = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-operator")

    def on_state(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with lock:
            states.add(msg.topic)

    op.on_message = on_state
    op.connect("127.0.0.1", port)
    op.subscribe("raw/+/state", qos=1)
    op.loop_start()
    devices = [RawDevice(port, f"raw-{i:04d}") for i in range(n)]
    driver = EpollDriver([d.client for d in devices])
    driver.start()
    try:
        wait(lambda: all(d.client.is_connected() for d in devices), 60, "raw clients")
        time.sleep(1)
        sha = hashlib.sha256(COUNTER).hexdigest()
        op.publish(f"raw/artifacts/{sha}", COUNTER, qos=1, retain=True).wait_for_publish(10)
        doc = json.dumps(
            {
                "generation": 1,
                "flows": {
                    "counter": {
                        "version": "1.0.0",
                        "artifact": {"url": f"mqtt:raw/artifacts/{sha}"},
                    }
                },
            }
        )
        b0 = cpu_seconds(broker_pid)
        p0 = time.process_time()
        t0 = time.monotonic()
        infos = [op.publish(f"raw/{d.device_id}/desired", doc, qos=1, retain=True) for d in devices]
        for info in infos:
            info.wait_for_publish(30)
        wait(lambda: len(states) == n, 120, "raw states")
        took = time.monotonic() - t0
        client_cpu = time.process_time() - p0  # this process: the operator and every client
        return {
            "converge_s": round(took, 2),
            "client_cpu_s": round(client_cpu, 2),
            "cpu_ms_per_device": round(client_cpu / n * 1000, 2),
            "broker_cpu_s": round(cpu_seconds(broker_pid) - b0, 2),
        }
    finally:
        driver.stop.set()
        driver.join(5)
        op.disconnect()
        op.loop_stop()
        for d in devices:
            d.client.disconnect()
            d.client.loop_write()  # the DISCONNECT, from this thread now the driver is gone


# ------------------------------------------------------------------ baseline: bare wasmtime
def bare_wasmtime(n: int) -> dict[str, Any]:
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    cfg.consume_fuel = True
    cfg.cranelift_opt_level = "speed"
    engine = wasmtime.Engine(cfg)
    rss0 = rss_bytes(os.getpid())
    t0 = time.perf_counter()
    module = wasmtime.Module(engine, COUNTER)
    compile_s = time.perf_counter() - t0
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    for imp in module.imports:
        if imp.module == "edge":
            ty = imp.type
            assert isinstance(ty, wasmtime.FuncType)
            results = ty.results

            def stub(*_a: Any, _r: Any = results) -> Any:
                return 0 if _r else None

            linker.define_func("edge", imp.name or "", ty, stub)
    stores = []
    t0 = time.perf_counter()
    for _ in range(n):
        store = wasmtime.Store(engine)
        store.set_wasi(wasmtime.WasiConfig())
        store.set_fuel(10**9)
        store.set_epoch_deadline(10**6)
        inst = linker.instantiate(store, module)
        init = inst.exports(store).get("_initialize")
        if isinstance(init, wasmtime.Func):
            init(store)
        stores.append((store, inst))
    took = time.perf_counter() - t0
    per = (rss_bytes(os.getpid()) - rss0) / n
    del stores
    return {
        "compile_ms": round(compile_s * 1000, 1),
        "instantiate_ms_each": round(took / n * 1000, 2),
        "kib_per_instance": round(per / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="+", default=[100, 500, 1000])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR")
    args = ap.parse_args()
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPU {platform.machine()}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        "sizes": {},
    }
    for n in args.devices:
        print(f"[{time.strftime('%H:%M:%S')}] {n} devices ...", file=sys.stderr, flush=True)
        work = Path(tempfile.mkdtemp(prefix=f"edge-bench-fleet-{n}-"))
        with mosquitto_server(work) as port:
            broker = f"mqtt://127.0.0.1:{port}"
            pid = mosquitto_pid(port)
            if args.py_spy is not None:
                args.py_spy.mkdir(parents=True, exist_ok=True)
            profile = args.py_spy / f"fleet-{n}.txt" if args.py_spy is not None else None
            agent = agent_fleet(n, broker, pid, work, profile)
            print(f"[{time.strftime('%H:%M:%S')}] raw paho ...", file=sys.stderr, flush=True)
            raw = raw_paho_fleet(n, port, pid)
            print(f"[{time.strftime('%H:%M:%S')}] wasmtime ...", file=sys.stderr, flush=True)
        results["sizes"][n] = {"agents": agent, "raw_paho": raw, "bare_wasmtime": bare_wasmtime(n)}
        subprocess.run(["rm", "-rf", str(work)], check=False)
        if not args.json:
            a, r, w = agent, raw, results["sizes"][n]["bare_wasmtime"]
            print(f"\n{n} devices")
            print(
                f"  agents : all online {a['startup_s']} s after start; desired written in "
                f"{a['write_s']} s; all success after {a['converge_s']} s"
            )
            print(
                f"           CPU during convergence: fleet {a['sim_cpu_s']} s, broker "
                f"{a['broker_cpu_s']} s; idle: fleet {a['idle_sim_cpu_pct']} %, broker "
                f"{a['idle_broker_cpu_pct']} % of a core"
            )
            print(
                f"           CPU per device: {a['cpu_ms_per_device']} ms (raw paho baseline: "
                f"{r['cpu_ms_per_device']} ms); fleet user {a['sim_user_s']} s, system "
                f"{a['sim_system_s']} s"
            )
            print(
                f"           memory per device: {a['idle_kib_per_device']} KiB idle, "
                f"{a['running_kib_per_device']} KiB running the counter"
            )
            print(f"           broker RSS with {n} devices connected: {a['broker_rss_mib']} MiB")
            print(
                f"           stopped (SIGINT) in {a['stop_s']} s; {a['warnings']} warnings "
                f"logged {a['first_warnings']}"
            )
            print(
                f"  raw paho baseline: all states after {r['converge_s']} s; CPU clients "
                f"{r['client_cpu_s']} s, broker {r['broker_cpu_s']} s"
            )
            print(
                f"  bare wasmtime baseline: compile {w['compile_ms']} ms once, "
                f"{w['instantiate_ms_each']} ms and {w['kib_per_instance']} KiB per instance"
            )
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

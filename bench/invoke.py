"""Trigger invocation benchmark: host -> wasm -> host publish, through the real runtime.

The flow is the committed C example ``examples/flows/counter/counter.wasm``. Each
invocation is a ``counter.get`` command delivered by ``FlowHost.command``: queued,
run on a wasm worker thread under the deadline and fuel budget, ``edge_alloc`` +
copy + ``edge_on_event`` (which formats a reply with snprintf and calls the
``edge.publish`` host function) + ``edge_free``, and the publish handed back to the
event loop. Latency is measured from ``command()`` to the publish arriving on the
loop; throughput with the queue kept full.

Baseline in the same run: bare wasmtime-py calling the same ``edge_on_event`` export
on the same module, with a no-op Python ``publish`` import and no agent around it.

Usage: python bench/invoke.py [--n 5000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import wasmtime
from _harness import pct

from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import RunSpec, Supervision
from agent.device.runtime.sandbox import Limits, Runtime
from agent.wire.manifest import Manifest

ROOT = Path(__file__).resolve().parent.parent
COUNTER = ROOT / "examples" / "flows" / "counter" / "counter.wasm"
NAME = b"counter.get"
PAYLOAD = b"{}"


def bare(data: bytes, n: int) -> tuple[list[float], float]:
    """Direct calls of edge_on_event with trivial host functions."""
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    cfg.consume_fuel = True
    engine = wasmtime.Engine(cfg)
    module = wasmtime.Module(engine, data)
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1 << 40)
    store.set_fuel(1 << 62)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store.set_wasi(wasmtime.WasiConfig())
    published = [0]

    def publish(*_: Any) -> int:
        published[0] += 1
        return 0

    def other(*_: Any) -> int:
        return -4

    # Every `edge` import the module has (the C example grows with the host API).
    for imp in module.imports:
        if imp.module == "edge" and isinstance(imp.type, wasmtime.FuncType):
            fn = publish if imp.name == "publish" else other
            linker.define_func("edge", imp.name or "", imp.type, fn)
    inst = linker.instantiate(store, module)
    ex = inst.exports(store)
    ex["_initialize"](store)
    memory = ex["memory"]
    alloc, on_event = ex["edge_alloc"], ex["edge_on_event"]
    ptr = alloc(store, len(NAME) + len(PAYLOAD))
    memory.write(store, NAME + PAYLOAD, ptr)
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        on_event(store, 3, ptr, len(NAME), ptr + len(NAME), len(PAYLOAD))
        lat.append((time.perf_counter() - t) * 1e6)
    total = time.perf_counter() - start
    if published[0] != n:
        raise RuntimeError(f"the bare flow published {published[0]} of {n}")
    return lat, n / total


async def agent_path(data: bytes, n: int) -> tuple[list[float], float]:
    limits = Limits(call_deadline_ms=5000)
    async with Runtime(limits, workers=2) as runtime:
        arrived: asyncio.Queue[float] = asyncio.Queue()
        host = FlowHost(
            runtime,
            limits,
            "bench",
            flows_dir=Path(tempfile.mkdtemp()) / "f",
            device_base="edge/bench",
            supervision=Supervision(),
            publish=lambda _t, _p, _q: arrived.put_nowait(time.perf_counter()),
        )
        manifest = Manifest.model_validate(
            {
                "triggers": [{"type": "command", "command": "counter.get"}],
                "permissions": {"publishRate": 10_000},
            }
        )
        spec = RunSpec(
            flow_id="counter",
            version="1",
            sha256="b" * 64,
            kind="wasm",
            config={},
            triggers=manifest.triggers,
            permissions=manifest.permissions,
        )
        runner = await host.prepare(spec, data)
        await host.activate("counter", runner)
        lat = []
        for _ in range(n):  # sequential: latency
            t = time.perf_counter()
            host.command("counter.get", PAYLOAD)
            lat.append((await arrived.get() - t) * 1e6)
        start = time.perf_counter()
        sent = done = 0
        while done < n:  # pipelined: throughput, keeping the queue busy
            while sent < n and sent - done < 200:
                host.command("counter.get", PAYLOAD)
                sent += 1
            await arrived.get()
            done += 1
        rate = n / (time.perf_counter() - start)
        await host.close_all()
        return lat, rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data = COUNTER.read_bytes()
    bare_lat, bare_rate = bare(data, args.n)
    agent_lat, agent_rate = asyncio.run(agent_path(data, args.n))
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}, "
        f"wasmtime {version('wasmtime')}",
        "invocations": args.n,
        "agent": {
            "per_s": agent_rate,
            "p50_us": pct(agent_lat, 50),
            "p99_us": pct(agent_lat, 99),
            "mean_us": statistics.fmean(agent_lat),
        },
        "bare_wasmtime": {
            "per_s": bare_rate,
            "p50_us": pct(bare_lat, 50),
            "p99_us": pct(bare_lat, 99),
            "mean_us": statistics.fmean(bare_lat),
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}; {args.n} invocations of counter.wasm edge_on_event")
    print(f"{'path':<52} {'per s':>9} {'p50 us':>9} {'p99 us':>9}")
    for name, key in [
        ("agent: command -> queue -> wasm -> publish on loop", "agent"),
        ("baseline: bare wasmtime-py call of the same export", "bare_wasmtime"),
    ]:
        r = result[key]
        print(f"{name:<52} {r['per_s']:>9.0f} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f}")


if __name__ == "__main__":
    main()

"""The wasmtime sandbox with real modules (WAT): start-up, limits, traps, output."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import wat
from common import wait_until

from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import FlowRunner, RunSpec
from agent.device.runtime.sandbox import Limits, Runtime
from agent.errors import FlowTrap, InstantiationError, InvalidModule
from agent.wire.manifest import Permissions

LIMITS = Limits(memory_limit=4 * 1024 * 1024, call_deadline_ms=300, epoch_tick_ms=10)


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[FlowHost]:
    async with Runtime(LIMITS, workers=2) as runtime:
        h = FlowHost(runtime, LIMITS, "dev1", flows_dir=tmp_path / "flows")
        yield h
        await h.close_all()


def spec(data: bytes, version: str = "v1", flow_id: str = "f1", **kw: Any) -> RunSpec:
    fields: dict[str, Any] = {"config": {}, "triggers": (), "permissions": Permissions()}
    fields.update(kw)
    return RunSpec(flow_id=flow_id, version=version, sha256=wat.sha256(data), kind="wasm", **fields)


async def prepare(host: FlowHost, data: bytes, version: str = "v1") -> FlowRunner:
    return await host.prepare(spec(data, version), data)


async def test_reactor_starts_and_output_is_logged(host: FlowHost) -> None:
    with structlog.testing.capture_logs() as logs:
        inst = await prepare(host, wat.reactor("world"))
    assert inst is not None
    lines = [e for e in logs if e["event"] == "flow output"]
    assert lines == [
        {
            "event": "flow output",
            "stream": "stdout",
            "line": "hello world",
            "log_level": "info",
            "flow_id": "f1",
            "flow_version": "v1",
            "device_id": "dev1",
        }
    ]


async def test_command_exit_zero_is_running(host: FlowHost) -> None:
    assert await prepare(host, wat.command(0)) is not None


async def test_command_exit_nonzero_fails(host: FlowHost) -> None:
    with pytest.raises(FlowTrap, match="exited with code 3") as info:
        await prepare(host, wat.command(3))
    assert info.value.code == "exit"


async def test_infinite_loop_hits_deadline_and_agent_stays_responsive(host: FlowHost) -> None:
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    hb = asyncio.create_task(heartbeat())
    try:
        with pytest.raises(FlowTrap, match="call deadline") as info:
            await prepare(host, wat.spin_on_start())
    finally:
        hb.cancel()
    assert info.value.code == "deadline"
    assert ticks > 5  # the event loop kept running while the guest spun


async def test_trap_is_reported_with_code(host: FlowHost) -> None:
    with pytest.raises(FlowTrap, match="unreachable") as info:
        await prepare(host, wat.trap_on_start())
    assert "unreachable" in info.value.code


async def test_memory_bomb_is_capped(host: FlowHost) -> None:
    with pytest.raises(FlowTrap, match="unreachable"):
        await prepare(host, wat.memory_bomb())


async def test_module_over_memory_limit_refused(host: FlowHost) -> None:
    with pytest.raises(InstantiationError, match="memory"):
        await prepare(host, wat.big_memory(256))  # 16 MiB > 4 MiB cap


async def test_forbidden_import_refused_before_instantiation(host: FlowHost) -> None:
    with pytest.raises(InstantiationError, match=r"env\.socket_connect"):
        await prepare(host, wat.forbidden_import())


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "missing \\0asm header"),
        (b"(module)", "missing \\0asm header"),  # WAT text is not accepted as an artifact
        (b"\0asm\x01\0\0\0\x01\xff", "invalid WebAssembly module"),
        (b"\x7fELF\x02\x01\x01", "missing \\0asm header"),
    ],
)
async def test_invalid_bytes_refused(host: FlowHost, data: bytes, needle: str) -> None:
    with pytest.raises(InvalidModule) as info:
        await prepare(host, data)
    assert needle in str(info.value)


async def test_blue_green_activate_swaps_and_stops_old(host: FlowHost) -> None:
    v1 = await prepare(host, wat.reactor("one"), "v1")
    assert await host.activate("f1", v1) is None
    v2 = await prepare(host, wat.reactor("two"), "v2")
    assert host.running["f1"] is v1  # old runs until activation
    old = await host.activate("f1", v2)
    assert old is v1
    assert host.running["f1"] is v2
    assert v1.instance is None


async def test_compiled_module_cache(host: FlowHost) -> None:
    data = wat.reactor("cache")
    m1 = await host.runtime.run(lambda: host.runtime.compile(data, wat.sha256(data)))
    m2 = await host.runtime.run(lambda: host.runtime.compile(data, wat.sha256(data)))
    assert m1 is m2


async def test_blocking_host_call_is_bounded_and_never_freezes_the_loop(tmp_path: Path) -> None:
    """A guest asleep in a host call ignores epochs: the outer bound fires, and
    neither the timeout nor the cleanup may block the event loop. (The sleep cap is
    raised here so the sleep outlasts the outer bound.)"""
    limits = Limits(memory_limit=4 * 1024 * 1024, call_deadline_ms=300, max_sleep_ms=10_000)
    runtime = Runtime(limits, workers=2)
    runtime.acquire()
    host = FlowHost(runtime, limits, "dev1", flows_dir=tmp_path / "flows")
    gaps: list[float] = []
    loop = asyncio.get_running_loop()

    async def heartbeat() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.02)
            now = loop.time()
            gaps.append(now - last)
            last = now

    hb = asyncio.create_task(heartbeat())
    try:
        with pytest.raises(FlowTrap, match="did not return") as info:
            await prepare(host, wat.sleep_on_start(3000))  # bound: 0.3 s * 2 + 1 s
        await asyncio.sleep(0.2)
    finally:
        hb.cancel()
        await runtime.release()
    assert info.value.code == "deadline"
    assert max(gaps) < 0.5, f"event loop blocked for {max(gaps):.2f} s"


async def test_trap_message_is_readable(host: FlowHost) -> None:
    with pytest.raises(FlowTrap) as info:
        await prepare(host, wat.trap_on_start())
    msg = str(info.value)
    assert msg.startswith("_initialize trapped: wasm `unreachable` instruction executed in ")
    assert "backtrace" not in msg


async def test_flow_gets_its_identity_and_config_in_its_environment(host: FlowHost) -> None:
    data = wat.print_environ()
    with structlog.testing.capture_logs() as logs:
        await host.prepare(spec(data, "v7", config={"rate": 5, "name": "x"}), data)
    out = "".join(e["line"] for e in logs if e["event"] == "flow output")
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    assert env == {
        "EDGE_FLOW_ID": "f1",
        "EDGE_FLOW_VERSION": "v7",
        "EDGE_DEVICE_ID": "dev1",
        "EDGE_FLOW_CONFIG": '{"rate":5,"name":"x"}',
    }


def test_process_exit_with_live_instances_is_clean(tmp_path: Path) -> None:
    """Guest output through WasiConfig.stdout_custom made wasmtime's tokio thread call
    back into a finalizing Python at exit and abort the process (11 of 15 runs with
    pipes): guest output now goes through plain pipes."""
    import subprocess
    import sys

    script = tmp_path / "live.py"
    script.write_text(
        "import asyncio, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent.parent / 'support')!r})\n"
        "import wat\n"
        "from agent.device.runtime.sandbox import FlowInstance, Limits, Runtime\n"
        "rt = Runtime(Limits())\n"
        "keep = []\n"
        "for i in range(5):\n"
        "    inst = FlowInstance(rt, rt.compile(wat.reactor(f'x{i}')), flow_id='f',\n"
        "                        version='v', device_id='d', limits=Limits())\n"
        "    inst.start()\n"
        "    keep.append(inst)\n"
        "print('started', flush=True)\n"
    )
    for _ in range(6):
        res = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
        )
        assert "started" in res.stdout
        assert "panic" not in res.stderr, res.stderr[-2000:]
        assert res.returncode == 0


async def test_wasi_sleep_is_capped_at_the_call_deadline(host: FlowHost) -> None:
    """By default a WASI sleep (poll_oneoff on a clock) lasts at most the call
    deadline (300 ms here), so a sleeping guest cannot hold a worker thread."""
    started = time.monotonic()
    runner = await prepare(host, wat.sleep_on_start(5000))
    elapsed = time.monotonic() - started
    assert runner.instance is not None  # start-up returned normally
    assert 0.25 < elapsed < 2.0, elapsed


async def test_epoch_ticker_sleeps_while_no_wasm_runs_and_ticks_until_a_call_ends() -> None:
    """An idle agent must not wake 100 times a second; a call whose caller gave up
    (run() timed out) keeps the epoch ticking until its thread is really done."""
    async with Runtime(LIMITS, workers=1) as runtime:
        work = runtime._work
        assert work is not None
        assert runtime.busy == 0
        assert not work.is_set()  # the ticker waits for work
        gate = threading.Event()
        with pytest.raises(FlowTrap):
            await runtime.run(lambda: gate.wait(5), timeout=0.05, what="blocked")
        assert runtime.busy == 1  # the thread still runs: keep ticking
        assert work.is_set()
        await asyncio.sleep(0.1)  # ten ticks' time: the ticker must not go idle meanwhile
        assert work.is_set()
        gate.set()
        await wait_until(lambda: runtime.busy == 0, 5, "the thread to finish")
        await wait_until(lambda: not work.is_set(), 1, "the ticker to go idle")


async def test_a_compile_returns_before_its_cache_file_is_written(tmp_path: Path) -> None:
    """The compiled-module cache file (two fsyncs) is written after the compile
    returns, off the deployment's path; closing the runtime waits for it."""
    gate = threading.Event()
    cache = tmp_path / "cache"
    data = wat.reactor("cached-later")
    runtime = Runtime(LIMITS, workers=2, cache_dir=cache)
    real = runtime._store_cached

    def held(key: str, module: Any) -> None:
        gate.wait(5)
        real(key, module)

    runtime._store_cached = held  # type: ignore[method-assign]
    async with runtime:
        module = await runtime.run(lambda: runtime.compile(data))
        assert module is not None
        assert not list(cache.glob("*.cwasm"))  # still held back: the compile did not wait
        gate.set()
    assert len(list(cache.glob("*.cwasm"))) == 1  # closing waited for it

"""What the agent's memory and start-up cost: guards for what issue 14 took out.

bench/footprint.py measures the figures; these tests fail when a change brings back
a cause (an eager import, a thread per core or per flow, compile scratch memory kept),
without timing anything.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import wat
from hosts import recording_host

from agent.device import _process
from agent.device.runtime import sandbox
from agent.device.runtime.sandbox import Limits, Runtime

LIMITS = Limits(memory_limit=4 * 1024 * 1024, call_deadline_ms=1000, epoch_tick_ms=10)

#: Imported only when used: (what uses it, what it cost the daemon at start-up).
LAZY = {
    "cryptography": "signature checks with trusted keys (8.5 MiB)",
    "httpx": "the first http(s) download (1.5 MiB with httpcore, h11, anyio)",
    "httpcore": "the first http(s) download",
    "anyio": "the first http(s) download",
    "tarfile": "reading or building a workflow bundle",
    "rich": "nothing: structlog would import it for tracebacks the daemon never renders",
}


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX",)}
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        env={**clean, **env},
        timeout=60,
    )
    return res.stdout


def test_the_daemon_starts_without_what_it_imports_lazily() -> None:
    """What ``edge-agent run`` imports before its first flow (in a fresh interpreter)."""
    out = _python("""
        import json, sys
        import agent.cli
        from agent.device import _process
        _process.tune()
        import agent.device._logging, agent.device.daemon
        print(json.dumps(sorted({m.split(".")[0] for m, v in sys.modules.items() if v})))
    """)
    loaded = set(json.loads(out))
    assert {"wasmtime", "paho", "pydantic", "structlog"} <= loaded  # (the probe works)
    assert not {m: why for m, why in LAZY.items() if m in loaded}


def test_a_library_user_keeps_rich_and_its_environment() -> None:
    """tune() is the daemon's: importing the agent's modules changes nothing."""
    out = _python("""
        import os, sys
        import agent.device.daemon
        print(sys.modules.get("rich", "absent") is not None,
              "PYDANTIC_DISABLE_PLUGINS" in os.environ)
    """)
    assert out.split() == ["True", "False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_malloc_arenas_are_capped_unless_the_environment_says() -> None:
    probe = "from agent.device import _process; print(_process.limit_malloc_arenas())"
    assert _python(probe).strip() == "True"
    assert _python(probe, MALLOC_ARENA_MAX="4").strip() == "False"


def test_the_systemd_unit_caps_malloc_arenas_too() -> None:
    unit = (Path(__file__).parents[2] / "systemd" / "edge-agent.service").read_text()
    assert f"Environment=MALLOC_ARENA_MAX={_process.ARENA_MAX}\n" in unit


def test_compiling_starts_one_bounded_pool_once() -> None:
    """wasmtime's parallel compilation starts one pool of at most a thread per core,
    once for the process; further compiles start none. (A fresh interpreter: another
    test's Engine may have started that pool.)"""
    out = _python("""
        import asyncio, os, wasmtime
        from agent.device.runtime.sandbox import Limits, Runtime
        def module(n):
            funcs = "".join(
                f'(func (export "f{i}") (param i32) (result i32)'
                f' (i32.mul (local.get 0) (i32.const {i + n})))'
                for i in range(200)
            )
            return wasmtime.wat2wasm("(module " + funcs + ")")
        def threads():
            return len(os.listdir("/proc/self/task"))
        async def main():
            async with Runtime(Limits(), workers=1) as rt:
                await rt.run(lambda: rt.engine)  # the worker thread and the Engine
                counts = [threads()]
                for n in range(3):
                    await rt.run(lambda n=n: rt.compile(module(n)))
                    counts.append(threads())
                print(os.cpu_count(), *counts)
        asyncio.run(main())
    """)
    cores, before, first, *later = map(int, out.split())
    assert first - before <= cores
    assert later == [first, first]


async def test_the_engine_is_made_with_the_first_flow() -> None:
    async with Runtime(LIMITS, workers=1) as runtime:
        assert runtime._engine is None  # an agent without flows maps no Engine
        await runtime.run(lambda: runtime.compile(wat.reactor("x")))
        assert runtime._engine is not None


async def test_compile_scratch_memory_is_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(sandbox, "_malloc_trim", trims.append)
    data = wat.reactor("trim")
    async with Runtime(LIMITS, workers=1) as runtime:
        await runtime.run(lambda: runtime.compile(data))
        await asyncio.to_thread(runtime.settle)  # (given back after the compile returns)
        assert trims == [0]
        await runtime.run(lambda: runtime.compile(data))  # cached: nothing compiled
        await asyncio.to_thread(runtime.settle)
        assert trims == [0]


async def test_flows_start_no_threads_of_their_own(tmp_path: Path) -> None:
    """Fourteen running flows with interval triggers: every thread started meanwhile
    is a Python thread of a bounded pool (the wasm workers, the one output pump,
    asyncio's executor) or wasmtime's compile pool (at most one per core); none is
    per flow."""

    def native() -> set[int]:
        return {int(t) for t in os.listdir("/proc/self/task")}

    before = native()
    data = wat.echo_flow()
    async with recording_host(tmp_path) as rec:
        for i in range(14):
            await rec.deploy(data, flow_id=f"f{i}", triggers=[{"type": "interval", "ms": 20}])
        await asyncio.sleep(0.1)  # the triggers tick
        assert len(rec.host.running) == 14
        names = {t.native_id: t.name for t in threading.enumerate()}
        new = {names.get(tid, f"native thread {tid}") for tid in native() - before}
    pools = [n for n in new if re.fullmatch(r"wasm_\d+|wasm-output|asyncio_\d+", n)]
    compile_pool = [n for n in new if n.startswith("native thread")]
    assert sorted(new) == sorted(pools + compile_pool)
    assert len(compile_pool) <= (os.cpu_count() or 1)
    assert sum(n.startswith("wasm_") for n in new) <= 4  # recording_host's workers

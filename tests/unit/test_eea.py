"""The Losant EEA host: Losant's published sample bundles and EEA-shaped WAT bundles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import wat
from common import SHARED, wait_until
from hosts import BASE, Host, recording_host

from agent.device.runtime._wasmbin import read_static
from agent.device.runtime.eea import EEARunner, is_eea_module
from agent.device.runtime.eea_identity import static_identity
from agent.device.runtime.runner import Health, Supervision
from agent.errors import InstantiationError

SAMPLES = SHARED / "eea-samples"
SAMPLE_FILES = ["hello-world-memory-import.wasm", "hello-world-memory-export.wasm"]
FAST = {"eea": {"loopIntervalMs": 20}}


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Host]:
    sup = Supervision(max_failures=3, failure_window=60, backoff_initial=0.05)
    async with recording_host(tmp_path, sup) as rec:
        yield rec


async def deploy(h: Host, data: bytes, flow_id: str = "f1", **kw: Any) -> EEARunner:
    runner = await h.deploy(data, flow_id=flow_id, config=kw.pop("config", FAST), **kw)
    assert isinstance(runner, EEARunner)
    return runner


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/eea-samples is not present")
@pytest.mark.parametrize("name", SAMPLE_FILES)
async def test_losant_sample_bundles_run(h: Host, name: str) -> None:
    data = (SAMPLES / name).read_bytes()
    with structlog.testing.capture_logs() as logs:
        runner = await deploy(h, data)  # eea_init returned 0, or deploy would raise
        await wait_until(
            lambda: sum("Loop called with value:" in str(e.get("line")) for e in logs) >= 3,
            what="three eea_loop traces",
        )
    traces = [e for e in logs if e["event"] == "eea trace"]
    assert traces[0]["line"] == "Hello World from WebAssembly!"
    assert all(e["trace_level"] == 2 and e["flow_id"] == "f1" for e in traces)
    stamp = int(traces[-1]["line"].rsplit(":", 1)[1])
    assert abs(stamp - __import__("time").time() * 1000) < 60_000  # eea_loop gets epoch ms
    assert runner.state.health == Health.RUNNING


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/eea-samples is not present")
def test_samples_are_detected_as_eea_without_an_interface_section() -> None:
    import wasmtime

    engine = wasmtime.Engine()
    for name in SAMPLE_FILES:
        data = (SAMPLES / name).read_bytes()
        assert is_eea_module(wasmtime.Module(engine, data))
        assert "interfaceVersion" not in read_static(data).custom
        assert static_identity(data).identifier is None


@pytest.mark.parametrize("memory_import", [True, False])
async def test_init_sequence_and_imports(h: Host, memory_import: bool) -> None:
    with structlog.testing.capture_logs() as logs:
        runner = await deploy(h, wat.eea_bundle(memory_import=memory_import))
    # eea_init: device id (u8 length), empty storage, the stub of a registered function
    # nobody provides returns 1, the base64_encode plugin works.
    assert h.on("losant/dev1/init") == [b" 1 aGVsbG8="]
    assert h.on("losant/dev1/config") == [b"2"]  # eea_config_set_trace_level ran first
    assert h.on("losant/dev1/conn") == [b"0"]  # connection status before init
    assert any(
        e["event"] == "registered function not provided; calls return an error"
        and e["function"] == "eea_fn_not_provided"
        for e in logs
    )
    assert runner.eea.stubs_called == 1
    assert any(e["event"] == "eea trace" and e["line"] == "eea_init ran" for e in logs)


async def test_messages_direct_triggers_and_connection(h: Host) -> None:
    await deploy(h, wat.eea_bundle())
    # the device's command topic goes to EEA bundles as a raw message
    assert h.host.route(f"{BASE}/command", b'{"name":"x"}') == ["f1"]
    await wait_until(lambda: h.on("losant/dev1/echo"), what="the echo")
    assert h.on("losant/dev1/echo") == [f'{BASE}/command {{"name":"x"}}'.encode()]
    assert h.host.direct_trigger("f1", "trig-1", b'{"a":1}')
    await wait_until(lambda: h.on("losant/dev1/direct"), what="the direct trigger")
    assert h.on("losant/dev1/direct") == [b'trig-1 {"a":1}']
    h.host.set_connected(True)
    h.host.set_connected(False)
    await wait_until(lambda: len(h.on("losant/dev1/conn")) == 3, what="connection changes")
    assert h.on("losant/dev1/conn") == [b"0", b"1", b"0"]


async def test_oversized_message_is_dropped_not_truncated(h: Host) -> None:
    runner = await deploy(h, wat.eea_bundle())
    h.host.route(f"{BASE}/command", b"x" * 5000)  # the payload buffer is 4096
    h.host.route(f"{BASE}/command", b"small")
    await wait_until(lambda: h.on("losant/dev1/echo"), what="the small message")
    assert h.on("losant/dev1/echo") == [f"{BASE}/command small".encode()]
    assert runner.eea.dropped == 1


async def test_storage_survives_shutdown_and_restart(h: Host) -> None:
    await deploy(h, wat.eea_bundle())
    h.host.route(f"{BASE}/command", b'{"remember":"me"}')
    await wait_until(lambda: h.on("losant/dev1/echo"), what="the echo")
    await h.host.remove("f1")  # eea_shutdown saves the storage
    await deploy(
        h,
        wat.eea_bundle(),
    )
    assert h.on("losant/dev1/init")[-1] == b'{"remember":"me"} 1 aGVsbG8='


async def test_messages_to_other_topics_are_refused(h: Host) -> None:
    # a bundle sending outside losant/<id>/# and its own flow area is refused
    data = wat.eea_bundle(
        loop_body="""
      (drop (call $send (i32.const 16384) (i32.const 7) (i32.const 0) (i32.const 0)
                        (i32.const 0)))"""
    )
    runner = await deploy(h, data)
    await wait_until(lambda: runner.eea.dropped >= 1, what="a refused message")
    assert not [t for t, _, _ in h.published if t == "losant/"]


async def test_interface_version_other_than_1_0_0_is_refused(h: Host) -> None:
    with pytest.raises(InstantiationError, match=r"interface version '2\.0\.0'"):
        await deploy(h, wat.eea_bundle(interface_version="2.0.0"))
    runner = await deploy(h, wat.eea_bundle(interface_version="1.0.0"), flow_id="ok")
    assert runner.state.health == Health.RUNNING


async def test_unknown_env_import_is_refused(h: Host) -> None:
    data = wat.wasmtime.wat2wasm(
        '(module (import "env" "eea_trace" (func (param i32 i32 i32) (result i32)))'
        ' (import "env" "system" (func (param i32) (result i32)))'
        ' (func (export "eea_init") (result i32) (i32.const 0)))'
    )
    with pytest.raises(InstantiationError, match=r"env\.system"):
        await deploy(h, data)


async def test_failing_eea_init_fails_the_start(h: Host) -> None:
    data = wat.wasmtime.wat2wasm(
        '(module (import "env" "eea_trace" (func (param i32 i32 i32) (result i32)))'
        ' (memory (export "memory") 1)'
        ' (func (export "eea_init") (result i32) (i32.const 1))'
        ' (func (export "eea_loop") (param i64) (result i32) (i32.const 0)))'
    )
    with pytest.raises(InstantiationError, match="eea_init returned 1"):
        await deploy(h, data)


async def test_trapping_eea_loop_is_supervised(h: Host) -> None:
    runner = await deploy(h, wat.eea_bundle(loop_body="unreachable"))
    await wait_until(lambda: runner.state.health == Health.BROKEN, 10, "broken")
    assert "eea_loop trapped" in (runner.state.last_error or "")
    assert runner.state.restarts == 2


async def test_eea_bundles_take_only_mqtt_triggers(h: Host) -> None:
    with pytest.raises(InstantiationError, match="only mqtt triggers"):
        await deploy(h, wat.eea_bundle(), triggers=[{"type": "interval", "ms": 50}])
    runner = await deploy(
        h, wat.eea_bundle(), flow_id="ok", triggers=[{"type": "mqtt", "topic": "sensors/+/temp"}]
    )
    assert h.host.route("sensors/a/temp", b"21") == ["ok"]
    await wait_until(lambda: h.on("losant/dev1/echo"), what="the echo")
    assert h.on("losant/dev1/echo") == [b"sensors/a/temp 21"]
    assert runner.state.health == Health.RUNNING

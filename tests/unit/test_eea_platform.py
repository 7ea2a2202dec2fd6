"""EEA bundles as Losant's platform compiles them (WAT stand-ins, see wat_eea.py):
queue sizes in bytes so timers fire, identity globals and sections, the Losant
device id, and registered functions visible in the runtime info."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import wat
from common import wait_until
from hosts import Host, recording_host
from wat_eea import platform_bundle

from agent.device.runtime.eea import EEARunner
from agent.device.runtime.eea_identity import BundleIdentity, static_identity
from agent.device.runtime.eea_settings import default_settings, resolve
from agent.device.runtime.runner import Supervision
from agent.errors import InstantiationError

LOSANT_ID = "5f0c3e9a1b2c3d4e5f6a7b8c"
FAST = {"loopIntervalMs": 20}


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Host]:
    sup = Supervision(max_failures=3, failure_window=60, backoff_initial=0.05)
    async with recording_host(tmp_path, sup) as rec:
        yield rec


async def deploy(h: Host, data: bytes, flow_id: str = "f1", **eea: Any) -> EEARunner:
    runner = await h.deploy(data, flow_id=flow_id, config={"eea": {**FAST, **eea}})
    assert isinstance(runner, EEARunner)
    return runner


def debug(h: Host, device: str = LOSANT_ID) -> list[bytes]:
    return h.on(f"losant/{device}/fromAgent/debug")


async def test_timer_fires_at_its_interval_with_a_byte_sized_queue(h: Host) -> None:
    """A queue of 10 (what the host passed before) makes such a bundle trace
    `Payload queue overflow` on every loop and no timer ever fires."""
    stamps: list[float] = []
    with structlog.testing.capture_logs() as logs:
        await deploy(h, platform_bundle(interval_ms=200), deviceId=LOSANT_ID)
        seen = 0
        deadline = time.monotonic() + 10
        while len(stamps) < 6 and time.monotonic() < deadline:
            n = len(debug(h))
            stamps += [time.monotonic()] * (n - seen)
            seen = n
            await asyncio.sleep(0.005)
    assert debug(h)[:3] == [b"timer fired 1", b"timer fired 2", b"timer fired 3"]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert 0.15 < statistics.median(gaps) < 0.6  # at its 200 ms interval, not every loop
    assert not [e for e in logs if "overflow" in str(e.get("line"))]
    # the host told it sizes in bytes, Losant's defaults
    assert h.on(f"losant/{LOSANT_ID}/settings") == [b"1024000 1024000 256 4096 30000 1"]


async def test_settings_per_flow_and_their_bound(h: Host) -> None:
    await deploy(
        h,
        platform_bundle(),
        queueSize=2048,
        storageSize=0,
        topicBuffer=64,
        payloadBuffer=1024,
        storageIntervalMs=0,
        debugEnabled=False,
        deviceId=LOSANT_ID,
    )
    assert h.on(f"losant/{LOSANT_ID}/settings") == [b"2048 0 64 1024 0 0"]
    # the recording host's sandbox has 8 MiB: 8 MiB of queue cannot fit with the rest
    with pytest.raises(
        InstantiationError,
        match=r"over the sandbox memory limit of "
        r"8,388,608 bytes \(sandbox.memory_limit\)",
    ):
        await deploy(
            h, platform_bundle(), flow_id="big", queueSize=8 * 1024 * 1024, deviceId=LOSANT_ID
        )
    with pytest.raises(
        InstantiationError,
        match=r"config\.eea\.queueSize: Input should be "
        "greater than or equal to 1024",
    ):
        await deploy(h, platform_bundle(), flow_id="tiny", queueSize=10)
    with pytest.raises(InstantiationError, match=r"config\.eea\.queueSzie: Extra inputs"):
        await deploy(h, platform_bundle(), flow_id="typo", queueSzie=4096)


def test_resolve_defaults_and_device_id_order() -> None:
    defaults = default_settings()
    settings, device = resolve({}, defaults, memory_limit=64 << 20, device_id="gw-17")
    assert (settings.queue_size, settings.storage_size) == (1_024_000, 1_024_000)
    assert (settings.topic_buffer, settings.payload_buffer) == (256, 4096)
    assert device == "gw-17"
    other = "a" * 24
    assert (
        resolve({}, defaults, memory_limit=64 << 20, device_id="gw-17", losant_device_id=other)[1]
        == other
    )
    assert (
        resolve({}, defaults, memory_limit=64 << 20, device_id=LOSANT_ID, losant_device_id=other)[1]
        == LOSANT_ID
    )
    assert (
        resolve({"eea": {"deviceId": other}}, defaults, memory_limit=64 << 20, device_id=LOSANT_ID)[
            1
        ]
        == other
    )


@pytest.mark.parametrize("memory_import", [True, False])
def test_identity_from_globals_and_sections(memory_import: bool) -> None:
    assert static_identity(platform_bundle(memory_import=memory_import)) == BundleIdentity(
        "1635302774192", "1.0.0", "globals"
    )
    assert static_identity(
        platform_bundle(identity="sections", identifier="b-7")
    ) == BundleIdentity("b-7", "1.0.0", "sections")
    assert static_identity(platform_bundle(identity=None)) == BundleIdentity()
    assert static_identity(b"\0asm\x01\0\0\0\x00\xff\xff\xff\xff\x0f") == BundleIdentity()


async def test_identity_is_read_from_the_running_bundle(h: Host) -> None:
    runner = await deploy(h, platform_bundle(identifier="1635302774192"), deviceId=LOSANT_ID)
    info = runner.health_info()
    assert info["bundle"] == {"identifier": "1635302774192", "interfaceVersion": "1.0.0"}
    assert runner.eea.identity.source == "globals"
    sections = await deploy(
        h,
        platform_bundle(identity="sections", identifier="sect-1"),
        flow_id="f2",
        deviceId=LOSANT_ID,
    )
    assert sections.health_info()["bundle"]["identifier"] == "sect-1"


async def test_interface_major_other_than_1_is_refused(h: Host) -> None:
    with pytest.raises(
        InstantiationError,
        match=r"interface version '2\.0\.0' is not "
        "supported.*major version 1",
    ):
        await deploy(h, platform_bundle(interface="2.0.0"), deviceId=LOSANT_ID)
    runner = await deploy(h, platform_bundle(interface="1.3.0"), flow_id="ok", deviceId=LOSANT_ID)
    assert runner.health_info()["bundle"]["interfaceVersion"] == "1.3.0"


async def test_a_bundle_refusing_the_device_id_says_why(h: Host) -> None:
    with pytest.raises(InstantiationError) as info:
        await deploy(h, platform_bundle())
    message = str(info.value)
    assert "the bundle refused device id 'dev1'" in message
    assert "set losant.device_id" in message
    assert "Device ID from eea_get_device_id() failed." in message  # its last error trace
    runner = await deploy(h, platform_bundle(), flow_id="f2", deviceId=LOSANT_ID)
    assert runner.eea.device_id == LOSANT_ID


async def test_losant_device_id_from_the_agent_config(tmp_path: Path) -> None:
    async with recording_host(tmp_path, losant_device_id=LOSANT_ID) as h:
        runner = await deploy(h, platform_bundle())
        assert runner.eea.device_id == LOSANT_ID
        await wait_until(lambda: debug(h), what="the timer on the Losant device's topic")


async def test_registered_functions_are_visible(h: Host) -> None:
    runner = await deploy(h, wat.eea_bundle())
    assert runner.health_info()["registeredFunctions"] == {
        "imported": ["base64_encode", "not_provided"],
        "missing": ["not_provided"],
    }

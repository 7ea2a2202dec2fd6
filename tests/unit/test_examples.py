"""The example flows in examples/flows: the committed artifacts run, and rebuild identically."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from common import REPO, wait_until
from hosts import BASE, Host, deploy_bundle, recording_host

from agent.device.runtime.runner import Supervision

EXAMPLES = REPO / "examples" / "flows"
COUNTER = EXAMPLES / "counter" / "counter.wasm"
GREENHOUSE = EXAMPLES / "greenhouse.tar.gz"


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Host]:
    async with recording_host(tmp_path, Supervision()) as rec:
        yield rec


COUNTER_TRIGGERS = [
    {"type": "startup"},
    {"type": "interval", "name": "tick", "ms": 30},
    {"type": "command", "command": "counter.get"},
    {"type": "command", "command": "counter.reset"},
]


async def test_counter_counts_answers_and_keeps_its_count(h: Host) -> None:
    await h.deploy(COUNTER.read_bytes(), triggers=COUNTER_TRIGGERS)
    topic = f"{BASE}/flows/f1/count"
    await wait_until(lambda: len(h.on(topic)) >= 3, what="three counts")
    assert [int(p) for p in h.on(topic)][:3] == [1, 2, 3]
    h.host.command("counter.get", b"{}")
    await wait_until(lambda: h.on(f"{BASE}/flows/f1/reply"), what="the reply")
    reply = json.loads(h.on(f"{BASE}/flows/f1/reply")[0])
    assert reply["command"] == "counter.get"
    assert reply["count"] >= 3
    # a new version (a restart of the code) continues from the stored count
    before = max(int(p) for p in h.on(topic))
    await h.deploy(COUNTER.read_bytes(), version="v2", triggers=COUNTER_TRIGGERS)
    await wait_until(lambda: max(int(p) for p in h.on(topic)) > before, what="v2 counting")
    assert sorted(int(p) for p in h.on(topic)) == list(range(1, len(h.on(topic)) + 1))
    h.host.command("counter.reset", b"{}")
    await wait_until(lambda: len(h.on(f"{BASE}/flows/f1/reply")) == 2, what="reset reply")
    assert json.loads(h.on(f"{BASE}/flows/f1/reply")[1])["count"] == 0


async def test_greenhouse_bundle_sensor_and_alarm_share_storage(h: Host) -> None:
    await deploy_bundle(h, GREENHOUSE.read_bytes())
    h.host.command("alarm.status", b"{}")  # before any reading: temperature null
    await wait_until(lambda: h.on(f"{BASE}/flows/gh/alarm"), what="the first answer")
    first = json.loads(h.on(f"{BASE}/flows/gh/alarm")[0])
    assert first == {
        "command": "alarm.status",
        "temperature": None,
        "threshold": 25,
        "alarm": False,
    }
    await wait_until(lambda: h.on(f"{BASE}/telemetry/temperature"), 5, "a reading")
    temp = json.loads(h.on(f"{BASE}/telemetry/temperature")[0])["temperature"]
    assert 18 <= temp <= 29
    h.host.command("alarm.status", b"{}")
    await wait_until(lambda: len(h.on(f"{BASE}/flows/gh/alarm")) == 2, what="second answer")
    second = json.loads(h.on(f"{BASE}/flows/gh/alarm")[1])
    assert second["temperature"] == temp
    assert second["alarm"] is (temp > 25)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("ziglang") is None,
    reason="the ziglang package (C toolchain for the examples) is not installed",
)
# (the first build on a machine fills zig's cache: ~50 s alone, over the suite's
# 120 s limit on a busy machine)
@pytest.mark.timeout(300)
def test_examples_rebuild_to_the_committed_bytes(tmp_path: Path) -> None:
    work = tmp_path / "flows"
    shutil.copytree(EXAMPLES, work)
    res = subprocess.run(
        ["bash", str(work / "build.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for rel in [
        "counter/counter.wasm",
        "greenhouse/sensor.wasm",
        "greenhouse/alarm.wasm",
        "greenhouse.tar.gz",
    ]:
        built = hashlib.sha256((work / rel).read_bytes()).hexdigest()
        committed = hashlib.sha256((EXAMPLES / rel).read_bytes()).hexdigest()
        assert built == committed, f"{rel} rebuilt differently: run examples/flows/build.sh"


def test_the_counter_manifest_shipped_is_the_demo_s() -> None:
    """The README's fleet block deploys examples/flows/counter/counter.json; the demo
    deploys COUNTER_MANIFEST: the same triggers (a startup trigger among them, so the
    count goes on across upgrades)."""
    import json

    from agent.fleet.demo import COUNTER_MANIFEST

    shipped = json.loads((REPO / "examples" / "flows" / "counter" / "counter.json").read_text())
    assert shipped == COUNTER_MANIFEST
    assert {"type": "startup"} in shipped["triggers"]

"""Small artifacts over MQTT: with ``mqtt_artifact_limit`` set, a release names the
artifact's retained topic, the server publishes it before the document, and the
device installs it without any HTTP download."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from broker import Broker, Operator
from common import COUNTER_WASM
from server_harness import RunningServer, running_server, sim_fleet

from agent.fleet.sim import Simulation

PREFIX = "small"


@pytest.fixture
def server(tmp_path: Path, broker: Broker) -> Iterator[RunningServer]:
    db = f"sqlite:///{tmp_path / 'server.db'}"
    settings = {"mqtt_artifact_limit": 256 * 1024}
    with running_server(tmp_path / "srv", db, broker.url, prefix=PREFIX, settings=settings) as srv:
        yield srv


@pytest.fixture
async def fleet(tmp_path: Path, broker: Broker) -> AsyncIterator[Simulation]:
    async with sim_fleet(tmp_path, broker.url, PREFIX, 1) as sim:
        yield sim


async def test_a_small_artifact_travels_retained(
    server: RunningServer, fleet: Simulation, operator: Operator
) -> None:
    wasm = COUNTER_WASM.read_bytes()
    assert len(wasm) <= 256 * 1024
    digest = hashlib.sha256(wasm).hexdigest()
    topic = f"{PREFIX}/artifacts/{digest}"
    operator.subscribe(topic)
    app = server.app_id
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        with server.http() as http:
            if http.get(f"/applications/{app}/devices").json()["totalCount"] == 1:
                break
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.2)
    assert server.upload("counter", "v1", wasm).status_code == 201
    with server.http() as http:
        r = http.post(
            f"/applications/{app}/edge/deployments/release",
            json={"flowId": "counter", "version": "v1", "deviceIds": ["sim-0001"]},
        )
        assert r.status_code == 201, r.text
        dev = http.get(f"/applications/{app}/devices/sim-0001").json()
    assert dev["desired"]["flows"]["counter"]["artifact"]["url"] == f"mqtt:{topic}"
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        with server.http() as http:
            items = http.get(f"/applications/{app}/edge/deployments").json()["items"]
        if items and items[0]["status"] == "success":
            break
        assert asyncio.get_running_loop().time() < deadline, items
        await asyncio.sleep(0.2)
    assert items[0]["currentVersion"] == "v1"
    assert operator.messages(topic) == [wasm]  # published once, retained

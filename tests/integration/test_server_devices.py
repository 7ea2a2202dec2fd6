"""Devices on the control plane: created through the API before they connect, named
and tagged, then decommissioned (flows removed, retained documents cleared)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, Operator
from common import COUNTER_WASM
from server_harness import RunningServer, running_server, sim_fleet

from agent.fleet.sim import Simulation

PREFIX = "devs"


@pytest.fixture
def server(tmp_path: Path, broker: Broker) -> Iterator[RunningServer]:
    db = f"sqlite:///{tmp_path / 'server.db'}"
    with running_server(tmp_path / "server", db, broker.url, prefix=PREFIX) as srv:
        yield srv


@pytest.fixture
async def fleet(tmp_path: Path, broker: Broker) -> AsyncIterator[Simulation]:
    async with sim_fleet(tmp_path, broker.url, PREFIX, 2, device_type="rpi4") as sim:
        yield sim


async def poll(check: Any, what: str, timeout: float = 20) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await asyncio.to_thread(check)
        if got:
            return got
        assert asyncio.get_running_loop().time() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.2)


@pytest.fixture
def created(server: RunningServer) -> dict[str, Any]:
    """sim-0001 exists in the inventory before it first connects."""
    with server.http() as http:
        r = http.post(
            f"/applications/{server.app_id}/devices",
            json={
                "name": "Boiler room",
                "description": "gateway by the boiler",
                "tags": [{"key": "floor", "value": "B1"}],
                "deviceClass": "gateway",
                "deviceId": "sim-0001",
            },
        )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_created_device_connects_keeps_its_name_and_is_decommissioned(
    server: RunningServer,
    created: dict[str, Any],
    fleet: Simulation,
    operator: Operator,
) -> None:
    app = server.app_id
    assert created["connectionInfo"]["connected"] == 0
    assert created["name"] == "Boiler room"

    def dev(device_id: str) -> dict[str, Any]:
        with server.http() as http:
            got: dict[str, Any] = http.get(f"/applications/{app}/devices/{device_id}").json()
        return got

    online = await poll(lambda: dev("sim-0001")["online"] and dev("sim-0001"), "sim-0001 online")
    assert (online["name"], online["deviceType"], online["deviceClass"]) == (
        "Boiler room",
        "rpi4",
        "gateway",
    )
    assert online["agentVersion"]
    assert online["lastSeen"]

    assert server.upload("counter", "v1", COUNTER_WASM.read_bytes()).status_code == 201
    with server.http() as http:
        r = http.post(
            f"/applications/{app}/edge/deployments/release",
            json={"flowId": "counter", "version": "v1", "deviceIds": ["sim-0001", "sim-0002"]},
        )
        assert r.status_code == 201, r.text
    await poll(
        lambda: (
            (dev("sim-0001")["state"] or {})
            .get("flows", {})
            .get("counter", {})
            .get("currentVersion")
            == "v1"
        ),
        "v1 running",
    )

    operator.subscribe(f"{PREFIX}/sim-0001/#")
    with server.http() as http:
        assert http.delete(f"/applications/{app}/devices/sim-0001").status_code == 200
        # No longer targeted: a release naming it is refused, nothing written.
        r = http.post(
            f"/applications/{app}/edge/deployments/release",
            json={"flowId": "counter", "version": "v1", "deviceIds": ["sim-0001"]},
        )
        assert r.status_code == 404
        listed = http.get(f"/applications/{app}/devices").json()
    assert [d["id"] for d in listed["items"]] == ["sim-0002"]
    # The device removed its flow, then its retained documents were cleared.
    agent = next(a for a in fleet.agents if a.cfg.device_id == "sim-0001")
    await poll(
        lambda: all(r.installed is None for r in agent.reconciler.state.flows.values()),
        "the flow removed on the device",
    )
    await poll(
        lambda: operator.latest.get(f"{PREFIX}/sim-0001/desired") == b"",
        "the retained desired document cleared",
    )
    assert dev("sim-0001")["decommissioned"] is True
    assert dev("sim-0002")["decommissioned"] is False

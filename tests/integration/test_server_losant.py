"""``edge-agent server`` driven by Losant's own Python client (``losant-rest``), with
real sim agents on a real Mosquitto, on SQLite and on PostgreSQL: a flow version is
uploaded, released, converges, is replaced and removed; commands go by tag; exports
produce their files."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, Operator
from common import COUNTER_WASM, until
from losant_rest import Client, LosantError
from server_harness import RunningServer, running_server, sim_fleet

from agent.fleet.sim import Simulation

DEVICES = 3
PREFIX = "edge"


@pytest.fixture
def server(tmp_path: Path, db_url: str, broker: Broker) -> Iterator[RunningServer]:
    with running_server(tmp_path / "server", db_url, broker.url, prefix=PREFIX) as srv:
        yield srv


@pytest.fixture
async def fleet(tmp_path: Path, broker: Broker) -> AsyncIterator[Simulation]:
    async with sim_fleet(
        tmp_path,
        broker.url,
        PREFIX,
        DEVICES,
        device_type="gw",
        mqtt={"keepalive": 5},
        reconcile={"retry_backoff_initial": 0.2, "retry_backoff_max": 1.0},
    ) as sim:
        yield sim


def losant(srv: RunningServer, token: str | None = None) -> Client:
    return Client(auth_token=token or srv.token, url=srv.url)


def deployments(client: Client, app: str, **kw: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.edge_deployments.get(applicationId=app, **kw)["items"]
    return items


async def test_release_converge_replace_remove(server: RunningServer, fleet: Simulation) -> None:
    client = losant(server)
    app = server.app_id
    ids = [f"sim-{i:04d}" for i in range(1, DEVICES + 1)]

    def all_online() -> bool:
        got = client.devices.get(applicationId=app)
        return got["totalCount"] == DEVICES and all(
            d["connectionInfo"]["connected"] == 1 for d in got["items"]
        )

    await until(all_online, "the devices in the inventory")
    device = client.devices.get(applicationId=app, filter="sim-0002")["items"]
    assert [d["deviceType"] for d in device] == ["gw"]

    wasm = COUNTER_WASM.read_bytes()
    for version in ("v1", "v2"):
        r = server.upload("counter", version, wasm)
        assert r.status_code == 201, r.text
        assert r.json()["size"] == len(wasm)

    assert client.edge_deployments.release(
        applicationId=app, deployment={"flowId": "counter", "version": "v1", "deviceIds": ids}
    ) == {"success": True}

    def at(version: str | None) -> list[dict[str, Any]] | None:
        items = deployments(client, app, flowId="counter")
        ok = len(items) == DEVICES and all(
            d["currentVersion"] == version and d["desiredVersion"] == version for d in items
        )
        return items if ok else None

    items = await until(lambda: at("v1"), "v1 on every device")
    assert {d["deviceId"] for d in items} == set(ids)
    assert all(d["status"] == "success" for d in items)

    # Replace: v1 -> v2 wherever v1 is desired.
    client.edge_deployments.replace(
        applicationId=app,
        deployment={"flowId": "counter", "oldVersion": "v1", "newVersion": "v2"},
    )
    items = await until(lambda: at("v2"), "v2 on every device")
    one = client.edge_deployment.get(applicationId=app, edgeDeploymentId=items[0]["id"])
    assert [a["version"] for a in one["attempts"]] == ["v1", "v2"]
    assert [a["status"] for a in one["attempts"]] == ["success", "success"]

    # Get's filters and sort, as Losant documents them.
    assert len(deployments(client, app, deviceId="sim-0001")) == 1
    assert len(deployments(client, app, version="v2")) == DEVICES
    assert deployments(client, app, version="v1") == []
    page = client.edge_deployments.get(
        applicationId=app, sortField="deviceId", sortDirection="desc", perPage=2, page=0
    )
    assert [d["deviceId"] for d in page["items"]] == ["sim-0003", "sim-0002"]
    assert (page["totalCount"], page["perPage"]) == (DEVICES, 2)

    # Remove from one device, then from every device.
    client.edge_deployments.remove(
        applicationId=app, deployment={"flowId": "counter", "deviceId": "sim-0001"}
    )
    await until(
        lambda: deployments(client, app, deviceId="sim-0001")[0]["currentVersion"] is None,
        "removed from sim-0001",
    )
    client.edge_deployments.remove(applicationId=app, deployment={"flowId": "counter"})
    await until(lambda: at(None), "removed everywhere")
    assert deployments(client, app, filterEmpty=True) == []


async def test_commands_by_tag_and_exports(
    server: RunningServer, fleet: Simulation, operator: Operator
) -> None:
    client = losant(server)
    app = server.app_id
    await until(
        lambda: client.devices.get(applicationId=app)["totalCount"] == DEVICES, "the inventory"
    )
    with server.http() as http:
        r = http.patch(
            f"/applications/{app}/devices/sim-0002",
            json={"name": "boiler room", "tags": [{"key": "floor", "value": "8"}]},
        )
        assert r.status_code == 200, r.text
    tagged = client.devices.get(applicationId=app, tagFilter=[{"key": "floor", "value": "8"}])[
        "items"
    ]
    assert [d["id"] for d in tagged] == ["sim-0002"]
    assert [
        d["name"] for d in client.devices.get(applicationId=app, filter="boiler*")["items"]
    ] == ["boiler room"]

    operator.subscribe(f"{PREFIX}/+/command/response")
    client.devices.send_command(
        applicationId=app,
        multiDeviceCommand={"name": "agent.ping", "deviceTags": [{"key": "floor", "value": 8}]},
    )
    answer = await operator.wait_for(
        f"{PREFIX}/sim-0002/command/response", lambda d: d.get("ok") is True, 10
    )
    assert answer["name"] == "agent.ping"
    # The untagged devices were not asked (sim-0002 answered; theirs would be as quick).
    assert operator.messages(f"{PREFIX}/sim-0001/command/response") == []
    assert operator.messages(f"{PREFIX}/sim-0003/command/response") == []

    # Devices export: a job whose file lists every device.
    job = client.devices.export(applicationId=app)
    assert job["jobQueued"] is True

    def done() -> dict[str, Any] | None:
        with server.http() as http:
            got: dict[str, Any] = http.get(f"/applications/{app}/jobs/{job['jobId']}").json()
        return got if got["status"] != "queued" else None

    result = await until(done, "the export")
    assert result["status"] == "done", result
    with server.http() as http:
        listed = http.get(f"/applications/{app}/jobs/{job['jobId']}/download").json()
    assert sorted(d["id"] for d in listed) == [f"sim-{i:04d}" for i in range(1, DEVICES + 1)]

    # Embedded export: the WASM a device runs, by the digest it reports.
    wasm = COUNTER_WASM.read_bytes()
    assert server.upload("counter", "e1", wasm).status_code == 201
    client.embedded_deployments.release(
        applicationId=app,
        deployment={"flowId": "counter", "version": "e1", "deviceIds": ["sim-0003"]},
    )
    await until(
        lambda: [
            d
            for d in client.embedded_deployments.get(applicationId=app)["items"]
            if d["currentVersion"] == "e1"
        ],
        "e1 on sim-0003",
    )
    job = client.embedded_deployments.export(applicationId=app, options={"deviceId": "sim-0003"})
    result = await until(
        lambda: done() if False else _job(server, app, job["jobId"]), "wasm export"
    )
    assert result["status"] == "done", result
    with server.http() as http:
        raw = http.get(f"/applications/{app}/jobs/{job['jobId']}/download").content
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        assert zf.read("counter.wasm") == wasm


def _job(server: RunningServer, app: str, job_id: str) -> dict[str, Any] | None:
    with server.http() as http:
        got: dict[str, Any] = http.get(f"/applications/{app}/jobs/{job_id}").json()
    return got if got["status"] != "queued" else None


async def test_errors_in_losant_shapes(server: RunningServer) -> None:
    app = server.app_id
    client = losant(server)
    with pytest.raises(LosantError) as err:
        losant(server, "eat_not-a-token").devices.get(applicationId=app)
    assert err.value.status == 401
    with pytest.raises(LosantError) as err:
        client.devices.get(applicationId="0" * 24)
    assert err.value.status == 404
    assert err.value.data == {"type": "NotFound", "message": "Application was not found"}
    reader = losant(server, server.token_with("edgeDeployments.get"))
    assert reader.edge_deployments.get(applicationId=app)["items"] == []
    with pytest.raises(LosantError) as err:
        reader.edge_deployments.release(
            applicationId=app, deployment={"flowId": "f", "version": "v", "deviceIds": ["d"]}
        )
    assert err.value.status == 403
    with pytest.raises(LosantError) as err:
        client.edge_deployments.get(applicationId=app, sortField="nope")
    assert (err.value.status, err.value.data["type"]) == (400, "Validation")
    with pytest.raises(LosantError) as err:
        client.edge_deployments.release(
            applicationId=app, deployment={"flowId": "f", "version": "v", "deviceIds": ["nope"]}
        )
    assert err.value.status == 404
    with pytest.raises(LosantError) as err:
        client.edge_deployments.release(applicationId=app, deployment={"flowId": "../x"})
    assert err.value.status == 400

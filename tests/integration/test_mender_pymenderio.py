"""Mender's deployments driven by a third-party Mender client, ``pymenderio`` (PyPI,
unmodified), against the real server with real sim agents on a real Mosquitto; the
artifacts written by the real ``mender-artifact`` and uploaded as the seed says.

pymenderio creates a deployment, reads it back, its statistics, its devices and a
failed device's log, aborts one, and takes a device out of its deployments
(``abort_device``: Mender's decommission). What it cannot send (phases) goes as plain
HTTP. It lists through ``/api/management/v2/…`` with ``per_page=500`` and follows
``Link: rel="next"``. Its enum of deployment statuses lacks ``scheduled`` (which
Mender's server and the seed have), so its ``get`` is not called on a scheduled one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import wat
from broker import Broker
from common import until
from mender_tools import upload_artifact, write_artifact
from pymenderio import MenderClient
from pymenderio.exceptions import NotFoundError, ValidationError
from server_harness import RunningServer, running_server

from agent.device.config import AgentConfig
from agent.fleet.sim import Simulation

PREFIX = "edge"
V1 = "/api/management/v1/deployments"
#: sim-0001, sim-0002: gw (a good payload); sim-0003: gw-bad (a payload that traps
#: at start-up); sim-0004: other (no artifact of the name).
TYPES = {1: "gw", 2: "gw", 3: "gw-bad", 4: "other"}
DEVICES = [f"sim-{i:04d}" for i in TYPES]


@pytest.fixture
def server(tmp_path: Path, broker: Broker) -> Iterator[RunningServer]:
    url = f"sqlite:///{tmp_path / 'server.db'}"
    settings = {"rollout_tick_s": 0.2}
    with running_server(tmp_path / "srv", url, broker.url, prefix=PREFIX, settings=settings) as srv:
        yield srv


@pytest.fixture
async def sims(server: RunningServer, tmp_path: Path, broker: Broker) -> AsyncIterator[Simulation]:
    def customize(index: int, data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "device_type": TYPES[index]}

    base = AgentConfig.model_validate(
        {
            "device_id": "sim",
            "state_dir": str(tmp_path / "unused"),
            "mqtt": {"broker": broker.url, "topic_prefix": PREFIX, "keepalive": 5},
            "reconcile": {"retry_backoff_initial": 0.2, "retry_backoff_max": 1.0},
            # (pymenderio cannot send this project's health window: the agents' own.)
            "health": {"window_s": 0.5},
        }
    )
    async with Simulation(base, len(TYPES), tmp_path / "sim", customize=customize) as sim:
        await until(lambda: known(server) >= set(DEVICES), "the devices known")
        yield sim


def known(srv: RunningServer) -> set[str]:
    with srv.http() as c:
        items = c.get(f"/applications/{srv.app_id}/devices").json()["items"]
    return {d["id"] for d in items if d.get("deviceType")}


def artifacts(srv: RunningServer, root: Path) -> None:
    for tag, types, payload in (
        ("good", ["gw"], wat.reactor("good")),
        ("bad", ["gw-bad"], wat.trap_on_start()),
    ):
        path = write_artifact(
            root / tag,
            bytes(payload),
            name="app-1.0",
            device_types=types,
            software_name="app",
            software_version="1.0",
        )
        r = upload_artifact(srv.url, srv.token, path, description=tag)
        assert r.status_code == 201, r.text


async def test_pymenderio_drives_deployments(
    server: RunningServer, sims: Simulation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy"):  # (httpx, under pymenderio, reads the environment)
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    artifacts(server, tmp_path)
    with MenderClient(server=server.url, token=server.token) as client:
        rid = client.deployments.create(
            name="first", artifact_name="app-1.0", devices=DEVICES, retries=0
        )
        got = client.deployments.get(rid)
        assert (got.id, got.name, got.artifact_name, got.device_count) == (
            rid,
            "first",
            "app-1.0",
            4,
        )
        assert len(got.artifacts) == 2  # one per device type of the name

        def done() -> bool:
            return client.deployments.get(rid).status.value == "finished"

        await until(done, "the deployment to finish")
        stats = client.deployments.stats(rid)
        assert (stats.success, stats.failure, stats.noartifact, stats.total) == (2, 1, 1, 4)
        devices = {d.id: d for d in client.deployments.devices(rid)}
        assert {k: v.status.value for k, v in devices.items()} == {
            "sim-0001": "success",
            "sim-0002": "success",
            "sim-0003": "failure",
            "sim-0004": "noartifact",
        }
        assert devices["sim-0004"].device_type == "other"
        assert devices["sim-0003"].substate
        assert "trapped" in devices["sim-0003"].substate
        # The failed device's log, as text; none for a device that did not fail.
        await until(lambda: client.deployments.devices(rid)[2].log, "the log to be stored")
        text = client.deployments.log(rid, "sim-0003")
        assert "trapped" in text
        assert client.deployments.try_log(rid, "sim-0001") is None
        with pytest.raises(NotFoundError):
            client.deployments.get("00000000-0000-0000-0000-000000000000")

        # Abort: a finished one is a 422 (pymenderio's ValidationError) ...
        with pytest.raises(ValidationError):
            client.deployments.abort(rid)
        # ... a scheduled one (phases, which only plain HTTP can send) ends at once.
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        latest = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
        with server.http() as c:
            r = c.post(
                f"{V1}/deployments",
                json={
                    "name": "scheduled",
                    "artifact_name": "app-1.0",
                    "devices": DEVICES[:2],
                    "phases": [{"batch_size": 50, "start_ts": later}, {"start_ts": latest}],
                },
            )
            assert r.status_code == 201, r.text
            scheduled = r.headers["location"].rsplit("/", 1)[1]
            assert c.get(f"{V1}/deployments/{scheduled}").json()["status"] == "scheduled"
        # Decommission: the device leaves the deployments it has not finished.
        client.deployments.abort_device("sim-0002")
        states = {d.id: d.status.value for d in client.deployments.devices(scheduled)}
        assert states == {"sim-0001": "pending", "sim-0002": "decommissioned"}
        assert {d.id: d.status.value for d in client.deployments.devices(rid)}["sim-0002"] == (
            "success"
        )  # a finished deployment keeps its statuses
        client.deployments.abort(scheduled)
        after = client.deployments.get(scheduled)
        assert after.status.value == "finished"
        assert {d.id: d.status.value for d in client.deployments.devices(scheduled)} == {
            "sim-0001": "aborted",
            "sim-0002": "decommissioned",
        }
        # The list (v2, paged by Link headers), newest first, and its filters.
        listed = client.deployments.list()
        assert [d.id for d in listed] == [scheduled, rid]
        assert [d.id for d in client.deployments.list(status="finished")] == [scheduled, rid]
        assert client.deployments.list(status="inprogress") == []
        assert client.deployments.list(created_before=0) == []


def test_paging_links_as_the_seed(server: RunningServer) -> None:
    """``Link`` with first/prev/next, as the seed and pymenderio's pager read them."""
    server.upload("f1", "v1", bytes(wat.reactor("x")))
    with server.http() as c:
        made = []
        for i in range(5):
            # (A device per deployment: one is in at most one unfinished deployment
            # of a flow.)
            r = c.post(
                f"/applications/{server.app_id}/devices",
                json={"name": f"d{i + 1}", "deviceId": f"d{i + 1}"},
            )
            assert r.status_code == 201, r.text
            r = c.post(
                f"{V1}/deployments",
                json={"name": f"n{i}", "artifact_name": "f1-v1", "devices": [f"d{i + 1}"]},
            )
            assert r.status_code == 201, r.text
            made.append(r.headers["location"].rsplit("/", 1)[1])
        page = c.get(f"{V1}/deployments", params={"per_page": 2, "page": 2})
        assert page.status_code == 200
        assert [d["id"] for d in page.json()] == made[::-1][2:4]
        assert page.headers["x-total-count"] == "5"
        links = httpx.Response(200, headers={"link": page.headers["link"]}).links
        assert set(links) == {"first", "prev", "next"}
        assert "page=3" in links["next"]["url"]
        assert "per_page=2" in links["next"]["url"]
        last = c.get(f"{V1}/deployments", params={"per_page": 2, "page": 3})
        assert "next" not in httpx.Response(200, headers={"link": last.headers["link"]}).links
        assert [d["name"] for d in c.get(f"{V1}/deployments", params={"search": "n3"}).json()] == [
            "n3"
        ]
        assert c.get(f"{V1}/deployments", params={"search": "%"}).json() == []
        one = c.get(f"{V1}/deployments/{made[0]}/devices/list", params={"per_page": 1})
        assert [d["id"] for d in one.json()] == ["d1"]
        assert "next" not in httpx.Response(200, headers={"link": one.headers["link"]}).links

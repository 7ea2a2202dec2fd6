"""Mender's deployments run by the server's rollout engine, end to end: a real server
(uvicorn, SQLite or PostgreSQL), real Mosquitto, real sim agents running real wasm.

Phases start on time and only after the earlier ones are healthy; a version that
traps in its health window stops the rollout at the failure threshold and the failed
devices run the previous version again; an abort in the middle; a server restarted
mid-rollout carries on; a dynamic rollout enrols a device that appears later; a
device is decommissioned from its rollouts; a device decommissioned through Losant's
API or given another release ends its part (the rollout does not wait for it
forever); bad input is refused with nothing stored.

Races need exact interleavings: there the engine looks only when the test says so
(:class:`ManualEngine`, the server's own engine without its thread), and some
devices are *scripted*: known to the server, their state reports published by the
test over the broker (what an agent would send at that moment), so that a report
lands between two given steps. Everything else is real (server, broker, inventory,
desired writer, and real sim agents where the timing does not matter).

Every flow here answers ``f1.version`` (:func:`wat.versioned_flow`); which version a
device runs is read from its own state report (the Losant records the server keeps).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import wat
from broker import Broker, Operator
from common import until
from pydantic import TypeAdapter
from server_harness import RunningServer, running_server
from sqlalchemy import update

from agent.device.config import AgentConfig
from agent.fleet.sim import Simulation
from agent.server.api import mender_deployments as api
from agent.server.context import ServerContext
from agent.server.db import devices as devices_repo
from agent.server.db.models import Device
from agent.server.service import rollouts as rollouts_service
from agent.server.service.rollout_engine import RolloutEngine

PREFIX = "edge"
V1 = "/api/management/v1/deployments"
TRIGGERS = [{"type": "command", "command": "f1.version"}]
TICKING = [*TRIGGERS, {"type": "interval", "ms": 100}]
AGENT: dict[str, Any] = {
    "device_type": "gw",
    "mqtt": {"keepalive": 5, "reconnect_min": 0.05, "reconnect_max": 0.5},
    "reconcile": {"retry_backoff_initial": 0.2, "retry_backoff_max": 1.0, "state_coalesce_ms": 20},
    "sandbox": {"call_deadline_ms": 1000, "restart_backoff_initial": 0.05},
}


@pytest.fixture
def server(tmp_path: Path, broker: Broker) -> Iterator[RunningServer]:
    url = f"sqlite:///{tmp_path / 'server.db'}"
    with running_server(
        tmp_path / "server", url, broker.url, prefix=PREFIX, settings={"rollout_tick_s": 0.2}
    ) as srv:
        yield srv


def fleet(root: Path, broker: Broker, count: int, first: int = 1, **over: Any) -> Simulation:
    data = {**AGENT, **over}
    data["mqtt"] = {**data["mqtt"], "broker": broker.url, "topic_prefix": PREFIX}
    base = AgentConfig.model_validate(
        {"device_id": "sim", "state_dir": str(root / "unused"), **data}
    )
    return Simulation(base, count, root / f"sim-{first}", first=first)


@pytest.fixture
async def sims(server: RunningServer, tmp_path: Path, broker: Broker) -> AsyncIterator[Simulation]:
    """Four devices of type gw, in the server's inventory."""
    async with fleet(tmp_path, broker, 4) as sim:
        await until(lambda: set(ids(4)) <= set(known_types(server)), "the devices known")
        yield sim


def ids(n: int, first: int = 1) -> list[str]:
    return [f"sim-{i:04d}" for i in range(first, first + n)]


def upload(srv: RunningServer, version: str, data: bytes, triggers: list[Any]) -> None:
    r = srv.upload("f1", version, bytes(data), manifest=json.dumps({"triggers": triggers}))
    assert r.status_code == 201, r.text


def mender(srv: RunningServer) -> httpx.Client:
    return srv.http()


def create(srv: RunningServer, body: dict[str, Any]) -> str:
    with mender(srv) as c:
        r = c.post(f"{V1}/deployments", json=body)
    assert r.status_code == 201, r.text
    assert r.content == b""
    location = r.headers["location"]
    assert location.startswith(f"{V1}/deployments/")
    return location.rsplit("/", 1)[1]


def get(srv: RunningServer, path: str) -> Any:
    with mender(srv) as c:
        r = c.get(f"{V1}/deployments/{path}")
    assert r.status_code == 200, r.text
    return r.json()


def events(srv: RunningServer, rid: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = get(srv, f"{rid}/events")
    return got


def started_at(srv: RunningServer, rid: str, phase: int) -> datetime:
    found = [e for e in events(srv, rid) if e["kind"] == "phase_started"]
    times = [e["time"] for e in found if e["detail"]["phase"] == phase]
    assert len(times) == 1, found
    return datetime.fromisoformat(times[0])


def finished(srv: RunningServer, rid: str) -> dict[str, Any] | None:
    d: dict[str, Any] = get(srv, rid)
    return d if d["status"] == "finished" else None


def statuses(srv: RunningServer, rid: str) -> dict[str, str]:
    return {d["id"]: d["status"] for d in get(srv, f"{rid}/devices")}


def running(srv: RunningServer) -> dict[str, str | None]:
    """Device → the version of f1 its report says runs."""
    with srv.http() as c:
        r = c.get(f"/applications/{srv.app_id}/edge/deployments", params={"flowId": "f1"})
    return {d["deviceId"]: d["currentVersion"] for d in r.json()["items"]}


def desired_entry(srv: RunningServer, device_id: str, flow: str = "f1") -> dict[str, Any]:
    """The device's desired entry of ``flow`` (what it was told), or {}."""
    with srv.ctx.db.transaction() as s:
        dev = devices_repo.get(s, srv.app_id, device_id)
        assert dev is not None
        entry = (dev.desired.get("flows") or {}).get(flow)
        return entry if isinstance(entry, dict) else {}


def desired_ids(srv: RunningServer, device_id: str) -> str | None:
    """The deploymentId of f1 in the device's desired document (what it was told)."""
    return desired_entry(srv, device_id).get("deploymentId")


def conforms(model: Any, data: Any) -> None:
    """``data`` (a real answer) is what the OpenAPI document says it is."""
    TypeAdapter(model).validate_python(data)


def in_(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def deploy_v1_everywhere(srv: RunningServer, devices: list[str]) -> None:
    upload(srv, "v1", wat.versioned_flow("v1"), TRIGGERS)
    rid = create(
        srv,
        {"name": "v1", "artifact_name": "f1-v1", "devices": devices, "edge": {"health_window": 0}},
    )
    await until(lambda: finished(srv, rid), "v1 everywhere")
    assert set(statuses(srv, rid).values()) == {"success"}


# ------------------------------------------------------------------ phases on time
async def test_three_phases_start_on_time_after_healthy_ones(
    server: RunningServer, sims: Simulation
) -> None:
    upload(server, "v1", wat.versioned_flow("v1"), TRIGGERS)
    second, third = in_(4), in_(5)
    rid = create(
        server,
        {
            "name": "three phases",
            "artifact_name": "f1-v1",
            "devices": ids(4),
            "phases": [
                {"batch_size": 25},
                {"batch_size": 34, "start_ts": second},
                {"start_ts": third},
            ],
            "retries": 1,
            "edge": {"health_window": 1},
        },
    )
    d = get(server, rid)
    assert d["status"] in ("pending", "inprogress")
    assert [p["batch_size"] for p in d["phases"]] == [25, 34, None]
    assert [p["number"] for p in d["edge"]["phases"]] == [0, 1, 2]
    # 25% of 4 = 1; 34% of the 3 left = 1; the rest = 2.
    assert [p["devices"] for p in d["edge"]["phases"]] == [1, 1, 2]
    assert get(server, f"{rid}/device_list") == ids(4)

    done = await until(lambda: finished(server, rid), "the rollout to finish", timeout=40)
    assert get(server, f"{rid}/statistics") == {
        "success": 4,
        "pending": 0,
        "downloading": 0,
        "installing": 0,
        "rebooting": 0,
        "failure": 0,
        "noartifact": 0,
        "already-installed": 0,
        "aborted": 0,
        "decommissioned": 0,
    }
    assert [p["device_count"] for p in done["phases"]] == [1, 1, 2]
    assert done["finished"] is not None
    assert done["artifacts"]
    # Phase 2 started at its start time, not before; each phase only once the
    # earlier ones were all healthy (the health window over, not just installed).
    log = events(server, rid)
    p1, p2 = started_at(server, rid, 1), started_at(server, rid, 2)
    assert p1 >= datetime.fromisoformat(second)
    assert p2 >= datetime.fromisoformat(third)
    first_device = ids(4)[0]
    healthy = [
        datetime.fromisoformat(e["time"])
        for e in log
        if e["kind"] == "device_status" and e["detail"]["status"] == "success"
    ]
    rebooting = [
        e for e in log if e["kind"] == "device_status" and e["detail"]["status"] == "rebooting"
    ]
    assert {e["device_id"] for e in rebooting} >= {first_device}  # the health window was seen
    assert min(healthy) <= p1
    assert sorted(healthy)[1] <= p2
    assert set(running(server).values()) == {"v1"}
    entries = get(server, f"{rid}/devices")
    assert {e["state"] for e in entries} == {"success"}
    assert all(e["device_type"] == "gw" and e["log"] is False for e in entries)
    # The answers are what the OpenAPI document says.
    conforms(api.Deployment, done)
    conforms(list[api.Device], entries)
    conforms(api.DeploymentStatistics, get(server, f"{rid}/statistics"))
    conforms(list[api.Event], log)
    with mender(server) as c:
        listed = c.get(f"{V1}/deployments").json()
    conforms(list[api.Deployment], listed)


# ------------------------------------------------------------------ threshold, revert
async def test_failure_threshold_stops_and_failed_devices_revert(
    server: RunningServer, sims: Simulation
) -> None:
    await deploy_v1_everywhere(server, ids(4))
    upload(server, "v2", wat.versioned_flow("v2", trap_from_tick=5), TICKING)
    rid = create(
        server,
        {
            "name": "breaks",
            "artifact_name": "f1-v2",
            "devices": ids(4),
            "phases": [{"batch_size": 50}, {"start_ts": in_(1)}],
            "edge": {"health_window": 5, "failure_threshold": 20},
        },
    )
    done = await until(lambda: finished(server, rid), "the threshold to stop it", timeout=40)
    assert done["edge"]["stopped"] == "2 of 2 devices failed, over the threshold 20%"
    assert done["edge"]["aborted"] is False
    got = statuses(server, rid)
    first, later = ids(2), ids(2, first=3)
    assert [got[d] for d in first] == ["failure", "failure"]
    assert [got[d] for d in later] == ["aborted", "aborted"]
    kinds = [e["kind"] for e in events(server, rid)]
    assert "stopped" in kinds
    assert kinds[-1] == "finished"
    assert [e for e in events(server, rid) if e["kind"] == "phase_started"][-1]["detail"] == {
        "phase": 0
    }
    # The failed devices run v1 again (their agents reverted); the others never got v2.
    versions = await until(
        lambda: (v := running(server)) and all(v[d] == "v1" for d in ids(4)) and v,
        "v1 everywhere again",
    )
    assert set(versions.values()) == {"v1"}
    attempt_ids = {desired_ids(server, d) for d in later}
    assert all(a is not None for a in attempt_ids)
    # (The later devices' desired f1 is still the v1 rollout's entry.)
    assert not any(
        e["device_id"] in later for e in events(server, rid) if e["kind"] == "device_started"
    )
    # The failed devices' deployment logs, as text.
    with mender(server) as c:
        text = await until(
            lambda: (
                (r := c.get(f"{V1}/deployments/{rid}/devices/{first[0]}/log")).status_code == 200
                and r
            ),
            "the deployment log",
        )
        assert text.headers["content-type"].startswith("text/plain")
        assert "unreachable" in text.text
        lines = text.text.splitlines()
        assert lines
        assert all(len(line.split(" ", 2)) == 3 for line in lines)
        assert c.get(f"{V1}/deployments/{rid}/devices/{later[0]}/log").status_code == 404
    assert [d["log"] for d in get(server, f"{rid}/devices") if d["id"] in first] == [True, True]
    # Finished: an abort now is a 422, and the statuses stay.
    with mender(server) as c:
        r = c.put(f"{V1}/deployments/{rid}/status", json={"status": "aborted"})
    assert r.status_code == 422, r.text
    assert "error" in r.json()


# ------------------------------------------------------------------ abort, decommission
async def test_abort_in_the_middle(server: RunningServer, sims: Simulation) -> None:
    await deploy_v1_everywhere(server, ids(4))
    upload(server, "v2", wat.versioned_flow("v2"), TRIGGERS)
    rid = create(
        server,
        {
            "name": "to abort",
            "artifact_name": "f1-v2",
            "devices": ids(4),
            "phases": [
                {"batch_size": 25},
                {"batch_size": 34, "start_ts": in_(0.5)},
                {"start_ts": in_(3600)},
            ],
            "edge": {"health_window": 2},
        },
    )
    # Phase 0 healthy, phase 1's device inside its health window (rebooting).
    await until(
        lambda: statuses(server, rid)[ids(4)[1]] == "rebooting", "phase 1 in its health window"
    )
    assert statuses(server, rid)[ids(4)[0]] == "success"
    # Decommissioned from its rollouts: the device of the last phase.
    with mender(server) as c:
        assert c.delete(f"{V1}/deployments/devices/{ids(4)[3]}").status_code == 204
        r = c.put(f"{V1}/deployments/{rid}/status", json={"status": "aborted"})
        assert r.status_code == 204, r.text
        assert r.content == b""
    done = get(server, rid)
    assert done["status"] == "finished"
    assert done["edge"]["aborted"] is True
    got = statuses(server, rid)
    assert [got[d] for d in ids(4)] == ["success", "aborted", "aborted", "decommissioned"]
    # The device in progress goes back to v1; the finished one keeps v2; the devices
    # that had not started never got the rollout's entry.
    await until(lambda: running(server)[ids(4)[1]] == "v1", "the aborted device to revert")
    assert running(server)[ids(4)[0]] == "v2"
    started = {e["device_id"] for e in events(server, rid) if e["kind"] == "device_started"}
    assert started == set(ids(2))
    stats = get(server, f"{rid}/statistics")
    assert (stats["success"], stats["aborted"], stats["decommissioned"]) == (1, 2, 1)
    await asyncio.sleep(0.5)
    assert get(server, f"{rid}/statistics") == stats  # finished: nothing moves any more


# ------------------------------------------------------------------ a replaced entry
async def test_a_device_decommissioned_or_given_another_release_ends_its_part(
    server: RunningServer, tmp_path: Path, broker: Broker
) -> None:
    """Devices in their health window (``rebooting``) whose entry is replaced: one
    decommissioned through Losant's device API, one given another version through
    Losant's release. Their attempts will never report; the rollout does not wait
    for them (it used to stay ``inprogress`` forever)."""
    upload(server, "v1", wat.versioned_flow("v1"), TRIGGERS)
    upload(server, "v0", wat.versioned_flow("v0"), TRIGGERS)
    async with fleet(tmp_path, broker, 2):
        await until(lambda: set(ids(2)) <= set(known_types(server)), "the devices known")
        rid = create(
            server,
            {
                "name": "replaced",
                "artifact_name": "f1-v1",
                "devices": ids(2),
                "edge": {"health_window": 120},
            },
        )
        await until(
            lambda: set(statuses(server, rid).values()) == {"rebooting"}, "both in the window"
        )
        # The devices are this rollout's for flow f1: another one over them is a 409.
        with mender(server) as c:
            r = c.post(
                f"{V1}/deployments",
                json={"name": "again", "artifact_name": "f1-v0", "devices": ids(1, first=2)},
            )
            assert r.status_code == 409, r.text
            assert rid in r.json()["error"]
            # Losant's decommission takes the device out of its Mender deployments.
            r = c.delete(f"/applications/{server.app_id}/devices/sim-0001")
            assert r.status_code == 200, r.text
            r = c.post(
                f"/applications/{server.app_id}/edge/deployments/release",
                json={"flowId": "f1", "version": "v0", "deviceIds": ["sim-0002"]},
            )
            assert r.status_code == 201, r.text
        release = desired_ids(server, "sim-0002")
        done = await until(lambda: finished(server, rid), "the rollout to finish by itself")
        assert done["edge"]["aborted"] is False
        got = {d["id"]: d for d in get(server, f"{rid}/devices")}
        assert got["sim-0001"]["status"] == "decommissioned"
        assert got["sim-0001"]["substate"] == "the device was decommissioned"
        assert got["sim-0002"]["status"] == "aborted"
        assert got["sim-0002"]["substate"] == (
            f"superseded by a release of version 'v0' (attempt {release})"
        )
        # The release was not touched by the rollout's end: sim-0002 runs v0.
        await until(lambda: running(server).get("sim-0002") == "v0", "v0 on sim-0002")
        assert desired_ids(server, "sim-0002") == release
    kinds = [(e["kind"], e["device_id"]) for e in events(server, rid)]
    assert ("device_decommissioned", "sim-0001") in kinds
    assert kinds[-1] == ("finished", None)


# ------------------------------------------------------------------ look by look
class ManualEngine(RolloutEngine):
    """The server's rollout engine without its thread: it looks when the test calls
    :meth:`tick`, so that a report or a request lands exactly between two looks."""

    def run(self, stop: Any) -> None:
        stop.wait()


@pytest.fixture
def manual(tmp_path: Path, broker: Broker) -> Iterator[RunningServer]:
    srv = RunningServer(
        tmp_path / "manual", f"sqlite:///{tmp_path / 'manual.db'}", broker.url, prefix=PREFIX
    )
    srv.ctx.engine = ManualEngine(srv.ctx)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def scripted(srv: RunningServer, *device_ids: str, device_type: str = "gw") -> None:
    """Devices known to the server whose reports the test publishes (no agent)."""
    with srv.http() as c:
        for device_id in device_ids:
            r = c.post(
                f"/applications/{srv.app_id}/devices",
                json={"deviceId": device_id, "name": device_id, "deviceType": device_type},
            )
            assert r.status_code == 201, r.text


async def report(
    srv: RunningServer, op: Operator, device_id: str, status: str, attempt: str | None
) -> None:
    """Publish the device's state report (f1 at ``status`` for ``attempt``), as its
    agent would, and wait until the server recorded it."""
    at = datetime.now(UTC).isoformat(timespec="milliseconds")
    doc = {
        "deviceId": device_id,
        "generation": 99,
        "time": at,
        "flows": {
            "f1": {
                "deploymentId": attempt,
                "status": status,
                "desiredVersion": "v1",
                "currentVersion": "v1" if status == "success" else None,
                "error": None,
                "retryAt": None,
            }
        },
    }
    op.publish(f"{PREFIX}/{device_id}/state", doc, retain=True)

    def recorded() -> bool:
        with srv.ctx.db.transaction() as s:
            dev = devices_repo.get(s, srv.app_id, device_id)
            return dev is not None and (dev.state or {}).get("time") == at

    await until(recorded, f"{device_id}'s report recorded")


async def test_an_abort_is_durable_first_and_reverts_only_what_is_in_progress(
    manual: RunningServer,
    tmp_path: Path,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between two looks of the engine: sim-0001 (a real agent) installs and reports
    ``success``; then the abort. It must keep ``success`` and never get an abort
    entry (the abort reads the reports first). The abort commits first and answers;
    its entries are written after (here by the engine's next look, as after a crash
    in between): a device whose report turned final meanwhile is not reverted, one
    that got a newer release keeps it, a silent one gets its abort entry, with the
    rollout's ``revert: false``."""
    srv = manual
    monkeypatch.setattr(rollouts_service, "SYNC_ABORTS", 0)  # (the engine writes them)
    upload(srv, "v1", wat.versioned_flow("v1"), TRIGGERS)
    upload(srv, "v0", wat.versioned_flow("v0"), TRIGGERS)
    scripted(srv, "g-silent", "g-late", "g-released")
    op = Operator(broker).connect()
    try:
        async with fleet(tmp_path, broker, 1):
            await until(lambda: "sim-0001" in known_types(srv), "the device known")
            devices = ["sim-0001", "g-late", "g-released", "g-silent"]
            rid = create(
                srv,
                {
                    "name": "abort",
                    "artifact_name": "f1-v1",
                    "devices": devices,
                    "edge": {"health_window": 0, "revert": False},
                },
            )
            srv.ctx.engine.tick()  # starts all four
            attempts = {d: desired_ids(srv, d) for d in devices}
            assert all(attempts.values())
            await until(lambda: running(srv).get("sim-0001") == "v1", "sim-0001 runs v1")
            assert statuses(srv, rid)["sim-0001"] == "pending"  # (no look since)
            with mender(srv) as c:
                r = c.put(f"{V1}/deployments/{rid}/status", json={"status": "aborted"})
            assert r.status_code == 204, r.text
            # Durable: finished, aborted; sim-0001 keeps its success.
            done = get(srv, rid)
            assert (done["status"], done["edge"]["aborted"]) == ("finished", True)
            assert statuses(srv, rid) == {
                "sim-0001": "success",
                "g-late": "aborted",
                "g-released": "aborted",
                "g-silent": "aborted",
            }
            assert not desired_entry(srv, "sim-0001").get("abort")
            assert not any(desired_entry(srv, d).get("abort") for d in devices)
            # Before the entries are written: g-late finishes, g-released gets v0.
            await report(srv, op, "g-late", "success", attempts["g-late"])
            with mender(srv) as c:
                r = c.post(
                    f"/applications/{srv.app_id}/edge/deployments/release",
                    json={"flowId": "f1", "version": "v0", "deviceIds": ["g-released"]},
                )
                assert r.status_code == 201, r.text
            release = desired_ids(srv, "g-released")
            srv.ctx.engine.tick()
            silent = desired_entry(srv, "g-silent")
            assert (silent["abort"], silent["revert"]) == (True, False)
            assert silent["deploymentId"] == attempts["g-silent"]
            assert not desired_entry(srv, "g-late").get("abort")
            assert desired_entry(srv, "g-released") == {
                **desired_entry(srv, "g-released"),
                "deploymentId": release,
                "version": "v0",
            }
            assert not desired_entry(srv, "g-released").get("abort")
            assert desired_ids(srv, "sim-0001") == attempts["sim-0001"]
            assert statuses(srv, rid) == {
                "sim-0001": "success",
                "g-late": "success",
                "g-released": "aborted",
                "g-silent": "aborted",
            }
            written = [e for e in events(srv, rid) if e["kind"] == "aborts_written"]
            assert [e["detail"]["devices"] for e in written] == [["g-silent"]]
            assert written[0]["detail"]["finished_before"] == ["g-late"]
            srv.ctx.engine.tick()  # (nothing left to do: written once)
            assert len([e for e in events(srv, rid) if e["kind"] == "aborts_written"]) == 1
            assert running(srv)["sim-0001"] == "v1"
    finally:
        op.close()


async def test_enrolment_reads_late_stamps_and_skips_held_devices(
    manual: RunningServer,
) -> None:
    """A dynamic rollout's scan reads the device rows changed since the last one,
    with a minute of slack: a row stamped 20 s before the scan (another process's
    clock, or a commit that came late) is still enrolled. A device another
    unfinished rollout of the same flow holds is left out until it is let go."""
    srv = manual
    upload(srv, "v1", wat.versioned_flow("v1"), TRIGGERS)
    scripted(srv, "g1", "g2")
    held = create(srv, {"name": "static", "artifact_name": "f1-v1", "devices": ["g1"]})
    srv.ctx.engine.tick()
    rid = create(
        srv,
        {
            "name": "dynamic",
            "artifact_name": "f1-v1",
            "filter": {"terms": [TYPE_GW]},
            "dynamic": True,
            "max_devices": 3,
        },
    )
    assert get(srv, rid)["initial_device_count"] == 1  # g2 (g1 is held)
    srv.ctx.engine.tick()
    assert statuses(srv, rid) == {"g2": "pending"}
    with mender(srv) as c:
        r = c.post(
            f"{V1}/deployments", json={"name": "n", "artifact_name": "f1-v1", "devices": ["g2"]}
        )
    assert r.status_code == 409, r.text
    assert rid in r.json()["error"]
    scanned = datetime.now(UTC)
    scripted(srv, "g3")
    with srv.ctx.db.transaction() as s:  # (its row as a process 20 s behind stamps it)
        s.execute(
            update(Device)
            .where(Device.application_id == srv.app_id, Device.id == "g3")
            .values(last_updated=scanned - timedelta(seconds=20))
        )
    srv.ctx.engine.tick()
    assert set(statuses(srv, rid)) == {"g2", "g3"}
    # Let go (the static rollout aborted): g1 is enrolled at the next scan.
    with mender(srv) as c:
        r = c.put(f"{V1}/deployments/{held}/status", json={"status": "aborted"})
    assert r.status_code == 204, r.text
    srv.ctx.engine.tick()
    assert set(statuses(srv, rid)) == {"g1", "g2", "g3"}
    enrolled = [e["device_id"] for e in events(srv, rid) if e["kind"] == "device_enrolled"]
    assert enrolled == ["g3", "g1"]


async def test_a_device_that_never_reports_fails_after_the_device_timeout(
    manual: RunningServer,
) -> None:
    """``edge.device_timeout``: a started device with no final status within it is a
    ``failure``, so the later phases (and the end) do not wait for it forever."""
    srv = manual
    upload(srv, "v1", wat.versioned_flow("v1"), TRIGGERS)
    scripted(srv, "g1", "g2")
    rid = create(
        srv,
        {
            "name": "timeout",
            "artifact_name": "f1-v1",
            "devices": ["g1", "g2"],
            "phases": [{"batch_size": 50}, {"start_ts": in_(0.5)}],
            "edge": {"device_timeout": 1},
        },
    )
    srv.ctx.engine.tick()
    assert statuses(srv, rid) == {"g1": "pending", "g2": "pending"}
    assert get(srv, rid)["phases"][1]["device_count"] == 0
    await asyncio.sleep(1.1)
    srv.ctx.engine.tick()  # g1 times out; phase 1 starts (no threshold: Mender's way)
    got = {d["id"]: d for d in get(srv, f"{rid}/devices")}
    assert (got["g1"]["status"], got["g1"]["substate"]) == (
        "failure",
        "no final report within 1 s",
    )
    assert get(srv, rid)["phases"][1]["device_count"] == 1
    assert statuses(srv, rid)["g2"] == "pending"  # (sent; its own second starts now)
    assert get(srv, rid)["status"] == "inprogress"


# ------------------------------------------------------------------ restart
@pytest.fixture
def any_server(tmp_path: Path, broker: Broker, db_url: str) -> Iterator[RunningServer]:
    settings = {"rollout_tick_s": 0.2}
    with running_server(
        tmp_path / "srv", db_url, broker.url, prefix=PREFIX, settings=settings
    ) as srv:
        yield srv


async def test_a_restarted_server_carries_on(
    any_server: RunningServer, tmp_path: Path, broker: Broker
) -> None:
    """On PostgreSQL two server processes run the rest at once: one engine per
    rollout at a time (each phase and device started once)."""
    server = any_server
    upload(server, "v1", wat.versioned_flow("v1"), TRIGGERS)
    async with fleet(tmp_path, broker, 4):
        await until(lambda: set(ids(4)) <= set(known_types(server)), "the devices known")
        second = in_(3)
        rid = create(
            server,
            {
                "name": "across a restart",
                "artifact_name": "f1-v1",
                "devices": ids(4),
                "phases": [{"batch_size": 50}, {"start_ts": second}],
                "edge": {"health_window": 0},
            },
        )
        await until(
            lambda: [statuses(server, rid)[d] for d in ids(2)] == ["success"] * 2,
            "phase 0 done",
        )
        server.stop()
        stopped = datetime.now(UTC)
        assert stopped < datetime.fromisoformat(second), "phase 1 was not to start yet"
        await asyncio.sleep((datetime.fromisoformat(second) - stopped).total_seconds() + 0.5)
        server.ctx = ServerContext(server.cfg)  # a new process on the same database
        other = None
        if server.ctx.db.is_postgres:
            other = ServerContext(server.cfg.model_copy(update={"instance": "other"}))
            other.start()
        server.start()
        try:
            done = await until(lambda: finished(server, rid), "the rollout to finish")
        finally:
            if other is not None:
                other.stop()
    assert started_at(server, rid, 1) > stopped
    assert set(statuses(server, rid).values()) == {"success"}
    assert done["phases"][1]["device_count"] == 2
    log = events(server, rid)
    assert sorted(e["device_id"] for e in log if e["kind"] == "device_started") == ids(4)
    assert [e["detail"]["phase"] for e in log if e["kind"] == "phase_started"] == [0, 1]
    assert [e["kind"] for e in log].count("finished") == 1


# ------------------------------------------------------------------ dynamic enrolment
async def test_a_dynamic_rollout_enrols_a_device_that_appears_later(
    server: RunningServer, tmp_path: Path, broker: Broker
) -> None:
    upload(server, "v1", wat.versioned_flow("v1"), TRIGGERS)
    async with fleet(tmp_path, broker, 2) as first:
        await first.wait_connected()
        # An "other" device that must not be enrolled.
        async with fleet(tmp_path, broker, 1, first=5, device_type="other"):
            await until(lambda: len(known_types(server)) == 3, "three devices known")
            rid = create(
                server,
                {
                    "name": "dynamic",
                    "artifact_name": "f1-v1",
                    "filter": {
                        "terms": [
                            {
                                "scope": "inventory",
                                "attribute": "device_type",
                                "type": "$eq",
                                "value": "gw",
                            }
                        ]
                    },
                    "dynamic": True,
                    "max_devices": 3,
                    "edge": {"health_window": 0},
                },
            )
            d = get(server, rid)
            assert (d["initial_device_count"], d["dynamic"], d["max_devices"]) == (2, True, 3)
            assert d["filter"]["terms"][0]["value"] == "gw"
            await until(lambda: set(statuses(server, rid).values()) == {"success"}, "the first two")
            assert get(server, rid)["status"] == "inprogress"  # still waiting for a third
            async with fleet(tmp_path, broker, 1, first=3):
                done = await until(lambda: finished(server, rid), "the late device enrolled")
    assert done["device_count"] == 3
    assert set(statuses(server, rid)) == set(ids(3))
    enrolled = [e["device_id"] for e in events(server, rid) if e["kind"] == "device_enrolled"]
    assert enrolled == ["sim-0003"]


TYPE_GW = {"scope": "inventory", "attribute": "device_type", "type": "$eq", "value": "gw"}


def known_types(srv: RunningServer) -> dict[str, str]:
    with srv.http() as c:
        items = c.get(f"/applications/{srv.app_id}/devices").json()["items"]
    return {d["id"]: d["deviceType"] for d in items if d.get("deviceType")}


# ------------------------------------------------------------------ bad input
def test_bad_input_is_refused_and_nothing_is_stored(server: RunningServer) -> None:
    upload(server, "v1", wat.versioned_flow("v1"), TRIGGERS)
    with server.http() as c:
        for i in range(1, 12):
            r = c.post(
                f"/applications/{server.app_id}/devices",
                json={"name": f"d{i}", "deviceId": f"d{i:02d}"},
            )
            assert r.status_code == 201, r.text
    eleven = [f"d{i:02d}" for i in range(1, 12)]
    good: dict[str, Any] = {"name": "n", "artifact_name": "f1-v1", "devices": eleven}
    bad: list[tuple[int, dict[str, Any], str]] = [
        (422, {**good, "artifact_name": "nope"}, "No artifact named"),
        # The seed's example: 5% of 11 devices rounds to zero.
        (
            400,
            {
                **good,
                "phases": [
                    {"batch_size": 5},
                    {"batch_size": 15, "start_ts": in_(60)},
                    {"start_ts": in_(120)},
                ],
            },
            "rounds down to no device",
        ),
        (400, {**good, "phases": [{"batch_size": 0}, {"start_ts": in_(60)}]}, "batch_size"),
        (400, {**good, "phases": [{"batch_size": 101}, {"start_ts": in_(60)}]}, "batch_size"),
        # Start times this server cannot store, or not convert to UTC: 400, not 500.
        (400, {**good, "phases": [{"start_ts": "9999-12-31T23:59:59-01:00"}]}, "start_ts"),
        (400, {**good, "phases": [{"start_ts": "0001-01-01T00:00:00+23:59"}]}, "start_ts"),
        (400, {**good, "phases": [{"start_ts": "9999-12-31T23:59:59Z"}]}, "start_ts"),
        (400, {**good, "phases": [{"start_ts": "1969-12-31T23:59:59Z"}]}, "start_ts"),
        (400, {**good, "phases": [{"start_ts": 1700000000}]}, "start_ts"),
        (400, {**good, "phases": [{"start_ts": "1700000000"}]}, "start_ts"),
        (
            400,
            {**good, "phases": [{"batch_size": 50, "start_ts": in_(60)}, {"start_ts": in_(30)}]},
            "not after",
        ),
        (400, {**good, "phases": [{"batch_size": 50}, {}]}, "start_ts: required"),
        (
            400,
            {**good, "phases": [{"batch_size": 50, "start_ts": "2026-01-01T00:00:00"}]},
            "timezone",
        ),
        (400, {**good, "phases": [{"batch_size": 5}] * 17}, "phases"),
        (400, {**good, "devices": ["d01", "ghost"]}, "unknown or decommissioned: ghost"),
        (400, {**good, "devices": ["../etc"]}, "not a device id"),
        (400, {**good, "devices": []}, "No devices"),
        (400, {**good, "name": "x" * 257}, "name"),
        (400, {**good, "devices": None}, "exactly one of"),
        (400, {**good, "filter": {"terms": [TYPE_GW]}}, "exactly one of"),
        (400, {"name": "n", "artifact_name": "f1-v1", "filter": {"terms": []}}, "filter.terms"),
        (400, {"name": "n", "artifact_name": "f1-v1", "filter": {"terms": "x"}}, "filter.terms"),
        (
            400,
            {
                "name": "n",
                "artifact_name": "f1-v1",
                "filter": {"terms": [{"scope": "x", "attribute": "a", "type": "$eq", "value": 1}]},
            },
            "scope",
        ),
        (400, {**good, "dynamic": True}, "dynamic: only with a filter"),
        (400, {**good, "max_devices": 3}, "max_devices: only with dynamic"),
        (400, {**good, "retries": -1}, "retries"),
        (400, {**good, "edge": {"failure_threshold": 101}}, "failure_threshold"),
        (400, {**good, "edge": {"unknown": 1}}, "unknown"),
        (400, {**good, "edge": {"device_timeout": 0}}, "device_timeout"),
        (400, {**good, "edge": {"device_timeout": 7 * 86400 + 1}}, "device_timeout"),
        (400, {**good, "name": "a\u0000b"}, "NUL"),
    ]
    with mender(server) as c:
        for status, body, message in bad:
            r = c.post(f"{V1}/deployments", json=body)
            assert r.status_code == status, (body, r.text)
            assert message in r.json()["error"], (message, r.text)
            assert r.json()["request_id"]
        r = c.post(f"{V1}/deployments", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        listed = c.get(f"{V1}/deployments")
        assert listed.status_code == 200, listed.text
        assert listed.json() == []
        assert listed.headers["x-total-count"] == "0"

        # Unknown ids: 404, without a query for what cannot be an id.
        for path in ("nope", "00000000-0000-0000-0000-000000000000", "%00", "..%2F..%2Fetc"):
            for sub in (
                "",
                "/statistics",
                "/devices",
                "/device_list",
                "/events",
                "/devices/d01/log",
            ):
                r = c.get(f"{V1}/deployments/{path}{sub}")
                assert r.status_code == 404, (path, sub, r.text)
        # A real one, for the status body checks.
        rid = create(
            server,
            {
                **good,
                "phases": [{"batch_size": 50, "start_ts": in_(3600)}, {"start_ts": in_(7200)}],
            },
        )
        assert get(server, rid)["status"] == "scheduled"
        for body in ({"status": "finished"}, {"status": "inprogress"}, {}, [], "aborted", None):
            r = c.put(f"{V1}/deployments/{rid}/status", json=body)
            assert r.status_code == 400, (body, r.text)
        assert (
            c.put(
                f"{V1}/deployments/{'0' * 8}-0000-0000-0000-{'0' * 12}/status",
                json={"status": "aborted"},
            ).status_code
            == 404
        )
        assert c.delete(f"{V1}/deployments/devices/a%20b").status_code == 404
        assert get(server, rid)["status"] == "scheduled"
        for params in (
            {"status": "done"},
            {"per_page": "501"},
            {"page": "0"},
            {"page": str(10**6 + 1)},
            {"created_after": "-1"},
            {"created_before": "253402300800"},
            {"created_after": "99999999999999999999"},
        ):
            assert c.get(f"{V1}/deployments", params=params).status_code == 400, params
        assert c.get(f"{V1}/deployments/{rid}/devices/d01/log").status_code == 404
        edge = {"created_after": "0", "created_before": "253402300799"}
        assert c.get(f"{V1}/deployments", params=edge).status_code == 200
        r = c.get(f"{V1}/deployments/{rid}/events", params={"after": str(2**31 - 1)})
        assert r.status_code == 200, r.text
        assert r.json() == []
        # (2**31: past the INTEGER column of event ids, which PostgreSQL refuses to
        # compare with: found by the OpenAPI fuzz)
        for after in ("-1", str(2**31), str(2**62 + 1), "99999999999999999999"):
            r = c.get(f"{V1}/deployments/{rid}/events", params={"after": after})
            assert r.status_code == 400, (after, r.text)
        # A device in an unfinished deployment of the flow: another one over it is a
        # 409 naming it (and nothing is stored); a filter leaves it out.
        r = c.post(f"{V1}/deployments", json={**good, "devices": ["d03", "d01"]})
        assert r.status_code == 409, r.text
        assert "d01 (deployment " + rid in r.json()["error"]
        r = c.post(
            f"{V1}/deployments", json={"name": "n", "artifact_name": "f1-v1", "all_devices": True}
        )
        assert r.status_code == 409, r.text
        assert c.get(f"{V1}/deployments").headers["x-total-count"] == "1"
        # Batch sizes are percentages of the devices left: 60, 60 and the rest is valid.
        assert (
            c.put(f"{V1}/deployments/{rid}/status", json={"status": "aborted"}).status_code == 204
        )
        sixty = [{"batch_size": 60}, {"batch_size": 60, "start_ts": in_(60)}, {"start_ts": in_(90)}]
        later = create(server, {**good, "phases": sixty})
        assert [p["devices"] for p in get(server, later)["edge"]["phases"]] == [6, 3, 2]
        # Every operation is in the OpenAPI document, with its models.
        doc = c.get("/openapi.json").json()
    for path, methods in {
        f"{V1}/deployments": {"get", "post"},
        "/api/management/v2/deployments/deployments": {"get"},
        f"{V1}/deployments/{{rollout_id}}": {"get"},
        f"{V1}/deployments/{{rollout_id}}/devices": {"get"},
        f"{V1}/deployments/{{rollout_id}}/devices/list": {"get"},
        f"{V1}/deployments/{{rollout_id}}/device_list": {"get"},
        f"{V1}/deployments/{{rollout_id}}/devices/{{device_id}}/log": {"get"},
        f"{V1}/deployments/{{rollout_id}}/statistics": {"get"},
        f"{V1}/deployments/{{rollout_id}}/events": {"get"},
        f"{V1}/deployments/{{rollout_id}}/status": {"put"},
        f"{V1}/deployments/devices/{{device_id}}": {"delete"},
    }.items():
        assert set(doc["paths"][path]) == methods, path
    schemas = doc["components"]["schemas"]
    assert {"NewDeployment", "EdgeOptions", "Deployment", "Device", "DeploymentStatistics"} <= set(
        schemas
    )
    assert "device_timeout" in schemas["EdgeOptions"]["properties"]
    assert "already-installed" in schemas["DeploymentStatistics"]["properties"]
    create_op = doc["paths"][f"{V1}/deployments"]["post"]
    assert {"201", "400", "409", "422"} <= set(create_op["responses"])
    assert set(doc["paths"][f"{V1}/deployments/{{rollout_id}}/status"]["put"]["responses"]) >= {
        "204",
        "404",
        "422",
    }


def test_concurrent_creations_hold_one_deployment_per_device_and_flow(
    any_server: RunningServer,
) -> None:
    """Twelve deployments of one flow to one device, created at the same instant (the
    check that a device is in one unfinished deployment per flow reads rows another
    creation may be writing): exactly one is created, the others are 409."""
    import threading

    srv = any_server
    scripted(srv, "race-1")
    upload(srv, "v1", wat.versioned_flow("v1"), [])
    body = {"artifact_name": "f1-v1", "devices": ["race-1"], "phases": [{"start_ts": in_(3600)}]}
    go = threading.Barrier(12)
    codes: list[int] = []

    def one(n: int) -> None:
        with mender(srv) as c:
            go.wait()
            codes.append(c.post(f"{V1}/deployments", json={**body, "name": f"r{n}"}).status_code)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [201] + [409] * 11, codes

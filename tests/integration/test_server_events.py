"""What the server records from its devices for the console: their events (the
timeline) and the responses to the commands it sent, from real sim agents through a
real Mosquitto; malformed and oversized messages bounded or dropped; the newest events
per device kept; a response matched only to a command of that application and device;
retained events and responses, and those of unknown or decommissioned devices, dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wat
from broker import Broker, Operator
from common import until
from server_harness import RunningServer, admin, running_server, sim_fleet

from agent.server.db import applications as apps_repo
from agent.server.db import commands as commands_repo
from agent.server.db import device_events as events_repo
from agent.server.db import devices as devices_repo
from agent.server.db.models import Application, CommandRecord, DeviceEvent, utcnow
from agent.server.errors import NotFound, Validation
from agent.server.service import commands

PREFIX = "edge"
V1 = "/api/management/v1/deployments"
AGENT: dict[str, Any] = {
    "mqtt": {"keepalive": 5, "reconnect_min": 0.05, "reconnect_max": 0.5},
    "reconcile": {"state_coalesce_ms": 20},
}


@pytest.fixture
def server(tmp_path: Path, broker: Broker) -> Iterator[RunningServer]:
    url = f"sqlite:///{tmp_path / 'server.db'}"
    with running_server(
        tmp_path / "server", url, broker.url, prefix=PREFIX, settings={"rollout_tick_s": 0.2}
    ) as srv:
        yield srv


@pytest.fixture
def operator(broker: Broker) -> Iterator[Operator]:
    op = Operator(broker).connect()
    yield op
    op.close()


def app_of(srv: RunningServer) -> Application:
    with srv.ctx.db.transaction() as s:
        app = apps_repo.get_application(s, srv.app_id)
    assert app is not None
    return app


def timeline(srv: RunningServer, device_id: str, app_id: str | None = None) -> list[DeviceEvent]:
    with srv.ctx.db.transaction() as s:
        return events_repo.recent(s, app_id or srv.app_id, device_id)


def settled(srv: RunningServer) -> None:
    time.sleep(0.3)  # (the broker hands the messages on; the inventory gathers 50 ms)
    assert srv.ctx.inventory.wait_idle(10)


async def test_events_and_responses_of_real_agents(
    server: RunningServer, tmp_path: Path, broker: Broker
) -> None:
    data = bytes(wat.versioned_flow("v1"))
    manifest = json.dumps({"triggers": [{"type": "command", "command": "f1.version"}]})
    r = server.upload("f1", "v1", data, manifest=manifest)
    assert r.status_code == 201, r.text
    async with sim_fleet(tmp_path, broker.url, PREFIX, 2, **AGENT):
        app = app_of(server)
        await until(lambda: len(server.ctx.inventory._known) >= 2, "both devices known")
        with server.http() as c:
            r = c.post(
                f"{V1}/deployments",
                json={"name": "v1", "artifact_name": "f1-v1", "devices": ["sim-0001"]},
            )
        assert r.status_code == 201, r.text
        rid = r.headers["location"].rsplit("/", 1)[1]

        def succeeded() -> list[DeviceEvent]:
            return [e for e in timeline(server, "sim-0001") if e.status == "success"]

        await until(succeeded, "the success event recorded")
        events = timeline(server, "sim-0001")
        # Newest first; every transition of the flow, with the deployment's attempt.
        statuses = [e.status for e in reversed(events)]
        assert statuses[:1] == ["pending"]
        assert statuses[-1] == "success"
        assert {"downloading", "installing"} <= set(statuses)
        assert {e.flow_id for e in events} == {"f1"}
        assert {e.version for e in events} == {"v1"}
        assert all(e.deployment_id for e in events), rid
        assert [e.id for e in events] == sorted((e.id for e in events), reverse=True)
        assert timeline(server, "sim-0002") == []  # (no deployment there)

        # A command sent through the service is recorded with its id, and its answer.
        sent = await asyncio.to_thread(commands.send, server.ctx, app, "sim-0001", "f1.version", {})
        assert sent.response is None
        assert sent.device_id == "sim-0001"

        def answered(cid: str) -> CommandRecord | None:
            got = commands.get(server.ctx, server.app_id, cid)
            return got if got is not None and got.response is not None else None

        done = await until(lambda: answered(sent.id), "the flow's answer")
        assert done.response is not None
        assert done.response["ok"] is True
        assert done.response["result"]["flows"]["f1"]["result"] == "v1"
        assert done.answered is not None
        ping = await asyncio.to_thread(
            commands.send, server.ctx, app, "sim-0002", "agent.ping", None
        )
        done = await until(lambda: answered(ping.id), "the agent's answer")
        assert done.response is not None
        assert done.response["result"]["pong"] is True
        # Another application does not see it.
        assert commands.get(server.ctx, "no-such-application", ping.id) is None


def test_bounds_cap_and_matching(
    server: RunningServer, operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_repo, "MAX_PER_DEVICE", 5)
    topic = f"{PREFIX}/dev-1/events"
    # (Events are kept for devices of the inventory only: dev-1 comes online first.)
    operator.publish(f"{PREFIX}/dev-1/status", {"online": True}, retain=False)
    settled(server)
    for bad in (b"{not json", b"[1,2]", b'{"flowId": "f1"}', b'{"status": "success"}'):
        operator.publish(topic, bad, retain=False)
    operator.publish(topic, {"flowId": "f1", "status": "fail\u0000ure"}, retain=False)
    operator.publish(
        topic,
        {
            "flowId": "f" * 500,
            "status": "failure",
            "error": "e" * 10_000,
            "version": 7,
            "progress": {"bytes": 3, "total": "x"},
        },
        retain=False,
    )
    settled(server)
    (event,) = timeline(server, "dev-1")
    assert event.flow_id == "f" * 128
    assert event.error == "e" * 4096
    assert event.version is None
    assert event.detail == {"progress": {"bytes": 3}}

    # The newest 5 of a device are kept.
    for n in range(8):
        operator.publish(topic, {"flowId": f"n{n}", "status": "pending"}, retain=False)
    settled(server)
    assert [e.flow_id for e in timeline(server, "dev-1")] == [f"n{n}" for n in (7, 6, 5, 4, 3)]

    # A response matches a command of its application and device only; first wins.
    common = ["--db", server.db_url, "--state-dir", str(server.cfg.state_dir)]
    other = admin(*common, "create-application", "--name", "o", "--prefix", "other")
    server.ctx.refresh_applications()
    assert server.ctx.app_for_prefix("other") == other
    with server.ctx.db.transaction() as s:
        commands_repo.create(
            s, id="c1", application_id=server.app_id, device_id="dev-1", name="x", sent=utcnow()
        )
    # The server hears the new application (its event recorded there, not here) ...
    deadline = time.monotonic() + 10
    while not timeline(server, "dev-1", other):
        assert time.monotonic() < deadline, "the other application's devices not heard"
        operator.publish("other/dev-1/status", {"online": True}, retain=False)
        operator.publish("other/dev-1/events", {"flowId": "o", "status": "x"}, retain=False)
        settled(server)
    # ... and drops a response there to a command of this application; and one of a
    # device the application does not have (dev-2 never reported).
    answer = {"id": "c1", "name": "x", "ok": True, "result": "wrong"}
    operator.publish("other/dev-1/command/response", answer, retain=False)
    operator.publish(f"{PREFIX}/dev-2/command/response", answer, retain=False)
    operator.publish(f"{PREFIX}/dev-1/command/response", {**answer, "id": "c2"}, retain=False)
    operator.publish(f"{PREFIX}/dev-1/command/response", b"{bad", retain=False)
    settled(server)
    assert commands.get(server.ctx, server.app_id, "c1").response is None  # type: ignore[union-attr]
    right = {"id": "c1", "name": "x", "ok": False, "error": "no", "extra": 1}
    operator.publish(f"{PREFIX}/dev-1/command/response", right, retain=False)
    settled(server)
    operator.publish(f"{PREFIX}/dev-1/command/response", answer, retain=False)
    settled(server)
    got = commands.get(server.ctx, server.app_id, "c1")
    assert got is not None
    assert got.response == {"ok": False, "name": "x", "error": "no"}
    assert commands.get(server.ctx, other, "c1") is None
    assert {e.flow_id for e in timeline(server, "dev-1", other)} == {"o"}
    assert "o" not in {e.flow_id for e in timeline(server, "dev-1")}


def test_commands_sent_are_checked_and_capped(
    server: RunningServer, operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands_repo, "MAX_PER_DEVICE", 3)
    app = app_of(server)
    operator.subscribe(f"{PREFIX}/dev-1/command")
    with pytest.raises(NotFound):  # (not in the inventory yet)
        commands.send(server.ctx, app, "dev-1", "agent.ping", None)
    operator.publish(f"{PREFIX}/dev-1/status", {"online": True}, retain=False)
    settled(server)
    for bad in ("", " ", "n" * 256):
        with pytest.raises(Validation):
            commands.send(server.ctx, app, "dev-1", bad, None)
    sent = [commands.send(server.ctx, app, "dev-1", f"c.{n}", {"n": n}) for n in range(5)]
    deadline = time.monotonic() + 10
    while len(operator.messages(f"{PREFIX}/dev-1/command")) < 5:
        assert time.monotonic() < deadline, "the commands did not arrive"
        time.sleep(0.05)
    docs = [json.loads(m) for m in operator.messages(f"{PREFIX}/dev-1/command")]
    assert [d["id"] for d in docs] == [c.id for c in sent]
    assert [d["payload"] for d in docs] == [{"n": n} for n in range(5)]
    assert all(d["time"] and d["name"].startswith("c.") for d in docs)
    with server.ctx.db.transaction() as s:
        kept = commands_repo.recent(s, server.app_id, "dev-1")
    assert [c.id for c in kept] == [c.id for c in reversed(sent[2:])]


def test_retained_and_unknown_devices_events_are_dropped(
    server: RunningServer, operator: Operator
) -> None:
    """An agent never retains an event or a response: a retained one (left by someone
    else) would come again at every subscription, so it is not recorded; nor are
    those of a device the application does not have, or decommissioned."""
    common = ["--db", server.db_url, "--state-dir", str(server.cfg.state_dir)]
    other = admin(*common, "create-application", "--name", "o", "--prefix", "other")
    # Retained before the server subscribes to the new application: they come to it
    # flagged retained, with the device's retained status.
    operator.publish("other/dev-1/status", {"online": True}, retain=True)
    operator.publish("other/dev-1/events", {"flowId": "old", "status": "failure"}, retain=True)
    with server.ctx.db.transaction() as s:
        commands_repo.create(
            s, id="c-ret", application_id=other, device_id="dev-1", name="x", sent=utcnow()
        )
    operator.publish("other/dev-1/command/response", {"id": "c-ret", "ok": True}, retain=True)
    server.ctx.refresh_applications()

    def known() -> bool:
        with server.ctx.db.transaction() as s:
            return devices_repo.get(s, other, "dev-1") is not None

    deadline = time.monotonic() + 10
    while not known():
        assert time.monotonic() < deadline, "the retained status was not read"
        time.sleep(0.05)
    settled(server)
    assert timeline(server, "dev-1", other) == []
    assert commands.get(server.ctx, other, "c-ret").response is None  # type: ignore[union-attr]
    # The same, live, is recorded.
    operator.publish("other/dev-1/events", {"flowId": "new", "status": "pending"}, retain=False)
    operator.publish("other/dev-1/command/response", {"id": "c-ret", "ok": True}, retain=False)
    settled(server)
    assert [e.flow_id for e in timeline(server, "dev-1", other)] == ["new"]
    assert commands.get(server.ctx, other, "c-ret").response == {"ok": True}  # type: ignore[union-attr]

    # A device the application does not have: nothing recorded (and no row made).
    operator.publish("other/ghost/events", {"flowId": "g", "status": "pending"}, retain=False)
    settled(server)
    assert timeline(server, "ghost", other) == []
    # A decommissioned device: its later events and answers are dropped.
    with server.ctx.db.transaction() as s:
        dev = devices_repo.get(s, other, "dev-1")
        assert dev is not None
        dev.decommissioned = True
        commands_repo.create(
            s, id="c-dec", application_id=other, device_id="dev-1", name="x", sent=utcnow()
        )
    operator.publish("other/dev-1/events", {"flowId": "late", "status": "pending"}, retain=False)
    operator.publish("other/dev-1/command/response", {"id": "c-dec", "ok": True}, retain=False)
    settled(server)
    assert [e.flow_id for e in timeline(server, "dev-1", other)] == ["new"]
    assert commands.get(server.ctx, other, "c-dec").response is None  # type: ignore[union-attr]

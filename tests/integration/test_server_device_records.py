"""What the inventory records of the devices' events and command responses, through
its real batch path on SQLite and PostgreSQL: a batch tried again records them once;
retained ones, and those of unknown or decommissioned devices, are dropped; hostile
ones (a NUL, a lone surrogate, oversized fields) are bounded or dropped without
failing the batch; a device keeps its newest events and commands only."""

from __future__ import annotations

import itertools
import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from postgres import PostgresCluster
from sqlalchemy import func, select

from agent.server.config import ServerConfig
from agent.server.context import ServerContext
from agent.server.db import applications as apps_repo
from agent.server.db import commands as commands_repo
from agent.server.db import device_events as events_repo
from agent.server.db import devices as devices_repo
from agent.server.db.engine import Database
from agent.server.db.models import Application, CommandRecord, DeviceEvent, utcnow
from agent.server.errors import Validation
from agent.server.service import commands
from agent.server.service import inventory as inventory_module
from agent.server.service.inventory import Inventory, Report

PREFIX = "edge"
_NAMES = itertools.count(1)


def make_app(db: Database) -> str:
    with db.transaction() as s:
        return apps_repo.create_application(s, "records", PREFIX).id


def inventory_of(db: Database, app: str) -> Inventory:
    return Inventory(db, lambda p: app if p == PREFIX else None)


def message(device: str, what: str, doc: Any, *, retained: bool = False) -> Report:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return f"{PREFIX}/{device}/{what}", body, retained


def online(device: str) -> Report:
    return message(device, "status", {"online": True}, retained=True)


def ev(flow: str, status: str = "pending", **more: Any) -> dict[str, Any]:
    return {"flowId": flow, "status": status, **more}


def events_of(db: Database, app: str, device: str) -> list[DeviceEvent]:
    with db.transaction() as s:
        return events_repo.recent(s, app, device, 1000)


def sent(db: Database, app: str, device: str, command_id: str) -> None:
    with db.transaction() as s:
        commands_repo.create(
            s, id=command_id, application_id=app, device_id=device, name="x", sent=utcnow()
        )


def answer_of(db: Database, app: str, command_id: str) -> dict[str, Any] | None:
    with db.transaction() as s:
        row = commands_repo.get(s, app, command_id)
        assert row is not None
        return row.response


def test_retained_unknown_and_decommissioned_are_dropped(db: Database) -> None:
    app = make_app(db)
    inv = inventory_of(db, app)
    inv.apply([online("d1"), online("d2")])
    sent(db, app, "d1", "c1")
    sent(db, app, "d2", "c2")
    inv.apply(
        [
            message("d1", "events", ev("retained"), retained=True),
            message("d1", "command/response", {"id": "c1", "ok": True}, retained=True),
            message("ghost", "events", ev("unknown")),
            message("ghost", "command/response", {"id": "c1", "ok": True}),
            message("d1", "events", ev("live")),
        ]
    )
    assert [e.flow_id for e in events_of(db, app, "d1")] == ["live"]
    assert events_of(db, app, "ghost") == []
    assert answer_of(db, app, "c1") is None
    with db.transaction() as s:
        assert devices_repo.get(s, app, "ghost") is None  # (an event makes no device)
        dev = devices_repo.get(s, app, "d2", lock=True)
        assert dev is not None
        dev.decommissioned = True
    inv.apply(
        [
            message("d2", "events", ev("after")),
            message("d2", "command/response", {"id": "c2", "ok": True}),
            message("d1", "command/response", {"id": "c1", "ok": True}),
        ]
    )
    assert events_of(db, app, "d2") == []
    assert answer_of(db, app, "c2") is None
    assert answer_of(db, app, "c1") == {"ok": True}


def test_hostile_events_and_responses_do_not_fail_the_batch(db: Database) -> None:
    app = make_app(db)
    inv = inventory_of(db, app)
    inv.apply([online("d1")])
    for cid in ("nul", "big", "nan", "deep", "ok"):
        sent(db, app, "d1", cid)
    state = {"deviceId": "d1", "time": "2026-01-01T00:00:00.000Z", "flows": {}}
    nested: Any = "x"
    for _ in range(100):
        nested = [nested]
    inv.apply(
        [
            message("d1", "events", ev("f", error="bad\x00")),
            message("d1", "events", ev("f\x00")),
            message("d1", "events", {"flowId": "f", "status": "s", "k\x00": 1}),
            message("d1", "events", b'{"flowId": "f", "status": "\\ud800"}'),
            message("d1", "events", b'{"flowId": "f", "status": "s", "n": NaN}'),
            message("d1", "events", ev("f", deep=nested)),
            message(
                "d1",
                "events",
                ev(
                    "g" * 10_000,
                    "s" * 1000,
                    error="e" * 100_000,
                    version="v" * 1000,
                    deploymentId="d" * 1000,
                    time="t" * 1000,
                    progress={"bytes": 2**70, "total": -1},
                ),
            ),
            message("d1", "events", ev("fine", "success", progress={"bytes": 5, "total": 9})),
            message("d1", "command/response", {"id": "nul", "ok": True, "result": "a\x00"}),
            message("d1", "command/response", {"id": "big", "ok": True, "result": "r" * 100_000}),
            message("d1", "command/response", b'{"id": "nan", "ok": true, "result": NaN}'),
            message("d1", "command/response", {"id": "deep", "ok": True, "result": nested}),
            message("d1", "command/response", {"id": "n\x00", "ok": True}),
            message("d1", "command/response", {"id": "i" * 100, "ok": True}),
            message("d1", "command/response", {"id": "ok", "ok": True, "error": "E" * 10_000}),
            message("d1", "state", state, retained=False),
        ]
    )
    got = events_of(db, app, "d1")
    assert [e.flow_id for e in got] == ["fine", "g" * 128]
    big = got[1]
    assert (big.status, big.error) == ("s" * 32, "e" * 4096)
    assert (big.version, big.deployment_id) == ("v" * 128, "d" * 128)
    assert big.detail == {"progress": {}, "time": "t" * 64}
    assert got[0].detail == {"progress": {"bytes": 5, "total": 9}}
    # The reports of the same batch were applied.
    with db.transaction() as s:
        dev = devices_repo.get(s, app, "d1")
        assert dev is not None
        assert dev.state == state
    # An answer that cannot be stored says why rather than leave the command waiting.
    for cid, why in (("nul", "NUL"), ("nan", "finite"), ("deep", "nested")):
        response = answer_of(db, app, cid)
        assert response is not None
        assert response["ok"] is False
        assert why in response["error"]
    assert answer_of(db, app, "big") == {"ok": True, "result": json.dumps("r" * 100_000)[:16384]}
    assert answer_of(db, app, "ok") == {"ok": True, "error": "E" * 4096}


def test_a_device_keeps_its_newest_events_and_commands(db: Database) -> None:
    app = make_app(db)
    inv = inventory_of(db, app)
    inv.apply([online("d1"), online("d2")])
    keep = events_repo.MAX_PER_DEVICE
    inv.apply([message("d1", "events", ev(f"a{n}")) for n in range(keep - 10)])
    inv.apply([message("d1", "events", ev(f"b{n}")) for n in range(20)])
    inv.apply([message("d2", "events", ev("other"))])
    got = events_of(db, app, "d1")
    assert len(got) == keep
    assert got[0].flow_id == "b19"
    assert got[-1].flow_id == "a10"
    assert len(events_of(db, app, "d2")) == 1

    cap = commands_repo.MAX_PER_DEVICE
    start = utcnow()
    with db.transaction() as s:
        for n in range(cap + 5):
            when = start + timedelta(seconds=n)
            commands_repo.create(
                s, id=f"c{n:04d}", application_id=app, device_id="d1", name="x", sent=when
            )
            commands_repo.trim(s, app, "d1")
        commands_repo.create(s, id="o", application_id=app, device_id="d2", name="x", sent=start)
    with db.transaction() as s:
        ids = list(
            s.scalars(
                select(CommandRecord.id)
                .where(CommandRecord.device_id == "d1")
                .order_by(CommandRecord.id)
            )
        )
        others = s.scalar(select(func.count()).where(CommandRecord.device_id == "d2"))
    assert ids == [f"c{n:04d}" for n in range(5, cap + 5)]
    assert others == 1


def test_a_command_the_database_cannot_store_is_refused(db_url: str, tmp_path: Path) -> None:
    cfg = ServerConfig.model_validate({"db": db_url, "state_dir": str(tmp_path / "state")})
    ctx = ServerContext(cfg, with_broker=False)
    try:
        with ctx.db.transaction() as s:
            app = apps_repo.create_application(s, "c", PREFIX)
            devices_repo.insert_missing(s, app.id, ["d1"])
            app_row = s.get(Application, app.id)
        assert app_row is not None
        for name, payload, why in (
            ("a\x00b", None, "name: contains a NUL"),
            ("x", {"v": float("nan")}, "payload: v: not a finite number"),
            ("x", {"v": "\x00"}, "payload: v: contains a NUL"),
            ("x", {"\ud800": 1}, "payload: body: a key is not valid Unicode"),
        ):
            with pytest.raises(Validation, match=why):
                commands.send(ctx, app_row, "d1", name, payload)
        with ctx.db.transaction() as s:
            assert s.scalar(select(func.count()).select_from(CommandRecord)) == 0
    finally:
        ctx.stop()


# ---------------------------------------------------------------- PostgreSQL only


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> str:
    return postgres.create_database(f"records_{next(_NAMES)}")


def test_a_batch_tried_again_records_its_events_once(pg_url: str) -> None:
    """A batch refused by the database (here: a lock not granted in time, as after a
    deadlock) is tried again whole; its events are recorded once."""
    db = Database(pg_url, connect_args={"options": "-c lock_timeout=100"})
    db.migrate()
    holder = Database(pg_url)
    try:
        app = make_app(db)
        inv = inventory_of(db, app)
        inv.apply([online("d1")])
        sent(db, app, "d1", "c1")
        batch = [
            message("d1", "status", {"online": True, "agentVersion": "9"}),
            message("d1", "events", ev("f1")),
            message("d1", "command/response", {"id": "c1", "ok": True}),
        ]
        with holder.transaction() as s, structlog.testing.capture_logs() as logs:
            assert devices_repo.get(s, app, "d1", lock=True) is not None
            worker = threading.Thread(target=inv._apply_retrying, args=(batch, threading.Event()))
            worker.start()
            time.sleep(0.6)  # (two tries refused meanwhile, at 0.1 s and 0.3 s)
        worker.join(10)
        assert not worker.is_alive()
        assert sum("trying again" in e["event"] for e in logs) >= 2
        assert not any(e["log_level"] == "error" for e in logs)
        assert [e.flow_id for e in events_of(db, app, "d1")] == ["f1"]
        assert answer_of(db, app, "c1") == {"ok": True}
        with db.transaction() as s:
            dev = devices_repo.get(s, app, "d1")
            assert dev is not None
            assert dev.agent_version == "9"
    finally:
        holder.close()
        db.close()


def test_events_the_database_refuses_leave_the_batch_standing(pg_url: str) -> None:
    """Should a check miss something PostgreSQL refuses (here a NUL, put past the
    checks), only the events and responses are dropped: the transaction's other
    writes (the batch's reports) commit."""
    db = Database(pg_url)
    db.migrate()
    try:
        app = make_app(db)
        inventory_of(db, app).apply([online("d1")])
        row = {"device_id": "d1", "time": utcnow(), "flow_id": "f\x00", "status": "pending"}
        with db.transaction() as s:
            dev = devices_repo.get(s, app, "d1", lock=True)
            assert dev is not None
            dev.agent_version = "7"
            inventory_module._record_events(s, {app: [row]}, [], utcnow())
        assert events_of(db, app, "d1") == []
        with db.transaction() as s:
            dev = devices_repo.get(s, app, "d1")
            assert dev is not None
            assert dev.agent_version == "7"
    finally:
        db.close()

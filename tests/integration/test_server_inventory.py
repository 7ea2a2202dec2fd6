"""The server's inventory with several server processes: two of them hearing one new
device at once, reports applied out of order, and a server that starts after its
devices (a shared subscription gets no retained messages)."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broker import Broker
from server_harness import running_server
from sqlalchemy import select, update

from agent.device.config import AgentConfig
from agent.fleet.sim import Simulation
from agent.server.db import applications as apps_repo
from agent.server.db import devices as devices_repo
from agent.server.db.engine import Database
from agent.server.db.models import DeploymentLog
from agent.server.service import inventory as inventory_module
from agent.server.service.inventory import Inventory, Report

PREFIX = "edge"


def make_app(db: Database) -> str:
    with db.transaction() as s:
        return apps_repo.create_application(s, "inventory", PREFIX).id


def state(device: str, time: str, status: str, version: str = "v1") -> Report:
    doc = {
        "deviceId": device,
        "generation": 1,
        "time": time,
        "flows": {"f": {"desiredVersion": version, "currentVersion": None, "status": status}},
    }
    return f"{PREFIX}/{device}/state", json.dumps(doc).encode(), False


def recorded(db: Database, app: str, device: str) -> Any:
    with db.transaction() as s:
        dev = devices_repo.get(s, app, device)
        assert dev is not None
        return dev.state["flows"]["f"]["status"] if dev.state else None


def test_two_inventories_hear_the_same_new_devices_at_once(db: Database) -> None:
    app = make_app(db)
    ids = [f"d-{i:03d}" for i in range(200)]
    batch = [state(d, "2026-01-01T00:00:00.000Z", "pending") for d in ids]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def hear() -> None:
        inventory = Inventory(db, lambda p: app if p == PREFIX else None)
        start.wait()
        try:
            inventory.apply(batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hear) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert all(recorded(db, app, d) == "pending" for d in ids)


def test_an_older_state_report_does_not_replace_a_newer_one(db: Database) -> None:
    app = make_app(db)
    inventory = Inventory(db, lambda p: app if p == PREFIX else None)
    inventory.apply([state("d1", "2026-01-01T00:00:01.000Z", "success")])
    # Heard later (through another server, or read again), sent earlier.
    inventory.apply([state("d1", "2026-01-01T00:00:00.500Z", "downloading")])
    assert recorded(db, app, "d1") == "success"
    # In one millisecond, the report with the verdict wins whatever the order.
    inventory.apply([state("d2", "2026-01-01T00:00:00.000Z", "success")])
    inventory.apply([state("d2", "2026-01-01T00:00:00.000Z", "installing")])
    assert recorded(db, app, "d2") == "success"
    # Within one batch too; a later report still replaces the recorded one.
    inventory.apply(
        [
            state("d3", "2026-01-01T00:00:02.000Z", "success"),
            state("d3", "2026-01-01T00:00:01.000Z", "downloading"),
        ]
    )
    assert recorded(db, app, "d3") == "success"
    inventory.apply([state("d1", "2026-01-01T00:00:03.000Z", "pending", "v2")])
    assert recorded(db, app, "d1") == "pending"


async def test_a_server_started_after_its_devices_knows_them(
    tmp_path: Path, db_url: str, broker: Broker
) -> None:
    base = AgentConfig.model_validate(
        {
            "device_id": "sim",
            "device_type": "gw",
            "state_dir": str(tmp_path / "unused"),
            "mqtt": {"broker": broker.url, "topic_prefix": PREFIX, "keepalive": 5},
        }
    )
    async with Simulation(base, 3, tmp_path / "sim") as sim:
        assert await sim.wait_connected(10) == 3
        await asyncio.sleep(0.5)  # their status and state are retained by now
        with running_server(tmp_path / "server", db_url, broker.url, prefix=PREFIX) as srv:
            assert srv.ctx.link is not None
            assert srv.ctx.link.shared

            def known() -> bool:
                with srv.http() as http:
                    got = http.get(f"/applications/{srv.app_id}/devices").json()
                return got["totalCount"] == 3 and all(
                    d["connectionInfo"]["connected"] == 1 for d in got["items"]
                )

            deadline = asyncio.get_running_loop().time() + 15
            while not await asyncio.to_thread(known):
                assert asyncio.get_running_loop().time() < deadline, "devices not recorded"
                await asyncio.sleep(0.2)


async def test_reports_lost_with_a_server_are_read_again(
    tmp_path: Path, db_url: str, broker: Broker
) -> None:
    """The retained reports, read again, put back what a dead server took with it;
    reading them is no sign of life (``last_seen`` stays)."""
    base = AgentConfig.model_validate(
        {
            "device_id": "sim",
            "state_dir": str(tmp_path / "unused"),
            "mqtt": {"broker": broker.url, "topic_prefix": PREFIX, "keepalive": 5},
        }
    )
    ids = ("sim-0001", "sim-0002")
    with running_server(tmp_path / "server", db_url, broker.url, prefix=PREFIX) as srv:
        link = srv.ctx.link
        assert link is not None

        def rows() -> dict[str, Any] | None:
            with srv.ctx.db.transaction() as s:
                found = [devices_repo.get(s, srv.app_id, d) for d in ids]
            if not all(r is not None and r.online and r.state for r in found):
                return None
            return {r.id: (r.state, r.last_seen) for r in found if r is not None}

        async def until(check: Any) -> Any:
            deadline = asyncio.get_running_loop().time() + 15
            while not (got := await asyncio.to_thread(check)):
                assert asyncio.get_running_loop().time() < deadline, "not recorded"
                await asyncio.sleep(0.1)
            return got

        async with Simulation(base, len(ids), tmp_path / "sim"):
            before = await until(rows)
            # As if these reports had gone to a server process that died with them.
            with srv.ctx.db.transaction() as s:
                for d in ids:
                    dev = devices_repo.get(s, srv.app_id, d, lock=True)
                    assert dev is not None
                    dev.online, dev.state = False, None
            done = link.resyncs
            srv.ctx.resync()
            after = await until(lambda: link.resyncs > done and rows())
            assert after == before


# ---------------------------------------------------------------- deployment logs


def log_report(device: str, deployment_id: str, messages: list[dict[str, Any]]) -> Report:
    doc = {"deviceId": device, "flowId": "f", "deploymentId": deployment_id, "messages": messages}
    return f"{PREFIX}/{device}/deployments/{deployment_id}/log", json.dumps(doc).encode(), True


def stored_logs(db: Database, app: str, device: str) -> dict[str, DeploymentLog]:
    with db.transaction() as s:
        rows = s.scalars(
            select(DeploymentLog).where(
                DeploymentLog.application_id == app, DeploymentLog.device_id == device
            )
        )
        return {row.deployment_id: row for row in rows}


def stored_at(db: Database, app: str, device: str, times: dict[str, datetime]) -> None:
    """Backdate stored logs (as if stored then)."""
    with db.transaction() as s:
        for deployment_id, when in times.items():
            s.execute(
                update(DeploymentLog)
                .where(
                    DeploymentLog.application_id == app,
                    DeploymentLog.device_id == device,
                    DeploymentLog.deployment_id == deployment_id,
                )
                .values(time=when)
            )


def test_deployment_logs_read_again_are_not_rewritten(db: Database) -> None:
    app = make_app(db)
    inventory = Inventory(db, lambda p: app if p == PREFIX else None)
    line = {"time": "2026-01-01T00:00:00.000000Z", "level": "error", "message": "boom"}
    inventory.apply([log_report("d1", "a1", [line])])
    long_ago = datetime(2000, 1, 1, tzinfo=UTC)
    stored_at(db, app, "d1", {"a1": long_ago})
    # The retained log read again (a resync): the row is left alone.
    inventory.apply([log_report("d1", "a1", [line])])
    assert stored_logs(db, app, "d1")["a1"].time == long_ago
    # A changed one replaces it.
    inventory.apply([log_report("d1", "a1", [line, {**line, "message": "again"}])])
    row = stored_logs(db, app, "d1")["a1"]
    assert row.time > long_ago
    assert [m["message"] for m in row.messages] == ["boom", "again"]


def test_deployment_logs_are_bounded_per_device_and_in_size(db: Database) -> None:
    app = make_app(db)
    inventory = Inventory(db, lambda p: app if p == PREFIX else None)
    keep = inventory_module.MAX_LOGS_PER_DEVICE
    line = {"time": "t", "level": "error", "message": "m"}
    # A device keeps its newest logs: a new one pushes out the oldest stored.
    inventory.apply([log_report("d1", f"x{i:03d}", [line]) for i in range(keep)])
    base = datetime(2026, 1, 1, tzinfo=UTC)
    stored_at(db, app, "d1", {f"x{i:03d}": base + timedelta(seconds=i) for i in range(keep)})
    inventory.apply([log_report("d1", f"y{i}", [line]) for i in range(3)])
    kept = stored_logs(db, app, "d1")
    assert len(kept) == keep
    assert set(kept) == {f"x{i:03d}" for i in range(3, keep)} | {"y0", "y1", "y2"}
    # More new ones in one batch than it keeps: the last ones heard.
    inventory.apply([log_report("d2", f"z{i:03d}", [line]) for i in range(keep + 10)])
    assert set(stored_logs(db, app, "d2")) == {f"z{i:03d}" for i in range(10, keep + 10)}
    assert len(stored_logs(db, app, "d1")) == keep  # (another device's stay)

    # One log: its newest lines, each field cut, within a total.
    lines = inventory_module.MAX_LOG_LINES
    many = [{**line, "message": f"{i}"} for i in range(lines + 5)]
    long = {"time": "t" * 100, "level": "l" * 100, "message": "x" * 3000}
    inventory.apply([log_report("d3", "many", many), log_report("d3", "long", [long] * 200)])
    kept = stored_logs(db, app, "d3")
    assert [m["message"] for m in kept["many"].messages] == [f"{i}" for i in range(5, lines + 5)]
    fields = inventory_module.LOG_FIELDS
    assert kept["long"].messages[0] == {k: v[: fields[k]] for k, v in long.items()}
    size = sum(fields.values())
    assert len(kept["long"].messages) == inventory_module.MAX_LOG_CHARS // size

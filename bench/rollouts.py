"""Rollout engine benchmark: one Mender deployment over N devices, on SQLite.

A server context without a broker (the desired writer records the documents, which
stay unpublished), its API through FastAPI's test client, and the engine's looks
called one at a time. The devices are rows inserted in bulk (each with a state report
of another flow, as a real fleet's reports carry). Timed, per fleet size:

- ``create``: ``POST …/deployments`` over every device, two phases (50 %, then the
  rest at a time far ahead);
- ``first phase``: the engine's look that starts the first phase (N/2 entries written);
- ``look, recent``: a look just after that, every started device's row changed
  within the slack (the median of 3);
- ``idle look``: a look where nothing changed (the median of 5);
- ``full look``: the look that reads every started device (every minute);
- ``reports look``: the look after every started device reported ``success`` (the
  reports go through the server's inventory, as from the broker);
- ``list``: ``GET …/deployments?per_page=20`` with 6 such deployments (5 scheduled,
  over other flows);
- ``get``: ``GET …/deployments/{id}``;
- ``abort``: ``PUT …/status {"status": "aborted"}`` of a deployment whose first
  phase is in progress (N/2 devices in progress, N/2 never started): the answer
  (the abort stored; for up to 500 devices in progress the abort entries too);
- ``abort entries``: the engine's look that writes the rest of the abort entries.

The baseline is the same run at ``--baseline`` devices (default 1,000): how the
figures grow with the fleet.

Usage: python bench/rollouts.py [--devices 10000] [--baseline 1000] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update

from agent import cli
from agent.server.api.app import create_app
from agent.server.config import ServerConfig
from agent.server.context import ServerContext
from agent.server.db.models import Device, RolloutDevice

PREFIX = "edge"
V1 = "/api/management/v1/deployments/deployments"
EMPTY_MODULE = b"\0asm\x01\0\0\0"
FAR = "2099-01-01T00:00:00Z"


def admin(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["server", "admin", *argv])
    if rc != 0:
        raise SystemExit(f"admin {argv} exited {rc}")
    return out.getvalue().strip()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def age(ctx: ServerContext) -> None:
    """Every device row as if last changed an hour ago."""
    with ctx.db.transaction() as s:
        s.execute(update(Device).values(last_updated=datetime.now(UTC) - timedelta(hours=1)))


def run(devices: int, work: Path) -> dict[str, float]:
    from fastapi.testclient import TestClient

    db = f"sqlite:///{work / 'server.db'}"
    common = ["--db", db, "--state-dir", str(work)]
    app_id = admin(*common, "create-application", "--name", "bench", "--prefix", PREFIX)
    token = admin(*common, "create-token", "--application", app_id, "--scope", "all.Application")
    cfg = ServerConfig.model_validate({"db": db, "state_dir": str(work)})
    ctx = ServerContext(cfg, with_broker=False)
    ctx.refresh_applications()
    other = {"status": "success", "deploymentId": "0" * 24, "currentVersion": "1"}
    with ctx.db.transaction() as s:
        rows = [
            {
                "application_id": app_id,
                "id": f"d{i:05d}",
                "name": f"d{i}",
                "device_type": "pi",
                "description": "",
                "tags": [],
                "attributes": [],
                "device_class": "edgeCompute",
                "online": True,
                "decommissioned": False,
                "state": {"generation": 1, "flows": {"other": other}},
                "desired": {},
                "generation": 0,
                "published_generation": 0,
            }
            for i in range(devices)
        ]
        for i in range(0, len(rows), 1000):
            s.execute(insert(Device), rows[i : i + 1000])
    out: dict[str, float] = {}
    with TestClient(create_app(ctx)) as client:
        client.headers["authorization"] = f"Bearer {token}"
        for k in range(6):
            r = client.post(
                f"/applications/{app_id}/flows/f{k}/versions",
                data={"version": "v1"},
                files={"artifact": ("f.wasm", EMPTY_MODULE, "application/octet-stream")},
            )
            assert r.status_code == 201, r.text
        body = {
            "name": "bench",
            "artifact_name": "f0-v1",
            "all_devices": True,
            "phases": [{"batch_size": 50}, {"start_ts": FAR}],
        }
        created: list[str] = []

        def create() -> None:
            r = client.post(V1, json=body)
            assert r.status_code == 201, r.text
            created.append(r.headers["location"].rsplit("/", 1)[1])

        out["create"] = timed(create)
        rid = created[0]
        out["first phase"] = timed(ctx.engine.tick)
        # Right after the start every started device's row changed within the slack.
        out["look, recent"] = statistics.median(timed(ctx.engine.tick) for _ in range(3))
        age(ctx)  # (as if the rows had not changed for an hour)
        out["idle look"] = statistics.median(timed(ctx.engine.tick) for _ in range(5))
        # (The full look made every FULL_LOOK_S: as if this process had not looked.)
        getattr(ctx.engine, "_looked", {}).clear()
        out["full look"] = timed(ctx.engine.tick)
        with ctx.db.transaction() as s:
            started = s.execute(
                select(RolloutDevice.device_id, RolloutDevice.attempt_id).where(
                    RolloutDevice.rollout_id == rid, RolloutDevice.attempt_id.is_not(None)
                )
            ).all()
        reports = [
            (
                f"{PREFIX}/{device_id}/state",
                json.dumps(
                    {
                        "generation": 2,
                        "time": "2026-01-01T00:00:00.000Z",
                        "flows": {
                            "other": other,
                            "f0": {
                                "status": "success",
                                "deploymentId": attempt,
                                "currentVersion": "v1",
                            },
                        },
                    }
                ).encode(),
                False,
            )
            for device_id, attempt in started
        ]
        for i in range(0, len(reports), 500):
            ctx.inventory.apply(reports[i : i + 500])
        out["reports look"] = timed(ctx.engine.tick)
        stats = client.get(f"{V1}/{rid}/statistics").json()
        assert stats["success"] == len(started), stats
        for k in range(1, 6):
            r = client.post(
                V1,
                json={
                    **body,
                    "name": f"later {k}",
                    "artifact_name": f"f{k}-v1",
                    "phases": [
                        {"batch_size": 50, "start_ts": FAR},
                        {"start_ts": "2099-02-01T00:00:00Z"},
                    ],
                },
            )
            assert r.status_code == 201, r.text
        out["list"] = timed(lambda: client.get(V1, params={"per_page": 20}).raise_for_status())
        out["get"] = timed(lambda: client.get(f"{V1}/{rid}").raise_for_status())
        # The abort of a deployment whose first phase is in progress: another one over
        # a flow of its own, its first half started, no report yet.
        r = client.post(
            f"/applications/{app_id}/flows/g/versions",
            data={"version": "v1"},
            files={"artifact": ("f.wasm", EMPTY_MODULE, "application/octet-stream")},
        )
        assert r.status_code == 201, r.text
        r = client.post(V1, json={**body, "name": "to abort", "artifact_name": "g-v1"})
        assert r.status_code == 201, r.text
        victim = r.headers["location"].rsplit("/", 1)[1]
        ctx.engine.tick()

        def abort() -> None:
            r = client.put(f"{V1}/{victim}/status", json={"status": "aborted"})
            assert r.status_code == 204, r.text

        out["abort"] = timed(abort)
        out["abort entries"] = timed(ctx.engine.tick)
        stats = client.get(f"{V1}/{victim}/statistics").json()
        assert stats["aborted"] == devices, stats
    ctx.db.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--baseline", type=int, default=1_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)  # (the writer says the broker is away, per batch)
    results: dict[int, dict[str, float]] = {}
    for n in (args.baseline, args.devices):
        with tempfile.TemporaryDirectory() as tmp:
            results[n] = run(n, Path(tmp))
    if args.json:
        print(json.dumps({"python": platform.python_version(), "results": results}, indent=2))
        return
    sizes = list(results)
    print(f"SQLite, Python {platform.python_version()}, {platform.machine()}")
    print(f"{'seconds':<14}" + "".join(f"{n:>12,} dev" for n in sizes))
    for key in results[sizes[0]]:
        print(f"{key:<14}" + "".join(f"{results[n][key]:>16.3f}" for n in sizes))


if __name__ == "__main__":
    main()

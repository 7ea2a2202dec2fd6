"""Console benchmark: the pages an operator keeps open, over a fleet of N devices, on
SQLite.

A server context without a broker, its app through FastAPI's test client, signed in
to the console with a token. The devices are rows inserted in bulk, each with a
realistic state report and desired document (three flows) and a tag; one device has
50 stored deployment logs of 2,000 lines each, as a device that failed often has.

Timed (the median of 5, after one warm-up):

- ``fleet page``: ``GET /console/``, unfiltered, a search text, a tag, ``online=no``;
- ``fleet query``: what the fleet page reads, as now (:func:`fleet_views.search`:
  filtered and counted in SQL, whole rows only for the 500 shown), against the
  **baseline** measured in the same run: the page's first version (every device
  row, state and desired included, up to 20,000, filtered in Python);
- ``timeline poll``: ``GET /console/devices/{id}/timeline`` of the device with the
  logs (every 3 s per open device page), against its first version, which read the
  whole device page's data (its logs included) to render the timeline.

Usage: python bench/console.py [--devices 10000] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from agent import cli
from agent.server.api.app import create_app
from agent.server.config import ServerConfig
from agent.server.console import fleet_views
from agent.server.console.fleet_views import Filter
from agent.server.context import ServerContext
from agent.server.db import device_events, rollouts
from agent.server.db import devices as devices_repo
from agent.server.db.devices import DeviceQuery
from agent.server.db.models import Device

PREFIX = "edge"
HEAVY = "d00007"  # the device with the logs


def admin(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["server", "admin", *argv])
    if rc != 0:
        raise SystemExit(f"admin {argv} exited {rc}")
    return out.getvalue().strip()


def median_s(fn: Callable[[], Any], runs: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flow(version: str, sha: str) -> dict[str, Any]:
    return {
        "desiredVersion": version,
        "currentVersion": version,
        "status": "success",
        "deploymentId": "a" * 24,
        "lastUpdated": "2026-12-01T00:00:00.000Z",
        "sha256": sha,
        "previousVersion": "0.9.0",
        "previousSha256": sha,
        "reverted": False,
        "health": {"state": "healthy"},
        "runtime": {"restarts": 0, "health": "ok", "since": "2026-12-01T00:00:00.000Z"},
    }


def seed(ctx: ServerContext, app_id: str, devices: int) -> None:
    sha = "0123456789abcdef" * 4
    flows = {f"flow{k}": _flow(f"1.{k}.0", sha) for k in range(3)}
    desired = {
        "generation": 3,
        "flows": {
            f: {"version": v["currentVersion"], "url": "https://x/" + sha, "sha256": sha}
            for f, v in flows.items()
        },
    }
    with ctx.db.transaction() as s:
        rows = [
            {
                "application_id": app_id,
                "id": f"d{i:05d}",
                "name": f"gateway {i}",
                "device_type": "pi" if i % 3 else "x86",
                "description": "",
                "tags": [{"key": "floor", "value": str(i % 10)}],
                "attributes": [],
                "device_class": "edgeCompute",
                "online": i % 17 != 0,
                "decommissioned": False,
                "state": {"generation": 3, "flows": flows},
                "desired": desired,
                "generation": 3,
                "published_generation": 3,
            }
            for i in range(devices)
        ]
        for i in range(0, len(rows), 1000):
            s.execute(insert(Device), rows[i : i + 1000])
        line = {"time": "2026-12-01T00:00:00.000Z", "level": "info", "message": "x" * 100}
        for k in range(50):
            rollouts.save_log(s, app_id, HEAVY, f"attempt-{k}", "flow0", [line] * 2000)


def old_fleet(ctx: ServerContext, app_id: str, want: Filter) -> tuple[int, int]:
    """The fleet page's first version: every row (to 20,000), filtered in Python."""
    with ctx.db.transaction() as s:
        devices, _ = devices_repo.search(
            s, app_id, DeviceQuery(), sort="name", descending=False, page=0, per_page=20_000
        )
        rows = [r for r in map(fleet_views.row, devices) if want.matches(r)]
    return len(rows[:500]), len(rows)


def new_fleet(ctx: ServerContext, app_id: str, want: Filter) -> tuple[int, int]:
    with ctx.db.transaction() as s:
        rows, matched = fleet_views.search(s, app_id, want, 500)
    return len(rows), matched


def old_timeline(ctx: ServerContext, app_id: str) -> int:
    """The timeline's first version: the device page's data (logs and all)."""
    with ctx.db.transaction() as s:
        dev = devices_repo.get(s, app_id, HEAVY)
        assert dev is not None
        events = device_events.recent(s, app_id, HEAVY, 100)
        logs = rollouts.logs_of_device(s, app_id, HEAVY)
        fleet_views.flows_of(dev)
        return len(events) + len(logs)


def run(devices: int, work: Path) -> dict[str, float]:
    from fastapi.testclient import TestClient

    db = f"sqlite:///{work / 'server.db'}"
    common = ["--db", db, "--state-dir", str(work)]
    app_id = admin(*common, "create-application", "--name", "bench", "--prefix", PREFIX)
    token = admin(*common, "create-token", "--application", app_id, "--scope", "all.Application")
    ctx = ServerContext(
        ServerConfig.model_validate({"db": db, "state_dir": str(work)}), with_broker=False
    )
    ctx.refresh_applications()
    seed(ctx, app_id, devices)
    out: dict[str, float] = {}
    filters = {
        "unfiltered": Filter(),
        "search": Filter(q="gateway 77"),
        "tag": Filter(tag="floor=3"),
        "online=no": Filter(online="no"),
    }
    for name, want in filters.items():
        assert old_fleet(ctx, app_id, want) == new_fleet(ctx, app_id, want), name
        out[f"fleet query, {name}: before"] = median_s(lambda w=want: old_fleet(ctx, app_id, w))
        out[f"fleet query, {name}: now"] = median_s(lambda w=want: new_fleet(ctx, app_id, w))
    out["timeline data: before"] = median_s(lambda: old_timeline(ctx, app_id))
    with TestClient(create_app(ctx)) as client:
        page = client.get("/console/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None
        r = client.post("/console/login", data={"csrf": csrf.group(1), "token": token})
        assert r.status_code == 200, r.text  # (followed to the fleet page)
        params = {"unfiltered": {}, "search": {"q": "gateway 77"}, "tag": {"tag": "floor=3"}}
        params["online=no"] = {"online": "no"}
        for name, p in params.items():

            def get(p: dict[str, str] = p) -> None:
                assert client.get("/console/", params=p).status_code == 200

            out[f"fleet page, {name}"] = median_s(get)

        def poll() -> None:
            assert client.get(f"/console/devices/{HEAVY}/timeline").status_code == 200

        out["timeline poll (HTTP): now"] = median_s(poll)
    ctx.db.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        got = run(args.devices, Path(tmp))
    if args.json:
        print(json.dumps(got, indent=2))
        return
    machine = f"{platform.machine()}, Python {platform.python_version()}"
    print(f"console, {args.devices:,} devices, SQLite; {machine}")
    for name, seconds in got.items():
        print(f"  {name:40} {seconds * 1000:9.1f} ms")


if __name__ == "__main__":
    main()

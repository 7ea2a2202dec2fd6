"""``edge-agent fleet --server``: the operator CLI through the control plane's API."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, Operator
from common import COUNTER_WASM
from server_harness import RunningServer, running_server, sim_fleet

from agent import cli
from agent.fleet.sim import Simulation

PREFIX = "edge"


@pytest.fixture
def server(tmp_path: Path, broker: Broker) -> Iterator[RunningServer]:
    db = f"sqlite:///{tmp_path / 'server.db'}"
    with running_server(tmp_path / "server", db, broker.url, prefix=PREFIX) as srv:
        yield srv


@pytest.fixture
async def fleet(tmp_path: Path, broker: Broker) -> AsyncIterator[Simulation]:
    async with sim_fleet(tmp_path, broker.url, PREFIX, 2) as sim:
        yield sim


async def fleet_cli(srv: RunningServer, tmp_path: Path, *argv: str) -> tuple[int, str]:
    token = tmp_path / "token"
    token.write_text(srv.token + "\n")
    conn = ["--server", srv.url, "--application", srv.app_id, "--token-file", str(token)]
    out, err = io.StringIO(), io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return cli.main(["fleet", *argv, *conn])

    rc = await asyncio.to_thread(call)
    return rc, out.getvalue() + err.getvalue()


async def rows(srv: RunningServer, tmp_path: Path) -> list[dict[str, Any]]:
    rc, out = await fleet_cli(srv, tmp_path, "get", "--json")
    assert rc == 0, out
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


async def test_release_get_stats_command_through_the_server(
    server: RunningServer, fleet: Simulation, operator: Operator, tmp_path: Path
) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while True:  # both devices in the inventory
        with server.http() as http:
            total = http.get(f"/applications/{server.app_id}/devices").json()["totalCount"]
        if total == 2:
            break
        assert asyncio.get_running_loop().time() < deadline, "devices never appeared"
        await asyncio.sleep(0.2)
    rc, out = await fleet_cli(
        server,
        tmp_path,
        "release",
        "--flow",
        "counter",
        "--version",
        "v1",
        "--artifact",
        str(COUNTER_WASM),
        "--all",
    )
    assert rc == 0, out
    assert "to 2 device(s)" in out
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        got = await rows(server, tmp_path)
        if len(got) == 2 and all(r["currentVersion"] == "v1" for r in got):
            break
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.3)
    # A second release of the same version and bytes reuses the uploaded version.
    rc, out = await fleet_cli(
        server,
        tmp_path,
        "release",
        "--flow",
        "counter",
        "--version",
        "v1",
        "--artifact",
        str(COUNTER_WASM),
        "--device",
        "sim-0001",
    )
    assert rc == 0, out
    # Other bytes under the same version are refused, saying why.
    other = tmp_path / "other.wasm"
    other.write_bytes(COUNTER_WASM.read_bytes() + b"\0")
    rc, out = await fleet_cli(
        server,
        tmp_path,
        "release",
        "--flow",
        "counter",
        "--version",
        "v1",
        "--artifact",
        str(other),
        "--all",
    )
    assert rc == 1
    assert "exists on the server with other bytes" in out
    rc, out = await fleet_cli(server, tmp_path, "stats", "--flow", "counter")
    assert rc == 0, out
    assert json.loads(out.strip().splitlines()[-1]).get("success", 0) >= 1

    operator.subscribe(f"{PREFIX}/+/command/response")
    rc, out = await fleet_cli(
        server, tmp_path, "command", "--device", "sim-0002", "--name", "agent.ping"
    )
    assert rc == 0, out
    answer = await operator.wait_for(
        f"{PREFIX}/sim-0002/command/response", lambda d: d.get("ok") is True, 10
    )
    assert answer["name"] == "agent.ping"

    rc, out = await fleet_cli(
        server, tmp_path, "rollout", "--flow", "counter", "--version", "v2", "--phase", "100%"
    )
    assert rc == 1
    assert "works over the broker only" in out


async def test_a_bad_token_is_a_clear_error(server: RunningServer, tmp_path: Path) -> None:
    token = tmp_path / "bad"
    token.write_text("eat_wrong")
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        rc = cli.main(
            [
                "fleet",
                "get",
                "--server",
                server.url,
                "--application",
                server.app_id,
                "--token-file",
                str(token),
            ]
        )
    assert rc == 1
    assert "server answered 401" in out.getvalue()

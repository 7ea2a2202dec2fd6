"""An application with a signing key: what the server releases is signed, and agents
that require signatures by that key install it (and refuse an unsigned release)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker
from common import COUNTER_WASM
from server_harness import RunningServer, admin, running_server, sim_fleet

from agent.fleet.sim import Simulation
from agent.wire.signing import generate

PREFIX = "signed"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "release.key", tmp_path / "release.pub"
    generate(private, public)
    return private, public


@pytest.fixture
def server(tmp_path: Path, broker: Broker) -> Iterator[RunningServer]:
    db = f"sqlite:///{tmp_path / 'server.db'}"
    with running_server(tmp_path / "server", db, broker.url, prefix=PREFIX) as srv:
        yield srv


@pytest.fixture
async def fleet(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> AsyncIterator[Simulation]:
    async with sim_fleet(
        tmp_path,
        broker.url,
        PREFIX,
        1,
        artifacts={"trusted_keys": [str(keys[1])], "require_signature": True},
        reconcile={"retry_backoff_initial": 0.2, "retry_backoff_max": 1.0},
    ) as sim:
        yield sim


async def record(srv: RunningServer, pred: Any) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        with srv.http() as http:
            items = http.get(f"/applications/{srv.app_id}/edge/deployments").json()["items"]
        if items and pred(items[0]):
            got: dict[str, Any] = items[0]
            return got
        assert asyncio.get_running_loop().time() < deadline, items
        await asyncio.sleep(0.2)


async def release(srv: RunningServer, version: str) -> None:
    with srv.http() as http:
        r = http.post(
            f"/applications/{srv.app_id}/edge/deployments/release",
            json={"flowId": "counter", "version": version, "deviceIds": ["sim-0001"]},
        )
        assert r.status_code == 201, r.text


async def test_signed_releases_install_and_unsigned_are_refused(
    server: RunningServer, fleet: Simulation, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    await record_inventory(server)
    wasm = COUNTER_WASM.read_bytes()
    assert server.upload("counter", "v1", wasm).status_code == 201
    # No key yet: the agent refuses the unsigned artifact.
    await release(server, "v1")
    failed = await record(server, lambda r: r["status"] == "failure")
    assert "requires signed artifacts" in (failed["error"] or "")
    common = ["--db", server.db_url, "--state-dir", str(server.cfg.state_dir)]
    out = admin(*common, "set-signing-key", "--application", server.app_id, "--key", str(keys[0]))
    assert "now signed" in out
    # The server's application row is read per release: the next one is signed.
    await release(server, "v1")
    done = await record(server, lambda r: r["status"] == "success")
    assert done["currentVersion"] == "v1"
    with server.http() as http:
        dev = http.get(f"/applications/{server.app_id}/devices/sim-0001").json()
    signature = dev["desired"]["flows"]["counter"]["artifact"]["signature"]
    assert set(signature) == {"keyId", "sig"}


async def record_inventory(srv: RunningServer) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        with srv.http() as http:
            if http.get(f"/applications/{srv.app_id}/devices").json()["totalCount"] == 1:
                return
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.2)


def test_a_key_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    from agent import cli

    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    common = ["--state-dir", str(tmp_path / "s")]
    app = admin(*common, "create-application", "--name", "x", "--prefix", "x")
    rc = cli.main(
        ["server", "admin", *common, "set-signing-key", "--application", app, "--key", str(bad)]
    )
    assert rc == 2

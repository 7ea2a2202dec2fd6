"""Mender's artifact repository on a real server: artifacts written by the real
``mender-artifact``, uploaded, listed and deleted by the real ``mender-cli``, read
back by ``mender-artifact read``; what the tools cannot send over plain HTTP; the one
repository (an artifact is a flow version of Losant's API, released to a real sim
agent); bad input refused with nothing stored."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import MOSQUITTO, Broker
from common import COUNTER_WASM
from mender_tools import (
    tool_env,
    write_artifact,
)
from server_harness import RunningServer, running_server

BASE = "/api/management/v1/deployments"
WASM = COUNTER_WASM.read_bytes()


@pytest.fixture(scope="module")
def mod_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed: run `make test` (it installs it)")
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, mod_broker: Broker) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("server")
    url = f"sqlite:///{root / 'server.db'}"
    with running_server(root / "state", url, mod_broker.url, prefix="mender") as server:
        yield server


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


def mender_cli(srv: RunningServer, *args: str, token: str | None = None) -> str:
    proc = subprocess.run(
        ["mender-cli", "--server", srv.url, "--token-value", token or srv.token, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**tool_env(), "HOME": str(srv.cfg.state_dir)},
        check=False,
    )
    assert proc.returncode == 0, f"mender-cli {args} exited {proc.returncode}:\n{proc.stderr}"
    return proc.stdout + proc.stderr


def artifacts(srv: RunningServer, token: str | None = None) -> list[dict[str, Any]]:
    with srv.http(token) as c:
        r = c.get(f"{BASE}/artifacts")
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()
    return items


def versions(srv: RunningServer, flow_id: str) -> list[dict[str, Any]]:
    with srv.http() as c:
        r = c.get(f"/applications/{srv.app_id}/flows/{flow_id}/versions")
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def stored_files(srv: RunningServer) -> set[str]:
    return {p.name for p in srv.cfg.artifact_dir.rglob("*") if p.is_file()}


def artifact_id(response: httpx.Response) -> str:
    assert response.status_code == 201, response.text
    location = response.headers["location"]
    assert location.startswith(f"{BASE}/artifacts/")
    assert response.content == b""
    return location.rsplit("/", 1)[1]


def delete(srv: RunningServer, ident: str) -> None:
    with srv.http() as c:
        assert c.delete(f"{BASE}/artifacts/{ident}").status_code == 204


# ---------------------------------------------------------------- Mender's tools


def test_mender_cli_uploads_lists_and_deletes(srv: RunningServer, work: Path) -> None:
    path = write_artifact(
        work,
        WASM,
        name="counter-1.0.0",
        device_types=["gw-a", "gw-b"],
        software_name="counter",
        software_version="1.0.0",
    )
    out = mender_cli(
        srv, "artifacts", "upload", "--no-progress", "--description", "nightly", str(path)
    )
    assert "upload successful" in out.lower(), out
    [art] = [a for a in artifacts(srv) if a["name"] == "counter-1.0.0"]
    assert art["description"] == "nightly"
    assert art["device_types_compatible"] == ["gw-a", "gw-b"]
    assert art["size"] == path.stat().st_size
    assert art["signed"] is False
    assert art["info"] == {"format": "mender", "version": 3}
    [update] = art["updates"]
    assert update["type_info"] == {"type": "wasm-flow"}
    [file] = update["files"]
    sha = hashlib.sha256(WASM).hexdigest()
    assert (file["name"], file["checksum"], file["size"]) == ("flow.wasm", sha, len(WASM))
    assert art["artifact_provides"]["rootfs-image.counter.version"] == "1.0.0"

    # One repository: the payload is version 1.0.0 of flow "counter" in Losant's API.
    [fv] = [v for v in versions(srv, "counter") if v["version"] == "1.0.0"]
    assert fv["kind"] == "wasm"
    assert fv["artifacts"] == [{"sha256": sha, "size": len(WASM), "deviceTypes": ["gw-a", "gw-b"]}]

    listed = mender_cli(srv, "artifacts", "list")
    assert "counter-1.0.0" in listed, listed
    assert art["id"] in listed, listed

    out = mender_cli(srv, "artifacts", "delete", art["id"])
    assert art["id"] not in {a["id"] for a in artifacts(srv)}
    assert not [v for v in versions(srv, "counter") if v["version"] == "1.0.0"]

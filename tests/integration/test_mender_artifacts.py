"""Mender's artifact repository on a real server: artifacts written by the real
``mender-artifact``, uploaded, listed and deleted by the real ``mender-cli``, read
back by ``mender-artifact read``; what the tools cannot send over plain HTTP; the one
repository (an artifact is a flow version of Losant's API, released to a real sim
agent); bad input refused with nothing stored."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import MOSQUITTO, Broker
from common import COUNTER_WASM, eea_samples, wait_until
from mender_tools import (
    edit_header,
    edit_json,
    edit_payload,
    entry,
    mender_artifact,
    pack,
    tar_members,
    tool_env,
    upload_artifact,
    with_manifest,
    write_artifact,
)
from postgres import PostgresCluster
from server_harness import RunningServer, admin, running_server, sim_fleet

from agent.server.artifact_store import artifact_url
from agent.server.db.models import Device, Rollout, RolloutPhase, utcnow

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


def mender_cli(srv: RunningServer, *args: str, ok: bool = True) -> str:
    """What the real mender-cli printed (it must exit 0, or 1 when not ``ok``)."""
    proc = subprocess.run(
        ["mender-cli", "--server", srv.url, "--token-value", srv.token, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**tool_env(), "HOME": str(srv.cfg.state_dir)},
        check=False,
    )
    assert proc.returncode == (0 if ok else 1), (
        f"mender-cli {args}: {proc.returncode}\n{proc.stderr}"
    )
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
    assert "upload successful" in out, out
    # The same name for the same device types again: refused (Mender's rule).
    out = mender_cli(srv, "artifacts", "upload", "--no-progress", str(path), ok=False)
    assert "failed with status 409" in out, out
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
    assert f"ID: {art['id']}\nName: counter-1.0.0\n" in listed, listed

    out = mender_cli(srv, "artifacts", "delete", art["id"])
    assert "delete successful" in out, out
    out = mender_cli(srv, "artifacts", "delete", art["id"], ok=False)
    assert "status 404" in out, out
    assert art["id"] not in {a["id"] for a in artifacts(srv)}
    assert not [v for v in versions(srv, "counter") if v["version"] == "1.0.0"]


# ---------------------------------------------------------------- plain HTTP


def generate(
    srv: RunningServer,
    data: bytes,
    token: str | None = None,
    file_name: str = "gen.wasm",
    **form: Any,
) -> httpx.Response:
    fields = {"name": "gen-1", "type": "wasm-flow", "device_types_compatible": "gw-a,gw-b", **form}
    with srv.http(token) as c:
        return c.post(
            f"{BASE}/artifacts/generate",
            files=[*((k, (None, v)) for k, v in fields.items()), ("file", (file_name, data))],
        )


def test_generate_download_link_and_conditional_requests(srv: RunningServer, work: Path) -> None:
    args = json.dumps({"software_name": "gen", "software_version": "2.0.0"})
    ident = artifact_id(generate(srv, WASM, description="made here", args=args))
    with srv.http() as c:
        art = c.get(f"{BASE}/artifacts/{ident}").json()
        assert art["name"] == "gen-1"
        assert art["description"] == "made here"
        assert art["artifact_provides"]["rootfs-image.gen.version"] == "2.0.0"
        link = c.get(f"{BASE}/artifacts/{ident}/download")
        assert link.status_code == 200, link.text
    doc = link.json()
    assert set(doc) == {"uri", "expire"}
    assert doc["expire"].endswith("Z")
    assert doc["uri"].startswith(f"{srv.url}/artifacts/{srv.app_id}/")
    assert [v["version"] for v in versions(srv, "gen")] == ["2.0.0"]

    # The link serves the .mender file, which the real mender-artifact reads.
    with httpx.Client(timeout=30) as plain:
        r = plain.get(doc["uri"])
        assert r.status_code == 200
        assert len(r.content) == art["size"]
        path = work / "downloaded.mender"
        path.write_bytes(r.content)
        out = mender_artifact("read", str(path)).stdout
        assert "Name: gen-1" in out, out
        assert "gw-a gw-b" in out, out
        assert hashlib.sha256(WASM).hexdigest() in out, out
        assert "rootfs-image.gen.version: 2.0.0" in out, out
        mender_artifact("validate", str(path))

        part = plain.get(doc["uri"], headers={"Range": "bytes=0-9"})
        assert part.status_code == 206
        assert part.content == r.content[:10]
        modified = r.headers["last-modified"]
        assert plain.get(doc["uri"], headers={"If-Modified-Since": modified}).status_code == 304
        earlier = formatdate(time.time() - 86400 * 365, usegmt=True)
        assert plain.get(doc["uri"], headers={"If-Modified-Since": earlier}).status_code == 200
        assert plain.get(doc["uri"], headers={"If-Unmodified-Since": earlier}).status_code == 412
        assert plain.get(doc["uri"], headers={"If-Unmodified-Since": modified}).status_code == 200

        sig = doc["uri"].split("sig=")[1][:64]
        forged = doc["uri"].replace(sig, sig[::-1])
        assert plain.get(forged).status_code == 404
        expires = int(doc["uri"].rsplit("expires=", 1)[1])
        later = doc["uri"].replace(f"expires={expires}", f"expires={expires + 3600}")
        assert plain.get(later).status_code == 404  # the signature covers the expiry
    sha = doc["uri"].split("?")[0].rsplit("/", 1)[1]
    key = srv.ctx.url_key(srv.app_id)
    assert key is not None
    stale = artifact_url(srv.url, key, srv.app_id, sha, int(time.time()) - 1)
    assert httpx.get(stale, timeout=30).status_code == 404
    delete(srv, ident)


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"type": "single_file"}, "single_file"),
        ({"type": "rootfs-image"}, "wasm-flow"),
        ({"device_types_compatible": ""}, "device_types_compatible"),
        ({"name": ""}, "name"),
        ({"args": "{"}, "args"),
        ({"args": json.dumps({"filename": "x"})}, "args"),
        ({"args": json.dumps({"software_name": "../x"})}, "software_name"),
        # File names mender-artifact would not write (its own reader would refuse the
        # first: a manifest is ASCII).
        ({"file_name": "flöw.wasm"}, "file: its name 'flöw.wasm' is not one"),
        ({"file_name": "my flow.wasm"}, "file: its name 'my flow.wasm' is not one"),
    ],
)
def test_generate_refuses(srv: RunningServer, form: dict[str, str], message: str) -> None:
    before = len(artifacts(srv))
    r = generate(srv, WASM, **form)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert len(artifacts(srv)) == before


def test_generate_checks_the_payload(srv: RunningServer) -> None:
    r = generate(srv, b"not wasm at all")
    assert r.status_code == 400
    assert "WebAssembly" in r.json()["error"]


def add_rollout(srv: RunningServer, name: str, status: str) -> str:
    """A deployment row naming ``name``. An unfinished one gets a phase that starts
    in a year, so the server's rollout engine, which looks at it meanwhile, does not
    finish it (a deployment with nothing left to do) under the test's feet."""
    with srv.ctx.db.transaction() as s:
        row = Rollout(application_id=srv.app_id, name="r", artifact_name=name, status=status)
        s.add(row)
        s.flush()
        if status != "finished":
            s.add(
                RolloutPhase(rollout_id=row.id, number=0, start_ts=utcnow() + timedelta(days=365))
            )
        return row.id


def drop_rollout(srv: RunningServer, ident: str) -> None:
    with srv.ctx.db.transaction() as s:
        row = s.get(Rollout, ident)
        assert row is not None
        s.delete(row)


def test_description_edit_and_delete_against_rollouts(srv: RunningServer) -> None:
    ident = artifact_id(generate(srv, WASM, name="edit-me"))
    url = f"{BASE}/artifacts/{ident}"
    with srv.http() as c:
        assert c.put(url, json={"description": "better"}).status_code == 204
        assert c.get(url).json()["description"] == "better"
        for bad in ({"description": "x" * 4097}, {"description": "a\u0000b"}, {"other": 1}, [1]):
            r = c.put(url, json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert set(r.json()) == {"error", "request_id"}
        assert c.get(url).json()["description"] == "better"

        rollout = add_rollout(srv, "edit-me", "inprogress")
        r = c.put(url, json={"description": "again"})
        assert r.status_code == 422, r.text
        assert "deployment" in r.json()["error"]
        r = c.delete(url)
        assert r.status_code == 409, r.text
        drop_rollout(srv, rollout)
        rollout = add_rollout(srv, "edit-me", "finished")
        assert c.put(url, json={"description": "again"}).status_code == 422
        assert c.delete(url).status_code == 204
        drop_rollout(srv, rollout)
        assert c.get(url).status_code == 404
        assert c.delete(url).status_code == 404
        for unknown in ("00000000-0000-0000-0000-000000000000", "nope", "x" * 300):
            assert c.get(f"{BASE}/artifacts/{unknown}").status_code == 404
            assert c.get(f"{BASE}/artifacts/{unknown}/download").status_code == 404
            assert c.put(f"{BASE}/artifacts/{unknown}", json={}).status_code == 404


def test_releases_and_storage(srv: RunningServer) -> None:
    one = artifact_id(generate(srv, WASM, name="rel-1", device_types_compatible="a"))
    two = artifact_id(generate(srv, WASM, name="rel-1", device_types_compatible="b"))
    three = artifact_id(generate(srv, WASM, name="rel-2", device_types_compatible="a"))
    # Mender's rule: one name, each device type once (Mender's server answers 422).
    r = generate(srv, WASM, name="rel-1", device_types_compatible="b,c")
    assert r.status_code == 409, r.text
    with srv.http() as c:
        releases = c.get(f"{BASE}/deployments/releases").json()
        named = {rel["name"]: {a["id"] for a in rel["artifacts"]} for rel in releases}
        assert named["rel-1"] == {one, two}
        assert named["rel-2"] == {three}
        only = c.get(f"{BASE}/deployments/releases", params={"name": "rel-2"}).json()
        assert [(x["name"], len(x["artifacts"])) for x in only] == [("rel-2", 1)]
        assert c.get(f"{BASE}/deployments/releases", params={"name": "none"}).json() == []
        by_name = c.get(f"{BASE}/artifacts", params={"name": "rel-1"}).json()
        assert {a["id"] for a in by_name} == {one, two}

        usage = c.get(f"{BASE}/limits/storage").json()
        assert usage["limit"] == 0
        assert usage["usage"] == sum(a["size"] for a in artifacts(srv))
        srv.ctx.cfg.storage_limit = usage["usage"] + 100  # (the server's own setting)
        try:
            assert c.get(f"{BASE}/limits/storage").json()["limit"] == usage["usage"] + 100
            r = generate(srv, WASM, name="rel-3")
            assert r.status_code == 413, r.text
            assert "storage limit" in r.json()["error"]
        finally:
            srv.ctx.cfg.storage_limit = 0
    assert "rel-3" not in {a["name"] for a in artifacts(srv)}
    for ident in (one, two, three):
        delete(srv, ident)


def test_scopes_and_applications(srv: RunningServer) -> None:
    ident = artifact_id(generate(srv, WASM, name="mine"))
    reader = srv.token_with("artifacts.get")
    losant_only = srv.token_with("flows.get", "flows.post")
    with srv.http(reader) as c:
        assert c.get(f"{BASE}/artifacts/{ident}").status_code == 200
        assert c.get(f"{BASE}/limits/storage").status_code == 200
        assert c.delete(f"{BASE}/artifacts/{ident}").status_code == 403
        assert c.put(f"{BASE}/artifacts/{ident}", json={}).status_code == 403
    assert generate(srv, WASM, token=reader, name="not-mine").status_code == 403
    with srv.http(losant_only) as c:
        r = c.get(f"{BASE}/artifacts")
        assert r.status_code == 403
        assert "artifacts.get" in r.json()["error"]
    with httpx.Client(base_url=srv.url, timeout=30) as anonymous:
        assert anonymous.get(f"{BASE}/artifacts").status_code == 401

    common = ["--db", srv.db_url, "--state-dir", str(srv.cfg.state_dir)]
    other_app = admin(*common, "create-application", "--name", "other", "--prefix", "other")
    other = admin(*common, "create-token", "--application", other_app, "--scope", "all.Application")
    with srv.http(other) as c:
        assert c.get(f"{BASE}/artifacts").json() == []
        assert c.get(f"{BASE}/artifacts/{ident}").status_code == 404
        assert c.get(f"{BASE}/artifacts/{ident}/download").status_code == 404
        assert c.put(f"{BASE}/artifacts/{ident}", json={}).status_code == 404
        assert c.delete(f"{BASE}/artifacts/{ident}").status_code == 404
    delete(srv, ident)


# ---------------------------------------------------------------- one repository


@pytest.fixture(scope="module")
def pg_srv(
    tmp_path_factory: pytest.TempPathFactory, mod_broker: Broker, postgres: PostgresCluster
) -> Iterator[RunningServer]:
    url = postgres.create_database(f"mender_artifacts_{uuid.uuid4().hex[:12]}")
    root = tmp_path_factory.mktemp("pg-server")
    with running_server(root, url, mod_broker.url, prefix="pg") as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def any_srv(request: pytest.FixtureRequest) -> RunningServer:
    server: RunningServer = request.getfixturevalue(
        "srv" if request.param == "sqlite" else "pg_srv"
    )
    return server


def test_artifacts_of_one_version_are_its_items(any_srv: RunningServer, work: Path) -> None:
    srv = any_srv
    sha = hashlib.sha256(WASM).hexdigest()
    eea = (eea_samples() / "hello-world-memory-export.wasm").read_bytes()

    def make(name: str, types: list[str], payload: bytes = WASM, **kw: Any) -> Path:
        return write_artifact(
            work,
            payload,
            name=name,
            device_types=types,
            software_name="ext",
            software_version="3.0.0",
            **kw,
        )

    a = artifact_id(upload_artifact(srv.url, srv.token, make("ext-a", ["gw-a"])))
    b = artifact_id(upload_artifact(srv.url, srv.token, make("ext-b", ["gw-b", "gw-c"], WASM)))
    [fv] = versions(srv, "ext")
    assert fv["kind"] == "wasm"
    assert fv["artifacts"] == [
        {"sha256": sha, "size": len(WASM), "deviceTypes": ["gw-a"]},
        {"sha256": sha, "size": len(WASM), "deviceTypes": ["gw-b", "gw-c"]},
    ]
    files = stored_files(srv)
    r = upload_artifact(srv.url, srv.token, make("ext-c", ["gw-c"]))
    assert r.status_code == 409, r.text
    assert "gw-b, gw-c" in r.json()["error"]
    r = upload_artifact(srv.url, srv.token, make("ext-d", ["gw-d"], eea, type_="eea-flow"))
    assert r.status_code == 409, r.text
    assert "kind wasm" in r.json()["error"]
    assert stored_files(srv) == files
    assert {x["name"] for x in artifacts(srv)} >= {"ext-a", "ext-b"}
    assert "ext-c" not in {x["name"] for x in artifacts(srv)}

    # An EEA module is a flow of kind eea.
    e = artifact_id(
        upload_artifact(
            srv.url,
            srv.token,
            write_artifact(
                work,
                eea,
                name="hello-1",
                device_types=["gw-a"],
                software_name="hello",
                software_version="1",
                type_="eea-flow",
                file_name="hello.wasm",
            ),
        )
    )
    assert [(v["kind"], v["artifacts"][0]["size"]) for v in versions(srv, "hello")] == [
        ("eea", len(eea))
    ]

    delete(srv, a)
    [fv] = versions(srv, "ext")
    assert [i["deviceTypes"] for i in fv["artifacts"]] == [["gw-b", "gw-c"]]
    delete(srv, b)
    delete(srv, e)
    assert versions(srv, "ext") == []
    assert versions(srv, "hello") == []


def _waiting_on_locks(postgres: PostgresCluster, database: str) -> int:
    with postgres.connect(database, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


async def test_concurrent_uploads_keep_every_item_and_the_name_rule(
    pg_srv: RunningServer, postgres: PostgresCluster, work: Path
) -> None:
    """Uploads racing on PostgreSQL. This test holds the rows of the flow versions
    until all four uploads wait on a lock, each having read what it checks: without
    serializing, each would then write from what it read (two new items of one
    version, one lost and its artifact row pointing at nothing; two artifacts of one
    name for one device type, against Mender's rule)."""
    srv = pg_srv

    def make(name: str, flow: str, types: list[str], sub: str) -> Path:
        return write_artifact(
            work / sub, WASM, name=name, device_types=types, software_name=flow,
            software_version="1",
        )  # fmt: skip

    for flow in ("race", "na", "nb"):
        artifact_id(upload_artifact(srv.url, srv.token, make(f"{flow}-0", flow, ["gw-0"], flow)))
    racers = [
        make("race-1", "race", ["gw-1"], "a"),
        make("race-2", "race", ["gw-2"], "b"),
        make("dup", "na", ["gw-x"], "c"),
        make("dup", "nb", ["gw-x"], "d"),
    ]
    database = srv.db_url.rsplit("/", 1)[1]
    results: dict[int, httpx.Response] = {}
    with postgres.connect(database) as holder:
        holder.execute(
            "SELECT id FROM flow_versions WHERE flow_id IN ('race', 'na', 'nb') FOR UPDATE"
        )
        threads = [
            threading.Thread(
                target=lambda i=i, p=p: results.__setitem__(
                    i, upload_artifact(srv.url, srv.token, p)
                )
            )
            for i, p in enumerate(racers)
        ]
        for t in threads:
            t.start()
        await wait_until(
            lambda: _waiting_on_locks(postgres, database) == len(racers), 30, "4 uploads waiting"
        )
        holder.commit()
    for t in threads:
        t.join(30)
    codes = [results[i].status_code for i in range(len(racers))]
    assert codes[:2] == [201, 201], [r.text for r in results.values()]
    assert sorted(codes[2:]) == [201, 409], [r.text for r in results.values()]
    assert "dup" in results[2 if codes[2] == 409 else 3].json()["error"]

    [fv] = versions(srv, "race")
    assert sorted(i["deviceTypes"] for i in fv["artifacts"]) == [["gw-0"], ["gw-1"], ["gw-2"]]
    # Every artifact row is an item of its flow version (none points at nothing).
    items = {
        (flow, tuple(i["deviceTypes"]))
        for flow in ("race", "na", "nb")
        for v in versions(srv, flow)
        for i in v["artifacts"]
    }
    rows = [a for a in artifacts(srv) if a["name"].startswith(("race", "na-", "nb-", "dup"))]
    for a in rows:
        [flow] = [k.split(".")[1] for k in a["artifact_provides"] if k.endswith(".version")]
        assert (flow, tuple(a["device_types_compatible"])) in items, a
    assert len([a for a in rows if a["name"] == "dup"]) == 1
    for a in rows:
        delete(srv, a["id"])


async def test_an_uploaded_artifact_is_released_through_losants_api(
    srv: RunningServer, mod_broker: Broker, work: Path
) -> None:
    path = write_artifact(
        work,
        WASM,
        name="counter-5.0.0",
        device_types=["gw-a"],
        software_name="counter",
        software_version="5.0.0",
    )
    ident = artifact_id(upload_artifact(srv.url, srv.token, path))
    sha = hashlib.sha256(WASM).hexdigest()
    async with sim_fleet(
        work, mod_broker.url, srv.prefix, 1, device_type="gw-a", mqtt={"keepalive": 5}
    ) as sim:
        device = sim.config(1).device_id
        app = srv.app_id
        with srv.http() as c:

            def known() -> bool:
                return c.get(f"/applications/{app}/devices/{device}").status_code == 200

            await wait_until(known, 30, "the device in the inventory")
            r = c.post(
                f"/applications/{app}/edge/deployments/release",
                json={"flowId": "counter", "version": "5.0.0", "deviceIds": [device]},
            )
            assert r.status_code == 201, r.text
            with srv.ctx.db.transaction() as s:
                row = s.get(Device, (app, device))
                assert row is not None
                assert sha in json.dumps(row.desired)

            def running() -> bool:
                items = c.get(
                    f"/applications/{app}/edge/deployments", params={"deviceId": device}
                ).json()["items"]
                return any(d["currentVersion"] == "5.0.0" for d in items)

            await wait_until(running, 30, "version 5.0.0 running on the device")
    # Deleted through Mender's API, the artifact goes; the flow version a device
    # still wants stays.
    delete(srv, ident)
    assert [v["version"] for v in versions(srv, "counter")] == ["5.0.0"]


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_artifact(
        tmp_path_factory.mktemp("good"),
        WASM,
        name="good-1",
        device_types=["gw-a"],
        software_name="good",
        software_version="1",
    )
    return path.read_bytes()


def _members_with(data: bytes, *extra: tuple[tarfile.TarInfo, bytes], drop: str = "") -> bytes:
    kept = [(i, b) for i, b in tar_members(data) if i.name != drop]
    return pack([*kept, *extra])


def _renamed(data: bytes, old: str, new: str) -> bytes:
    out = []
    for info, body in tar_members(data):
        if info.name == old:
            info.name = new
        out.append((info, body))
    return pack(with_manifest(out))


def _version(data: bytes, doc: dict[str, Any]) -> bytes:
    body = json.dumps(doc).encode()
    return pack(
        with_manifest([(i, body if i.name == "version" else b) for i, b in tar_members(data)])
    )


def _bad_checksum(data: bytes) -> bytes:
    out = []
    for info, body in tar_members(data):
        line = body.split(b"\n")[0]
        out.append(
            (info, body.replace(line, b"0" * 64 + line[64:]) if info.name == "manifest" else body)
        )
    return pack(out)


def _flipped(data: bytes) -> bytes:
    members = tar_members(data)
    info, body = members[-1]
    middle = len(body) // 2
    members[-1] = (info, body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :])
    return pack(members)


def _header_bomb(files: dict[str, bytes]) -> None:
    files["header-info"] += b" " * (3 << 20)


BAD: dict[str, tuple[Any, str]] = {
    "corrupt": (_flipped, "gzip"),
    "truncated": (lambda d: d[: len(d) // 2], "tar"),
    "wrong checksum": (_bad_checksum, "checksum"),
    "dot-dot name": (lambda d: _members_with(d, entry("../evil", b"x")), "'..'"),
    "absolute name": (lambda d: _members_with(d, entry("/etc/evil", b"x")), "absolute"),
    "symlink": (
        lambda d: _members_with(
            d,
            entry("data/0000.tar.gz", kind=tarfile.SYMTYPE, link="/etc/passwd"),
            drop="data/0000.tar.gz",
        ),
        "a link",
    ),
    "two payloads": (
        lambda d: edit_json(d, "header-info", lambda h: h["payloads"].append(h["payloads"][0])),
        "2 payloads",
    ),
    "no device types": (
        lambda d: edit_json(
            d, "header-info", lambda h: h["artifact_depends"].update(device_type=[])
        ),
        "device types",
    ),
    "zstd": (lambda d: _renamed(d, "header.tar.gz", "header.tar.zst"), "zstd"),
    "header bomb": (lambda d: edit_header(d, _header_bomb), "decompressed"),
    "format version 2": (lambda d: _version(d, {"format": "mender", "version": 2}), "version 2"),
    "two files": (
        lambda d: edit_payload(d, [entry("a.wasm", WASM), entry("b.wasm", WASM)]),
        "2 files",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_artifacts_are_refused_and_leave_nothing(
    srv: RunningServer, good: bytes, work: Path, case: str
) -> None:
    make, message = BAD[case]
    path = work / "bad.mender"
    path.write_bytes(make(good))
    before = (len(artifacts(srv)), versions(srv, "good"), stored_files(srv))
    r = upload_artifact(srv.url, srv.token, path)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"], r.json()
    assert (len(artifacts(srv)), versions(srv, "good"), stored_files(srv)) == before


@pytest.mark.parametrize(
    ("payload", "type_", "message"),
    [(b"not a module", "wasm-flow", "WebAssembly"), (WASM, "script", "wasm-flow")],
)
def test_payloads_this_server_cannot_deploy_are_refused(
    srv: RunningServer, work: Path, payload: bytes, type_: str, message: str
) -> None:
    path = write_artifact(
        work,
        payload,
        name="odd-1",
        device_types=["gw-a"],
        software_name="odd",
        software_version="1",
        type_=type_,
    )
    before = stored_files(srv)
    r = upload_artifact(srv.url, srv.token, path)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert stored_files(srv) == before
    assert versions(srv, "odd") == []

"""The orphan sweep of the artifact store, on real SQLite and PostgreSQL databases:
bytes of deleted artifacts and flow versions go once the grace has passed; what
another version, artifact, desired document or export still needs stays; files
without a row and interrupted uploads go; a dry run touches nothing; two sweeps at
once remove each file once. Ages are set in the past, never slept through."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from common import COUNTER_WASM
from sqlalchemy import select, update

from agent import cli
from agent.server import mender_artifact
from agent.server.artifact_store import ArtifactStore, artifact_url
from agent.server.config import MIN_SWEEP_GRACE_S, ServerConfig
from agent.server.context import ServerContext
from agent.server.db import applications as apps_repo
from agent.server.db import devices as devices_repo
from agent.server.db.engine import Database
from agent.server.db.models import Application, Blob, Deployment, Device, Job, utcnow
from agent.server.service import artifacts, deployments, exports, flow_versions
from agent.server.service.artifact_sweep import SweepReport, sweep

HOUR = 3600.0
BASE = COUNTER_WASM.read_bytes()


def wasm(tag: str) -> bytes:
    """A valid module of its own bytes: the counter with a custom section."""
    content = b"\x03tag" + tag.encode()
    assert len(content) < 128
    return BASE + b"\x00" + bytes([len(content)]) + content


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def ctx(db_url: str, tmp_path: Path) -> Iterator[ServerContext]:
    cfg = ServerConfig.model_validate(
        {"db": db_url, "state_dir": str(tmp_path / "state"), "sweep_interval_s": 0}
    )
    c = ServerContext(cfg, with_broker=False)
    try:
        yield c
    finally:
        c.db.close()


@pytest.fixture
def app(ctx: ServerContext) -> Application:
    with ctx.db.transaction() as s:
        return apps_repo.create_application(s, "sweep", "edge")


def upload(ctx: ServerContext, app: Application, flow: str, version: str, data: bytes) -> None:
    flow_versions.create(
        ctx,
        app,
        flow,
        version=version,
        kind="wasm",
        files=[io.BytesIO(data)],
        device_types=None,
        manifest=None,
        notes="",
        per_type=False,
    )


def upload_mender(ctx: ServerContext, app: Application, name: str, payload: bytes) -> str:
    data = mender_artifact.write(
        payload,
        name=name,
        device_types=["pi"],
        payload_type="wasm-flow",
        file_name="counter.wasm",
        provides={"rootfs-image.menderflow.version": name},
    )
    return artifacts.store(ctx, app, data, "")


def delete_named(ctx: ServerContext, app: Application, name: str) -> list[str]:
    """Delete the artifacts named ``name`` (a flow version's are ``{flow}-{version}``)."""
    ids = [a["id"] for a in artifacts.list_all(ctx, app, name)]
    assert ids, f"no artifact {name}"
    return [artifacts.delete(ctx, app, i) for i in ids]


def on_disk(ctx: ServerContext) -> set[str]:
    return {name for name, _ in ctx.store.stored()}


def rows(ctx: ServerContext) -> set[str]:
    with ctx.db.transaction() as s:
        return set(s.scalars(select(Blob.sha256)))


def backdate(ctx: ServerContext, *digests: str, seconds: float = 2 * HOUR) -> None:
    """Make the blob rows, files and marks of ``digests`` ``seconds`` old."""
    then = time.time() - seconds
    with ctx.db.transaction() as s:
        s.execute(
            update(Blob)
            .where(Blob.sha256.in_(digests))
            .values(created=utcnow() - timedelta(seconds=seconds))
        )
    for d in digests:
        for path in (ctx.store.path(d), ctx.store.root / ".orphans" / d):
            if path.exists():
                os.utime(path, (then, then))


def run(ctx: ServerContext, grace: float = 0, dry_run: bool = False) -> SweepReport:
    return sweep(ctx.db, ctx.store, grace_s=grace, dry_run=dry_run)


def add_device(ctx: ServerContext, app: Application, device_id: str, device_type: str) -> None:
    with ctx.db.transaction() as s:
        devices_repo.create(
            s,
            app.id,
            device_id=device_id,
            name=device_id,
            description="",
            tags=[],
            attributes=[],
            device_class="edgeCompute",
            device_type=device_type,
        )


# ---------------------------------------------------------------- what goes, and when


def test_a_deleted_version_is_swept_once_the_grace_has_passed(
    ctx: ServerContext, app: Application
) -> None:
    data = wasm("one")
    upload(ctx, app, "counter", "v1", data)
    digest = sha(data)
    assert delete_named(ctx, app, "counter-v1") == ["deleted"]
    assert digest in on_disk(ctx)
    assert digest in rows(ctx)

    # Just deleted: the row and the file are younger than the grace.
    report = run(ctx, grace=HOUR)
    assert (report.files, report.blobs, report.pending) == (0, 0, 1)
    assert digest in on_disk(ctx)
    assert digest in rows(ctx)

    # Old bytes, but seen unreferenced for the first time now: marked, kept.
    backdate(ctx, digest)
    report = run(ctx, grace=HOUR)
    assert (report.files, report.blobs, report.pending) == (0, 0, 1)
    assert digest in on_disk(ctx)
    assert (ctx.store.root / ".orphans" / digest).exists()

    # Unreferenced since more than the grace: gone, file, row and mark.
    backdate(ctx, digest)
    report = run(ctx, grace=HOUR)
    assert (report.files, report.bytes, report.blobs, report.pending) == (1, len(data), 1, 0)
    assert digest not in on_disk(ctx)
    assert digest not in rows(ctx)
    assert not (ctx.store.root / ".orphans" / digest).exists()
    assert not ctx.store.path(digest).exists()
    # Nothing left for the next one.
    assert run(ctx, grace=0) == SweepReport()


def test_a_deleted_mender_artifact_takes_its_file_and_its_payload(
    ctx: ServerContext, app: Application
) -> None:
    payload = wasm("mender")
    upload_mender(ctx, app, "rel-1", payload)
    stored = on_disk(ctx)
    assert sha(payload) in stored
    assert len(stored) == 2
    assert delete_named(ctx, app, "rel-1") == ["deleted"]
    report = run(ctx)
    assert (report.files, report.blobs) == (2, 2)
    assert on_disk(ctx) == set()
    assert rows(ctx) == set()


def test_bytes_another_version_or_artifact_holds_stay(ctx: ServerContext, app: Application) -> None:
    shared, alone = wasm("shared"), wasm("alone")
    upload(ctx, app, "a", "v1", shared)
    upload(ctx, app, "b", "v1", shared)  # the same bytes, another flow
    upload_mender(ctx, app, "rel-1", shared)  # and a Mender artifact's payload
    upload(ctx, app, "c", "v1", alone)
    mender_file = (on_disk(ctx) - {sha(shared), sha(alone)}).pop()

    delete_named(ctx, app, "a-v1")
    delete_named(ctx, app, "c-v1")
    report = run(ctx)
    assert (report.files, report.blobs) == (1, 1)
    assert on_disk(ctx) == {sha(shared), mender_file}

    delete_named(ctx, app, "b-v1")
    report = run(ctx)
    assert report.files == 0  # the Mender artifact's payload
    assert on_disk(ctx) == {sha(shared), mender_file}

    delete_named(ctx, app, "rel-1")
    report = run(ctx)
    assert (report.files, report.blobs) == (2, 2)
    assert on_disk(ctx) == set()


def test_what_a_desired_document_names_stays_after_its_item_is_deleted(
    ctx: ServerContext, app: Application
) -> None:
    """A version with one payload per device type, released to a ``pi``: the ``pi``
    item's artifact is deleted (the version keeps the other item), the device's
    document still names it, so its bytes stay until a release replaces it."""
    pi, x86 = wasm("pi"), wasm("x86")
    flow_versions.create(
        ctx,
        app,
        "counter",
        version="v1",
        kind="wasm",
        files=[io.BytesIO(pi), io.BytesIO(x86)],
        device_types='[["pi"], ["x86"]]',
        manifest=None,
        notes="",
        per_type=True,
    )
    add_device(ctx, app, "d1", "pi")
    deployments.release(ctx, app, "edge", "counter", "v1", ["d1"])
    pi_artifact = next(
        a["id"]
        for a in artifacts.list_all(ctx, app, "counter-v1")
        if a["device_types_compatible"] == ["pi"]
    )
    assert artifacts.delete(ctx, app, pi_artifact) == "removed"

    report = run(ctx)
    assert (report.files, report.blobs) == (0, 0)
    assert {sha(pi), sha(x86)} <= on_disk(ctx)
    # The device can still download it.
    with ctx.db.transaction() as s:
        dev = s.get(Device, (app.id, "d1"))
        assert dev is not None
        entry = dev.desired["flows"]["counter"]
    assert entry["artifacts"][0]["sha256"] == sha(pi)

    deployments.remove(ctx, app, "edge", "counter", "d1")
    report = run(ctx)
    assert (report.files, report.blobs) == (1, 1)
    assert sha(pi) not in on_disk(ctx)
    assert sha(x86) in on_disk(ctx)


def test_a_digest_named_only_in_a_url_stays(ctx: ServerContext, app: Application) -> None:
    """An entry naming its artifact only by URL (signed, or an ``mqtt:`` topic)."""
    by_url, by_topic = wasm("url"), wasm("topic")
    upload(ctx, app, "u", "v1", by_url)
    upload(ctx, app, "t", "v1", by_topic)
    add_device(ctx, app, "d1", "pi")
    url = artifact_url("http://srv", app.url_key, app.id, sha(by_url))
    with ctx.db.transaction() as s:
        dev = s.get(Device, (app.id, "d1"))
        assert dev is not None
        dev.desired = {
            "generation": 1,
            "flows": {
                "u": {"version": "v1", "artifact": {"url": url, "kind": "wasm"}},
                "t": {
                    "version": "v1",
                    "artifact": {"url": f"mqtt:edge/artifacts/{sha(by_topic)}", "kind": "wasm"},
                },
            },
        }
    delete_named(ctx, app, "u-v1")
    delete_named(ctx, app, "t-v1")
    assert run(ctx).files == 0
    assert {sha(by_url), sha(by_topic)} <= on_disk(ctx)


def test_what_a_device_runs_stays_for_its_export(ctx: ServerContext, app: Application) -> None:
    """The embedded export zips the digests devices report they run, from the store."""
    old, new = wasm("old"), wasm("new")
    upload(ctx, app, "counter", "v1", old)
    add_device(ctx, app, "d1", "pi")
    deployments.release(ctx, app, "embedded", "counter", "v1", ["d1"])
    with ctx.db.transaction() as s:  # the device reports it (what the inventory records)
        s.execute(
            update(Deployment)
            .where(Deployment.application_id == app.id, Deployment.device_id == "d1")
            .values(current_version="v1", current_sha256=sha(old), status="running")
        )
    upload(ctx, app, "counter", "v2", new)
    deployments.release(ctx, app, "embedded", "counter", "v2", ["d1"])
    assert delete_named(ctx, app, "counter-v1") == ["deleted"]

    report = run(ctx)
    assert report.files == 0
    assert sha(old) in on_disk(ctx)
    job = exports.start_wasm_export(ctx, app, "d1", None)
    deadline = time.monotonic() + 20
    while True:
        with ctx.db.transaction() as s:
            row = s.get(Job, job)
            assert row is not None
            status = row.status
        if status != "queued" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert status == "done", row.result
    with zipfile.ZipFile(exports.export_path(ctx, job)) as zf:
        assert zf.read("counter.wasm") == old


# ---------------------------------------------------------------- files without rows


def test_files_without_a_row_go_after_the_grace(ctx: ServerContext) -> None:
    """What an upload wrote before a crash kept it from committing its row."""
    young = ctx.store.put_bytes(wasm("young"), 1 << 20).sha256
    old = ctx.store.put_bytes(wasm("old"), 1 << 20).sha256
    backdate(ctx, old)
    report = run(ctx, grace=HOUR)
    assert (report.files, report.pending) == (0, 2)  # young; old seen for the first time
    backdate(ctx, old)
    report = run(ctx, grace=HOUR)
    assert (report.files, report.blobs, report.pending) == (1, 0, 1)
    assert on_disk(ctx) == {young}


def test_temporary_files_of_interrupted_uploads_go_after_the_grace(ctx: ServerContext) -> None:
    root = ctx.store.root
    stale, fresh = root / ".upload-crashed", root / ".upload-writing"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 10)
    then = time.time() - 2 * HOUR
    os.utime(stale, (then, then))
    report = run(ctx, grace=HOUR)
    assert (report.temp_files, report.temp_bytes) == (1, 100)
    assert not stale.exists()
    assert fresh.exists()


def test_files_a_crashed_sweep_left_aside(ctx: ServerContext, app: Application) -> None:
    """Moved aside to be removed, then the process died: unreferenced, it goes; a
    referenced one whose file is missing is put back."""
    kept = wasm("kept")
    upload(ctx, app, "k", "v1", kept)
    lost = ctx.store.path(sha(kept))
    then = int(time.time() - 2 * HOUR)
    aside = ctx.store.root / f".sweep-{then}-{sha(kept)}-{'0' * 12}"
    os.rename(lost, aside)
    junk = ctx.store.root / f".sweep-{then}-{sha(b'junk')}-{'1' * 12}"
    junk.write_bytes(b"junk")
    recent = ctx.store.root / f".sweep-{int(time.time())}-{sha(b'recent')}-{'2' * 12}"
    recent.write_bytes(b"recent")
    report = run(ctx, grace=0)
    assert (report.temp_files, report.temp_bytes, report.files) == (1, 4, 0)
    assert lost.read_bytes() == kept
    assert not aside.exists()
    assert not junk.exists()
    assert recent.exists()  # (another sweep's, in the middle of its removal)


def test_a_file_rewritten_by_an_upload_is_not_lost(ctx: ServerContext) -> None:
    """The removal renames the file aside: bytes an upload wrote meanwhile go back."""
    digest = ctx.store.put_bytes(wasm("rewritten"), 1 << 20).sha256
    cutoff = time.time() - HOUR
    assert ctx.store.discard(digest, cutoff) is None  # fresh: put back
    assert digest in on_disk(ctx)
    backdate(ctx, digest)
    assert ctx.store.discard(digest, cutoff) == len(wasm("rewritten"))
    assert ctx.store.discard(digest, cutoff) is None  # gone: nothing to do
    assert list(ctx.store.root.glob(".sweep-*")) == []


# ---------------------------------------------------------------- dry run, concurrency


def _orphans(ctx: ServerContext, app: Application, count: int) -> list[bytes]:
    made = []
    for i in range(count):
        data = wasm(f"orphan-{i}")
        upload(ctx, app, f"f{i}", "v1", data)
        delete_named(ctx, app, f"f{i}-v1")
        made.append(data)
    return made


def test_a_dry_run_removes_nothing_and_says_what_a_sweep_would(
    ctx: ServerContext, app: Application
) -> None:
    made = _orphans(ctx, app, 2)
    upload(ctx, app, "live", "v1", wasm("live"))
    ctx.store.put_bytes(wasm("rowless"), 1 << 20)
    (ctx.store.root / ".upload-crashed").write_bytes(b"t" * 7)
    before = (on_disk(ctx), rows(ctx), sorted(p.name for p in ctx.store.root.rglob("*")))
    dry = run(ctx, grace=0, dry_run=True)
    assert (on_disk(ctx), rows(ctx), sorted(p.name for p in ctx.store.root.rglob("*"))) == before
    assert dry.dry_run
    assert (dry.files, dry.blobs, dry.temp_files, dry.temp_bytes) == (3, 2, 1, 7)
    assert dry.bytes == sum(len(d) for d in made) + len(wasm("rowless"))
    real = run(ctx, grace=0)
    assert real.as_dict() == {**dry.as_dict(), "dry_run": False}
    assert on_disk(ctx) == {sha(wasm("live"))}


def test_two_sweeps_at_once_remove_each_file_once(
    ctx: ServerContext, app: Application, db_url: str
) -> None:
    """Two processes' sweeps (their own engines) started together."""
    made = _orphans(ctx, app, 6)
    rowless = [ctx.store.put_bytes(wasm(f"rowless-{i}"), 1 << 20) for i in range(3)]
    upload(ctx, app, "live", "v1", wasm("live"))
    other = Database(db_url)
    stores = [ctx.store, ArtifactStore(ctx.store.root)]
    dbs = [ctx.db, other]
    barrier = threading.Barrier(2)
    reports: list[SweepReport] = []
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            barrier.wait(10)
            reports.append(sweep(dbs[i], stores[i], grace_s=0))
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        other.close()
    assert errors == []
    assert len(reports) == 2
    assert sum(r.files for r in reports) == len(made) + len(rowless)
    assert sum(r.bytes for r in reports) == sum(len(d) for d in made) + sum(r.size for r in rowless)
    assert sum(r.blobs for r in reports) == len(made)
    assert on_disk(ctx) == {sha(wasm("live"))}
    assert rows(ctx) == {sha(wasm("live"))}


# ---------------------------------------------------------------- the command, the thread


def admin(ctx: ServerContext, *argv: str) -> str:
    out = io.StringIO()
    common = ["--db", ctx.cfg.db_url, "--state-dir", str(ctx.cfg.state_dir)]
    with contextlib.redirect_stdout(out):
        rc = cli.main(["server", "admin", *common, "sweep-artifacts", *argv])
    assert rc == 0, f"exited {rc}"
    return out.getvalue()


def test_the_admin_command(ctx: ServerContext, app: Application) -> None:
    (data,) = _orphans(ctx, app, 1)
    n = len(data)
    # The setting's grace (an hour): the fresh orphan waits.
    assert admin(ctx).splitlines() == [
        "removed: 0 artifact files (0 bytes), 0 blob rows, 0 temporary files (0 bytes)",
        "kept for the grace (3600 s): 1 unreferenced",
    ]
    # Under 600 s only with --force (an upload in progress could lose its bytes).
    with pytest.raises(AssertionError, match="exited 2"):
        admin(ctx, "--grace", "0")
    assert sha(data) in on_disk(ctx)
    assert admin(ctx, "--dry-run", "--grace", "0", "--force").splitlines()[0] == (
        f"would remove: 1 artifact file ({n} bytes), 1 blob row, 0 temporary files (0 bytes)"
    )
    assert sha(data) in on_disk(ctx)
    assert admin(ctx, "--grace", "0", "--force").splitlines()[0] == (
        f"removed: 1 artifact file ({n} bytes), 1 blob row, 0 temporary files (0 bytes)"
    )
    assert on_disk(ctx) == set()


def test_the_server_sweeps_in_the_background(db_url: str, tmp_path: Path) -> None:
    cfg = ServerConfig.model_validate({"db": db_url, "state_dir": str(tmp_path / "bg")})
    # (a sweep every 0.1 s: under the settings' minute, which the model refuses)
    ctx = ServerContext(cfg.model_copy(update={"sweep_interval_s": 0.1}), with_broker=False)
    with ctx.db.transaction() as s:
        app = apps_repo.create_application(s, "bg", "edge")
    (data,) = _orphans(ctx, app, 1)
    backdate(ctx, sha(data))  # (row and file two hours old: past the setting's hour)
    run(ctx, grace=HOUR)  # (seen unreferenced: marked now)
    backdate(ctx, sha(data))  # (and the mark two hours old)
    ctx.start()
    try:
        deadline = time.monotonic() + 20
        while sha(data) in on_disk(ctx) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert on_disk(ctx) == set()
        assert rows(ctx) == set()
    finally:
        ctx.stop()


# ---------------------------------------------------------------- races and references


def test_a_sweep_in_the_middle_of_an_upload_leaves_its_bytes(
    ctx: ServerContext, app: Application, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload writes its file, then commits its rows: a sweep in between (with the
    smallest grace the settings allow) sees a fresh file without a row, and keeps it."""
    data = wasm("in-flight")
    real = ArtifactStore.put_bytes
    swept: list[SweepReport] = []

    def put_then_sweep(self: ArtifactStore, payload: bytes, limit: int) -> object:
        stored = real(self, payload, limit)
        swept.append(run(ctx, grace=MIN_SWEEP_GRACE_S))
        return stored

    monkeypatch.setattr(ArtifactStore, "put_bytes", put_then_sweep)
    upload(ctx, app, "racing", "v1", data)
    monkeypatch.undo()
    assert swept
    assert swept[0].files == 0
    assert swept[0].pending >= 1
    assert sha(data) in on_disk(ctx)
    assert sha(data) in rows(ctx)
    # and later, with its version alive, no sweep ever takes it
    for _ in range(3):
        backdate(ctx, sha(data))
        assert run(ctx, grace=MIN_SWEEP_GRACE_S).files == 0
    assert sha(data) in on_disk(ctx)


def test_the_version_a_device_would_revert_to_stays(ctx: ServerContext, app: Application) -> None:
    """A device reports the version it runs and the one a revert starts again
    (``previousSha256``): the previous version's bytes stay after its artifact is
    deleted, so an export after the revert still finds them."""
    old, new = wasm("previous"), wasm("current")
    upload(ctx, app, "counter", "v1", old)
    upload(ctx, app, "counter", "v2", new)
    add_device(ctx, app, "d9", "pi")
    with ctx.db.transaction() as s:
        s.execute(
            update(Device)
            .where(Device.application_id == app.id, Device.id == "d9")
            .values(
                state={
                    "flows": {
                        "counter": {
                            "currentVersion": "v2",
                            "sha256": sha(new),
                            "previousVersion": "v1",
                            "previousSha256": sha(old),
                        }
                    }
                }
            )
        )
    assert delete_named(ctx, app, "counter-v1") == ["deleted"]
    for _ in range(3):  # (old enough, and marked long ago, were it unreferenced)
        backdate(ctx, sha(old))
        assert run(ctx, grace=HOUR).files == 0
    assert sha(old) in on_disk(ctx)


def test_the_first_look_does_not_hold_sqlite_s_write_lock(tmp_path: Path) -> None:
    """The sweep's first look reads every device's documents: in a reading
    transaction, which on SQLite takes no write lock (others write meanwhile).
    (SQLite only: PostgreSQL's reads never take one.)"""
    db = Database(f"sqlite:///{tmp_path / 'lock.db'}")
    db.migrate()
    wrote = threading.Event()

    def write() -> None:
        with db.transaction() as s:
            apps_repo.create_application(s, "meanwhile", "meanwhile")
        wrote.set()

    with db.reading() as s:
        s.execute(select(Blob.sha256)).all()
        writer = threading.Thread(target=write)
        writer.start()
        assert wrote.wait(10), "a write waited for a reading transaction"
    writer.join()
    db.close()

"""The console's data on SQLite and PostgreSQL: sessions that end are deleted (a
revoked token's, a deleted user's, an expired one's), at most 20 per user or token;
the fleet page's search (SQL, the same answers as the Python filter it replaces,
counted past any cap, state and desired read for the rows shown only); the cheap
timeline of the device page's poll."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, inspect, select, update
from starlette.requests import Request

from agent.server.config import ServerConfig
from agent.server.console import sessions
from agent.server.console.fleet_views import Filter, row, search
from agent.server.context import ServerContext
from agent.server.db import applications as apps_repo
from agent.server.db import device_events as events_repo
from agent.server.db import devices as devices_repo
from agent.server.db import users as users_repo
from agent.server.db.devices import DeviceQuery
from agent.server.db.models import ConsoleSession, Device, utcnow
from agent.server.errors import Unauthorized


@pytest.fixture
def ctx(db_url: str, tmp_path: Path) -> Iterator[ServerContext]:
    cfg = ServerConfig.model_validate({"db": db_url, "state_dir": str(tmp_path / "state")})
    context = ServerContext(cfg, with_broker=False)
    try:
        yield context
    finally:
        context.stop()


@pytest.fixture
def app_id(ctx: ServerContext) -> str:
    with ctx.db.transaction() as s:
        return apps_repo.create_application(s, "console", "plant").id


def request_with(secret: str) -> Request:
    cookie = f"{sessions.COOKIE}={secret}".encode()
    return Request({"type": "http", "method": "GET", "headers": [(b"cookie", cookie)]})


def token(ctx: ServerContext, app_id: str, name: str = "t") -> tuple[str, str]:
    """(token id, secret) of a new token that may sign in."""
    with ctx.db.transaction() as s:
        row_, secret = apps_repo.create_token(s, app_id, [sessions.FULL], name)
        return row_.id, secret


def stored(ctx: ServerContext, secret: str) -> ConsoleSession | None:
    with ctx.db.transaction() as s:
        return s.get(ConsoleSession, sessions.digest(secret))


# ------------------------------------------------------------------ sessions


def test_an_ended_sessions_row_is_deleted(ctx: ServerContext, app_id: str) -> None:
    token_id, secret = token(ctx, app_id)
    cookie = sessions.with_token(ctx, secret)
    assert sessions.resolve(ctx, request_with(cookie)).app.id == app_id
    with ctx.db.transaction() as s:
        assert apps_repo.revoke_token(s, app_id, token_id)
    with pytest.raises(Unauthorized, match="revoked"):
        sessions.resolve(ctx, request_with(cookie))
    assert stored(ctx, cookie) is None  # (deleted, and the delete committed)

    with ctx.db.transaction() as s:
        user = users_repo.create(s, app_id, "ops@example.com", "x")
        user_id = user.id
    cookie = sessions.start(ctx, app_id, "ops@example.com", user_id=user_id)
    assert sessions.resolve(ctx, request_with(cookie)).who == "ops@example.com"
    with ctx.db.transaction() as s:
        assert users_repo.delete_by_email(s, "ops@example.com") == user_id
    with pytest.raises(Unauthorized, match="user is gone"):
        sessions.resolve(ctx, request_with(cookie))
    assert stored(ctx, cookie) is None

    _, secret = token(ctx, app_id)
    cookie = sessions.with_token(ctx, secret)
    with ctx.db.transaction() as s:
        s.execute(update(ConsoleSession).values(expires=utcnow() - timedelta(seconds=1)))
    with pytest.raises(Unauthorized, match="ended"):
        sessions.resolve(ctx, request_with(cookie))
    assert stored(ctx, cookie) is None
    with pytest.raises(ValueError, match="one of them"):
        sessions.start(ctx, app_id, "nobody")


def test_expired_sessions_are_purged_by_requests_now_and_then(
    ctx: ServerContext, app_id: str
) -> None:
    with ctx.db.engine.connect() as conn:
        found = inspect(conn).get_indexes("console_sessions")
    assert {i["name"]: i["column_names"] for i in found}["ix_console_sessions_expires"] == [
        "expires"
    ]
    _, secret = token(ctx, app_id)
    live = sessions.with_token(ctx, secret)  # (a sign-in purges, and counts as one)
    gone = [sessions.with_token(ctx, secret) for _ in range(3)]

    def expire(cookies: list[str]) -> None:
        digests = [sessions.digest(c) for c in cookies]
        with ctx.db.transaction() as s:
            s.execute(
                update(ConsoleSession)
                .where(ConsoleSession.id.in_(digests))
                .values(expires=utcnow() - timedelta(minutes=1))
            )

    expire(gone)
    # Within PURGE_S of the last purge, a request does not purge ...
    sessions.resolve(ctx, request_with(live))
    assert all(stored(ctx, c) is not None for c in gone)
    # ... once it passed, the next request does (whoever's the expired rows were).
    sessions._purged[ctx.db] = time.monotonic() - sessions.PURGE_S - 1
    sessions.resolve(ctx, request_with(live))
    assert [stored(ctx, c) for c in gone] == [None, None, None]
    assert stored(ctx, live) is not None


def test_sessions_are_capped_per_user_and_per_token(ctx: ServerContext, app_id: str) -> None:
    cap = sessions.MAX_PER_WHO
    token_a, secret_a = token(ctx, app_id, "a")
    token_b, secret_b = token(ctx, app_id, "b")
    with ctx.db.transaction() as s:
        user_id = users_repo.create(s, app_id, "ops@example.com", "x").id
    b_cookies = [sessions.with_token(ctx, secret_b) for _ in range(3)]
    u_cookies = [sessions.start(ctx, app_id, "ops", user_id=user_id) for _ in range(cap)]
    a_cookies = [sessions.with_token(ctx, secret_a) for _ in range(cap + 5)]

    def count(who: Any) -> int:
        with ctx.db.transaction() as s:
            return int(s.scalar(select(func.count()).select_from(ConsoleSession).where(who)) or 0)

    assert count(ConsoleSession.token_id == token_a) == cap
    # The oldest went; the newest (the one just made first of all) still sign in.
    for cookie in a_cookies[:5]:
        with pytest.raises(Unauthorized):
            sessions.resolve(ctx, request_with(cookie))
    for cookie in a_cookies[5:]:
        assert sessions.resolve(ctx, request_with(cookie)).who == "a"
    # Another token's and the user's sessions are their own.
    assert count(ConsoleSession.token_id == token_b) == 3
    assert all(sessions.resolve(ctx, request_with(c)).who == "b" for c in b_cookies)
    assert count(ConsoleSession.user_id == user_id) == cap
    newest = sessions.start(ctx, app_id, "ops", user_id=user_id)
    assert count(ConsoleSession.user_id == user_id) == cap
    assert stored(ctx, newest) is not None
    assert stored(ctx, u_cookies[0]) is None
    assert all(stored(ctx, c) is not None for c in u_cookies[1:])


# ------------------------------------------------------------------ the fleet page


TYPES = ["rpi4", "gateway-x", None, "RPI4", "rpi4 "]
NAMES = [
    "Boiler room",
    "boiler-2",
    "\u0130stanbul line",  # İ: Python lowers it to "i" + U+0307
    "Kelvin \u212a sensor",  # the Kelvin sign: Python lowers it to "k"
    "\u00c9tage 3",  # É: SQLite's lower() does not fold it
    "100% done",
    "under_score",
    "plain",
    "ÉTAGE 4",
    "ßtraße",
]
TAGS: list[list[Any]] = [
    [{"key": "floor", "value": "B1"}],
    [{"key": "floor", "value": "B2"}, {"key": "zone", "value": "north"}],
    [{"key": "floor"}],
    [{"value": "orphan"}],
    [{"key": "n", "value": 5}, "junk", None],
    [{"key": "flag", "value": True}],
    [],
    [{"key": "a=b", "value": "c"}],
]
FILTERS = [
    Filter(),
    Filter(q="boiler"),
    Filter(q="  BOILER  "),
    Filter(q="i"),
    Filter(q="k"),
    Filter(q="kelvin k"),
    Filter(q="étage"),
    Filter(q="ÉTAGE"),
    Filter(q="%"),
    Filter(q="_"),
    Filter(q="100%"),
    Filter(q="ss"),
    Filter(q="dev-00"),
    Filter(q="DEV-01"),
    Filter(online="yes"),
    Filter(online="no"),
    Filter(online="bogus"),
    Filter(device_type="rpi4"),
    Filter(device_type=" rpi4 "),
    Filter(device_type="RPI4"),
    Filter(device_type="none"),
    Filter(tag="floor"),
    Filter(tag="floor=B1"),
    Filter(tag="floor="),
    Filter(tag="=orphan"),
    Filter(tag="n=5"),
    Filter(tag="flag=True"),
    Filter(tag="a=b=c"),
    Filter(tag="a"),
    Filter(q="boiler", online="yes", device_type="rpi4", tag="floor"),
    Filter(q="étage", tag="floor"),
    Filter(q="zzz"),
]


def make_fleet(ctx: ServerContext, app_id: str) -> None:
    big = {"flows": {f"f{i}": {"currentVersion": "v" * 100} for i in range(100)}}
    with ctx.db.transaction() as s:
        for n in range(80):
            s.add(
                Device(
                    application_id=app_id,
                    id=f"dev-{n:03d}" if n % 7 else f"DEV-{n:03d}",
                    name=NAMES[n % len(NAMES)] + ("" if n % 3 else f" {n}"),
                    tags=TAGS[n % len(TAGS)],
                    attributes=[],
                    device_type=TYPES[n % len(TYPES)],
                    online=n % 2 == 0,
                    decommissioned=n % 11 == 5,
                    state=big,
                    desired={"flows": {"f1": {"version": "v1"}}},
                )
            )
        # Another application's devices are never listed.
        other = apps_repo.create_application(s, "other", "other")
        s.add(Device(application_id=other.id, id="dev-001", name="boiler", tags=[], attributes=[]))


def old_fleet(ctx: ServerContext, app_id: str, want: Filter) -> list[Any]:
    """What the fleet page did before: every device read, filtered in Python."""
    with ctx.db.transaction() as s:
        devices, _ = devices_repo.search(
            s, app_id, DeviceQuery(), sort="name", descending=False, page=0, per_page=20_000
        )
        return [r for r in map(row, devices) if want.matches(r)]


def test_fleet_search_answers_as_the_python_filter(ctx: ServerContext, app_id: str) -> None:
    make_fleet(ctx, app_id)
    nonempty = 0
    for want in FILTERS:
        expected = old_fleet(ctx, app_id, want)
        for limit in (0, 3, 500):
            with ctx.db.transaction() as s:
                rows, total = search(s, app_id, want, limit)
            assert total == len(expected), want
            assert rows == expected[:limit], want
        nonempty += bool(expected)
    assert nonempty >= 25  # (the filters do match things: the comparison means something)
    with ctx.db.transaction() as s:
        rows, total = search(s, app_id, Filter(), 500)
    assert total == 80 - len([n for n in range(80) if n % 11 == 5])  # (decommissioned: out)
    assert all(r.flows for r in rows)  # (full rows for the ones shown)
    with ctx.db.transaction() as s, pytest.raises(ValueError, match="limit"):
        search(s, app_id, Filter(), -1)


def test_fleet_search_reads_documents_of_the_rows_shown_only(
    ctx: ServerContext, app_id: str
) -> None:
    make_fleet(ctx, app_id)
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(ctx.db.engine, "before_cursor_execute", seen)
    try:
        for want in (Filter(), Filter(q="boiler"), Filter(tag="floor"), Filter(q="étage")):
            statements.clear()
            with ctx.db.transaction() as s:
                rows, total = search(s, app_id, want, 2)
            assert len(rows) == 2 < total, want
            reads = [x for x in statements if "devices.state" in x or "devices.desired" in x]
            # (one read, of the ids chosen: in SQLAlchemy's IN list)
            assert len(reads) == 1, reads
            assert "devices.id IN" in reads[0], reads[0]
    finally:
        event.remove(ctx.db.engine, "before_cursor_execute", seen)


def test_fleet_search_counts_past_the_old_cap(ctx: ServerContext, app_id: str) -> None:
    with ctx.db.transaction() as s:
        devices_repo.insert_missing(s, app_id, [f"d-{n:05d}" for n in range(20_050)])
        s.execute(
            update(Device)
            .where(Device.application_id == app_id, Device.id.in_(["d-00000", "d-00001"]))
            .values(tags=[{"key": "k", "value": "v"}])
        )
    with ctx.db.transaction() as s:
        rows, total = search(s, app_id, Filter(q="D-"), 500)
        assert total == 20_050
        assert [r.id for r in rows] == [f"d-{n:05d}" for n in range(500)]
        rows, total = search(s, app_id, Filter(tag="k=v"), 1)
        assert (total, [r.id for r in rows]) == (2, ["d-00000"])
        rows, total = search(s, app_id, Filter(tag="k", q="\u00e9"), 1)
        assert (total, rows) == (0, [])


# ------------------------------------------------------------------ the timeline


def test_timeline_is_none_for_no_device_and_reads_no_documents(
    ctx: ServerContext, app_id: str
) -> None:
    with ctx.db.transaction() as s:
        for n, gone in ((1, False), (2, True)):
            s.add(
                Device(
                    application_id=app_id,
                    id=f"dev-{n}",
                    name="d",
                    tags=[],
                    attributes=[],
                    decommissioned=gone,
                    state={"big": "x" * 100_000},
                )
            )
        s.flush()
        rows = [
            {"device_id": "dev-1", "time": utcnow(), "flow_id": f"f{i}", "status": "pending"}
            for i in range(5)
        ]
        events_repo.store(s, app_id, rows)
        events_repo.store(s, app_id, [{**rows[0], "device_id": "dev-2"}])
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(ctx.db.engine, "before_cursor_execute", seen)
    with ctx.db.transaction() as s:
        got = events_repo.timeline(s, app_id, "dev-1", 3)
        assert got is not None
        assert [e.flow_id for e in got] == ["f4", "f3", "f2"]
        assert events_repo.timeline(s, app_id, "dev-1", 0) == []
        for missing in ("dev-2", "dev-3", "", "d" * 129, "dev-\x001"):
            assert events_repo.timeline(s, app_id, missing, 3) is None, missing
        assert events_repo.timeline(s, "no-such-app", "dev-1", 3) is None
        with pytest.raises(ValueError, match="limit"):
            events_repo.timeline(s, app_id, "dev-1", -1)
    event.remove(ctx.db.engine, "before_cursor_execute", seen)
    assert statements
    assert not [x for x in statements if "devices.state" in x or "deployment_logs" in x]

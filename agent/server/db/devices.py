"""Devices of an application: the inventory's rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, String, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import InstrumentedAttribute, Session

from agent.server.db.models import Device, new_id, utcnow
from agent.server.errors import Conflict

SORT_COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "name": Device.name,
    "id": Device.id,
    "creationDate": Device.creation_date,
    "lastUpdated": Device.last_updated,
}


@dataclass(frozen=True)
class DeviceQuery:
    """What ``GET /devices`` filters on (already parsed and bounded)."""

    name_like: tuple[str, str] | None = None  # (LIKE pattern, escape character)
    device_class: str | None = None
    #: (key, value) pairs; None matches any key or value. A device matches when every
    #: pair matches one of its tags.
    tags: Sequence[tuple[str | None, str | None]] = ()
    include_decommissioned: bool = False


def get(session: Session, app_id: str, device_id: str, *, lock: bool = False) -> Device | None:
    stmt = select(Device).where(Device.application_id == app_id, Device.id == device_id)
    if lock:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


#: Ids per statement of the bulk helpers (well below SQLite's 32766 parameters).
CHUNK = 500


def lock_order(session: Session) -> ColumnElement[str] | InstrumentedAttribute[str]:
    """The order rows are locked in, the same in every transaction that locks more
    than one device (so two of them never wait on each other in a cycle): byte order
    of the id, which is Python's ``sorted`` order of the ids too. (PostgreSQL's
    default collation may sort ``a-b`` after ``ab``; ``C`` does not.)"""
    if session.get_bind().dialect.name == "postgresql":
        return Device.id.collate("C")
    return Device.id


def get_many(
    session: Session, app_id: str, device_ids: Sequence[str], *, lock: bool = False
) -> dict[str, Device]:
    """The rows of these devices (the ones that exist), by id: a few statements for a
    thousand devices, not a thousand. ``lock``: each row locked (``FOR UPDATE`` on
    PostgreSQL; SQLite's transactions hold the database's write lock already), in
    :func:`lock_order`."""
    ids = sorted(set(device_ids))
    found: dict[str, Device] = {}
    for i in range(0, len(ids), CHUNK):
        stmt = select(Device).where(
            Device.application_id == app_id, Device.id.in_(ids[i : i + CHUNK])
        )
        if lock:
            stmt = stmt.order_by(lock_order(session)).with_for_update()
        found.update((d.id, d) for d in session.scalars(stmt))
    return found


def lock_many(session: Session, app_id: str, device_ids: Sequence[str]) -> dict[str, Device]:
    """:func:`get_many`, each row locked, in one order for every transaction."""
    return get_many(session, app_id, device_ids, lock=True)


def insert_missing(session: Session, app_id: str, device_ids: Sequence[str]) -> None:
    """Create the rows of devices heard of for the first time (named after their id).

    ``INSERT … ON CONFLICT DO NOTHING``: another server process hearing the same new
    device at the same moment is not an error (a plain INSERT would fail the whole
    transaction on the duplicate key)."""
    ids = sorted(set(device_ids))
    if not ids:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    for i in range(0, len(ids), CHUNK):
        rows = [
            {
                "application_id": app_id,
                "id": device_id,
                "name": device_id,
                "description": "",
                "tags": [],
                "attributes": [],
                "device_class": "edgeCompute",
                "online": False,
                "creation_date": now,
                "last_updated": now,
                "decommissioned": False,
                "desired": {},
                "generation": 0,
                "published_generation": 0,
            }
            for device_id in ids[i : i + CHUNK]
        ]
        session.execute(insert(Device).on_conflict_do_nothing(), rows)


def ensure(session: Session, app_id: str, device_id: str) -> Device:
    """The device's row, created (named after its id) the first time it is heard of."""
    dev = get(session, app_id, device_id)
    if dev is None:
        dev = Device(application_id=app_id, id=device_id, name=device_id, tags=[], attributes=[])
        session.add(dev)
        session.flush()
    return dev


def create(
    session: Session,
    app_id: str,
    *,
    device_id: str | None,
    name: str,
    description: str,
    tags: list[dict[str, str]],
    attributes: list[dict[str, Any]],
    device_class: str,
    device_type: str | None,
) -> Device:
    device_id = device_id or new_id()
    if get(session, app_id, device_id) is not None:
        raise Conflict(f"device {device_id} exists already")
    dev = Device(
        application_id=app_id,
        id=device_id,
        name=name,
        description=description,
        tags=tags,
        attributes=attributes,
        device_class=device_class,
        device_type=device_type,
    )
    session.add(dev)
    session.flush()
    return dev


def _filtered(app_id: str, q: DeviceQuery) -> Select[Any]:
    stmt = select(Device).where(Device.application_id == app_id)
    if not q.include_decommissioned:
        stmt = stmt.where(Device.decommissioned.is_(False))
    if q.name_like is not None:
        pattern, escape = q.name_like
        stmt = stmt.where(Device.name.like(pattern, escape=escape))
    if q.device_class is not None:
        stmt = stmt.where(Device.device_class == q.device_class)
    return stmt


def _tags_match(tags: list[Any], wanted: Sequence[tuple[str | None, str | None]]) -> bool:
    pairs = [(str(t.get("key")), str(t.get("value"))) for t in tags if isinstance(t, dict)]
    return all(
        any((k is None or k == key) and (v is None or v == value) for key, value in pairs)
        for k, v in wanted
    )


def search(
    session: Session,
    app_id: str,
    q: DeviceQuery,
    *,
    sort: str,
    descending: bool,
    page: int,
    per_page: int,
) -> tuple[list[Device], int]:
    """One page of matching devices and how many match in all.

    Tag filters are applied here rather than in SQL (tags are a JSON list, whose
    operators differ between SQLite and PostgreSQL); everything else is SQL."""
    column = SORT_COLUMNS[sort]
    order = [column.desc() if descending else column.asc(), Device.id.asc()]
    stmt = _filtered(app_id, q).order_by(*order)
    if q.tags:
        rows = [d for d in session.scalars(stmt) if _tags_match(d.tags, q.tags)]
        return rows[page * per_page : (page + 1) * per_page], len(rows)
    total = session.scalar(select(func.count()).select_from(_filtered(app_id, q).subquery()))
    rows = list(session.scalars(stmt.offset(page * per_page).limit(per_page)))
    return rows, int(total or 0)


def ids_with_tags(
    session: Session, app_id: str, tags: Sequence[tuple[str | None, str | None]]
) -> list[str]:
    """Devices any of whose tags matches any of ``tags`` (Losant's command by tags)."""
    stmt = _filtered(app_id, DeviceQuery()).order_by(Device.id)
    return [
        d.id for d in session.scalars(stmt) if any(_tags_match(d.tags, [pair]) for pair in tags)
    ]


def live_ids(session: Session, app_id: str, device_ids: Sequence[str]) -> set[str]:
    """Which of these devices the application has and did not decommission (what a
    device says is recorded only for those: a made-up id fills no table)."""
    ids = sorted(set(device_ids))
    found: set[str] = set()
    for i in range(0, len(ids), CHUNK):
        found.update(
            session.scalars(
                select(Device.id).where(
                    Device.application_id == app_id,
                    Device.id.in_(ids[i : i + CHUNK]),
                    Device.decommissioned.is_(False),
                )
            )
        )
    return found


# ---------------------------------------------------------------- the console's fleet page


@dataclass(frozen=True)
class FleetQuery:
    """What SQL filters of the console's fleet page (the rest, if any, is matched in
    Python by :mod:`agent.server.console.fleet_views`). Decommissioned devices are
    never listed.

    ``text``: a substring of the id or the name, compared as Python's ``str.lower``
    compares. SQL's ``lower()`` differs from it outside ASCII (SQLite folds ASCII
    only; PostgreSQL folds by its locale), so ``text`` must be ASCII; for an ASCII
    needle the two agree but for the two characters whose Python lower case holds
    ASCII letters, which :func:`_folded` spells out first."""

    text: str = ""
    online: bool | None = None
    device_type: str | None = None

    def __post_init__(self) -> None:
        if not self.text.isascii() or self.text != self.text.lower():
            raise ValueError("FleetQuery.text: ASCII in lower case only")


#: Characters whose ``str.lower()`` holds ASCII letters (all of Unicode was checked:
#: these two), spelled as Python lowers them.
_ASCII_LOWERS = (("\u0130", "i\u0307"), ("\u212a", "k"))


def _folded(column: InstrumentedAttribute[str]) -> ColumnElement[str]:
    expr: ColumnElement[str] = column.expression
    for char, lowered in _ASCII_LOWERS:
        expr = func.replace(expr, char, lowered, type_=String)
    return func.lower(expr, type_=String)


def _fleet_where(app_id: str, q: FleetQuery) -> list[ColumnElement[bool]]:
    where = [Device.application_id == app_id, Device.decommissioned.is_(False)]
    if q.text:
        where.append(
            or_(
                _folded(Device.id).contains(q.text, autoescape=True),
                _folded(Device.name).contains(q.text, autoescape=True),
            )
        )
    if q.online is not None:
        where.append(Device.online.is_(q.online))
    if q.device_type is not None:
        where.append(Device.device_type == q.device_type)
    return where


#: The fleet page's order (the one ``search(sort="name")`` has).
_FLEET_ORDER = (Device.name.asc(), Device.id.asc())


def fleet_count(session: Session, app_id: str, q: FleetQuery) -> int:
    """How many devices match, however many."""
    stmt = select(func.count()).select_from(Device).where(*_fleet_where(app_id, q))
    return int(session.scalar(stmt) or 0)


def fleet_ids(session: Session, app_id: str, q: FleetQuery, limit: int) -> list[str]:
    """The first ``limit`` matching devices' ids, by name (then id)."""
    stmt = select(Device.id).where(*_fleet_where(app_id, q)).order_by(*_FLEET_ORDER)
    return list(session.scalars(stmt.limit(max(0, limit))))


@dataclass(frozen=True)
class FleetSummary:
    """The columns of a device the fleet filter reads (not its state or desired
    documents, which may be tens of kilobytes each)."""

    id: str
    name: str
    online: bool
    device_type: str | None
    tags: list[Any]


def fleet_summaries(session: Session, app_id: str, q: FleetQuery) -> Iterator[FleetSummary]:
    """Every matching device's :class:`FleetSummary`, by name (then id), read in
    chunks: for what SQL cannot match (tags, a non-ASCII search text)."""
    stmt = (
        select(Device.id, Device.name, Device.online, Device.device_type, Device.tags)
        .where(*_fleet_where(app_id, q))
        .order_by(*_FLEET_ORDER)
        .execution_options(yield_per=CHUNK)
    )
    for r in session.execute(stmt):
        yield FleetSummary(r.id, r.name, r.online, r.device_type, r.tags or [])

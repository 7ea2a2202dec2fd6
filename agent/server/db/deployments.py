"""Deployment records (device × flow) and their attempts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, insert, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from agent.server.db.models import Deployment, DeploymentAttempt, new_id, utcnow

SORT_COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "id": Deployment.id,
    "deviceId": Deployment.device_id,
    "flowId": Deployment.flow_id,
    "desiredVersion": Deployment.desired_version,
    "currentVersion": Deployment.current_version,
    "creationDate": Deployment.creation_date,
    "lastUpdated": Deployment.last_updated,
}
#: Statuses after which an attempt is over.
#: Ids per statement of the bulk helpers.
CHUNK = 500
TERMINAL = frozenset({"success", "failure", "already-installed", "removed", "aborted", "reverted"})


@dataclass(frozen=True)
class DeploymentQuery:
    kind: str
    device_id: str | None = None
    flow_id: str | None = None
    version: str | None = None
    filter_empty: bool = False


def _filtered(app_id: str, q: DeploymentQuery) -> Select[Any]:
    stmt = select(Deployment).where(Deployment.application_id == app_id, Deployment.kind == q.kind)
    if q.device_id is not None:
        stmt = stmt.where(Deployment.device_id == q.device_id)
    if q.flow_id is not None:
        stmt = stmt.where(Deployment.flow_id == q.flow_id)
    if q.version is not None:
        stmt = stmt.where(
            or_(Deployment.desired_version == q.version, Deployment.current_version == q.version)
        )
    if q.filter_empty:
        stmt = stmt.where(
            or_(Deployment.desired_version.is_not(None), Deployment.current_version.is_not(None))
        )
    return stmt


def search(
    session: Session,
    app_id: str,
    q: DeploymentQuery,
    *,
    sort: str,
    descending: bool,
    page: int,
    per_page: int,
) -> tuple[list[Deployment], int]:
    column = SORT_COLUMNS[sort]
    order = [column.desc() if descending else column.asc(), Deployment.id.asc()]
    stmt = _filtered(app_id, q).order_by(*order).offset(page * per_page).limit(per_page)
    total = session.scalar(select(func.count()).select_from(_filtered(app_id, q).subquery()))
    return list(session.scalars(stmt)), int(total or 0)


def get(session: Session, app_id: str, deployment_id: str) -> Deployment | None:
    return session.scalar(
        select(Deployment).where(
            Deployment.application_id == app_id, Deployment.id == deployment_id
        )
    )


def for_device(session: Session, app_id: str, device_id: str) -> dict[str, Deployment]:
    rows = session.scalars(
        select(Deployment).where(
            Deployment.application_id == app_id, Deployment.device_id == device_id
        )
    )
    return {d.flow_id: d for d in rows}


def for_devices(
    session: Session, app_id: str, device_ids: list[str]
) -> dict[tuple[str, str], Deployment]:
    """The deployments of many devices, by (device id, flow id)."""
    found: dict[tuple[str, str], Deployment] = {}
    ids = sorted(set(device_ids))
    for i in range(0, len(ids), CHUNK):
        rows = session.scalars(
            select(Deployment).where(
                Deployment.application_id == app_id,
                Deployment.device_id.in_(ids[i : i + CHUNK]),
            )
        )
        found.update(((d.device_id, d.flow_id), d) for d in rows)
    return found


def open_attempts_of(
    session: Session, deployment_ids: list[str]
) -> dict[str, list[DeploymentAttempt]]:
    """The open attempts of many deployments, by deployment id."""
    found: dict[str, list[DeploymentAttempt]] = {}
    ids = sorted(set(deployment_ids))
    for i in range(0, len(ids), CHUNK):
        rows = session.scalars(
            select(DeploymentAttempt).where(
                DeploymentAttempt.deployment_id.in_(ids[i : i + CHUNK]),
                DeploymentAttempt.finished.is_(None),
            )
        )
        for a in rows:
            found.setdefault(a.deployment_id, []).append(a)
    return found


def attempts_by_id(session: Session, attempt_ids: list[str]) -> dict[str, DeploymentAttempt]:
    found: dict[str, DeploymentAttempt] = {}
    ids = sorted(set(attempt_ids))
    for i in range(0, len(ids), CHUNK):
        rows = session.scalars(
            select(DeploymentAttempt).where(DeploymentAttempt.id.in_(ids[i : i + CHUNK]))
        )
        found.update((a.id, a) for a in rows)
    return found


def for_flow(session: Session, app_id: str, flow_id: str, kind: str) -> list[Deployment]:
    return list(
        session.scalars(
            select(Deployment)
            .where(
                Deployment.application_id == app_id,
                Deployment.flow_id == flow_id,
                Deployment.kind == kind,
            )
            .order_by(Deployment.device_id)
        )
    )


@dataclass(frozen=True)
class Release:
    """One flow of one device to record: its new desired version (None: removed)
    and the generation of the document that asks for it."""

    device_id: str
    flow_id: str
    version: str | None
    generation: int


@dataclass
class NewAttempt:
    """An attempt :func:`record_releases` made, stored by :func:`insert_attempts`
    (until then its fields may still change: an abort's entries end at once)."""

    id: str
    deployment_id: str
    version: str | None
    generation: int
    created: datetime
    status: str = "pending"
    error: str | None = None
    finished: datetime | None = None


def record_releases(
    session: Session,
    app_id: str,
    kind: str,
    releases: list[Release],
    now: datetime | None = None,
) -> dict[tuple[str, str], NewAttempt]:
    """Each deployment's new desired version and a new attempt (the open ones before
    it end ``superseded``); returns the attempts by (device id, flow id), which the
    caller stores with :func:`insert_attempts` before its transaction ends.

    In bulk: the deployments and their open attempts are read with a few statements,
    new deployments are inserted with one statement per :data:`CHUNK` rows, and the
    attempts are plain rows until :func:`insert_attempts` (a phase of 5,000 devices
    is a handful of round trips, and no ORM object per new row)."""
    now = now or utcnow()
    existing = for_devices(session, app_id, [r.device_id for r in releases])
    opened = open_attempts_of(session, [d.id for d in existing.values()])
    ids: dict[tuple[str, str], str] = {}
    new_rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in releases:
        key = (r.device_id, r.flow_id)
        dep = existing.get(key)
        if dep is None:
            row = new_rows.setdefault(
                key,
                {
                    "id": new_id(),
                    "application_id": app_id,
                    "device_id": r.device_id,
                    "flow_id": r.flow_id,
                    "kind": kind,
                    "creation_date": now,
                    "last_updated": now,
                },
            )
            row.update(desired_version=r.version, status="pending", error=None)
            ids[key] = row["id"]
            continue
        for attempt in opened.pop(dep.id, ()):
            attempt.status = "superseded"
            attempt.finished = now
        dep.desired_version = r.version
        dep.status = "pending"
        dep.error = None
        dep.last_updated = now
        ids[key] = dep.id
    rows = list(new_rows.values())
    for i in range(0, len(rows), CHUNK):
        session.execute(insert(Deployment), rows[i : i + CHUNK])
    return {
        (r.device_id, r.flow_id): NewAttempt(
            id=new_id(),
            deployment_id=ids[(r.device_id, r.flow_id)],
            version=r.version,
            generation=r.generation,
            created=now,
        )
        for r in releases
    }


def insert_attempts(session: Session, attempts: Iterable[NewAttempt]) -> None:
    """Store the attempts :func:`record_releases` made (in bulk)."""
    rows = [asdict(a) for a in attempts]
    for i in range(0, len(rows), CHUNK):
        session.execute(insert(DeploymentAttempt), rows[i : i + CHUNK])


def open_attempts(session: Session, deployment_id: str) -> list[DeploymentAttempt]:
    return list(
        session.scalars(
            select(DeploymentAttempt).where(
                DeploymentAttempt.deployment_id == deployment_id,
                DeploymentAttempt.finished.is_(None),
            )
        )
    )


def attempts(session: Session, deployment_id: str) -> list[DeploymentAttempt]:
    return list(
        session.scalars(
            select(DeploymentAttempt)
            .where(DeploymentAttempt.deployment_id == deployment_id)
            .order_by(DeploymentAttempt.created, DeploymentAttempt.generation)
        )
    )

"""Deployment records (device × flow) and their attempts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, or_, select
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


def record_releases(
    session: Session,
    app_id: str,
    kind: str,
    releases: list[Release],
    now: datetime | None = None,
) -> dict[tuple[str, str], DeploymentAttempt]:
    """Each deployment's new desired version and a new attempt (the open ones before
    it end ``superseded``); returns the attempts by (device id, flow id).

    In bulk: the deployments and their open attempts are read with a few statements,
    the new rows are inserted in batches (a release to a thousand devices is a
    handful of round trips, not several thousand)."""
    now = now or utcnow()
    existing = for_devices(session, app_id, [r.device_id for r in releases])
    opened = open_attempts_of(session, [d.id for d in existing.values()])
    deps: dict[tuple[str, str], Deployment] = {}
    created = False
    for r in releases:
        key = (r.device_id, r.flow_id)
        dep = existing.get(key) or deps.get(key)
        if dep is None:
            dep = Deployment(
                id=new_id(),
                application_id=app_id,
                device_id=r.device_id,
                flow_id=r.flow_id,
                kind=kind,
                creation_date=now,
            )
            session.add(dep)
            created = True
        else:
            for attempt in opened.pop(dep.id, ()):
                attempt.status = "superseded"
                attempt.finished = now
        dep.desired_version = r.version
        dep.status = "pending"
        dep.error = None
        dep.last_updated = now
        deps[key] = dep
    if created:
        session.flush()  # the deployments before the attempts that refer to them
    made: dict[tuple[str, str], DeploymentAttempt] = {}
    for r in releases:
        key = (r.device_id, r.flow_id)
        attempt = DeploymentAttempt(
            id=new_id(),
            deployment_id=deps[key].id,
            version=r.version,
            generation=r.generation,
            status="pending",
            created=now,
        )
        session.add(attempt)
        made[key] = attempt
    return made


def record_release(
    session: Session,
    app_id: str,
    device_id: str,
    flow_id: str,
    kind: str,
    version: str | None,
    generation: int,
    now: datetime | None = None,
) -> DeploymentAttempt:
    """:func:`record_releases` for one flow of one device."""
    made = record_releases(
        session, app_id, kind, [Release(device_id, flow_id, version, generation)], now
    )
    return made[(device_id, flow_id)]


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

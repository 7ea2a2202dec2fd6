"""Deployment records (device × flow) and their attempts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from agent.server.db.models import Deployment, DeploymentAttempt, utcnow

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


def record_release(
    session: Session,
    app_id: str,
    device_id: str,
    flow_id: str,
    kind: str,
    version: str | None,
    generation: int,
    existing: Deployment | None,
    now: datetime | None = None,
) -> tuple[Deployment, DeploymentAttempt]:
    """The deployment's new desired version and a new attempt (the open one before it,
    if any, ends ``superseded``)."""
    now = now or utcnow()
    dep = existing
    if dep is None:
        dep = Deployment(
            application_id=app_id,
            device_id=device_id,
            flow_id=flow_id,
            kind=kind,
            creation_date=now,
        )
        session.add(dep)
        session.flush()
    else:
        for attempt in open_attempts(session, dep.id):
            attempt.status = "superseded"
            attempt.finished = now
    dep.desired_version = version
    dep.status = "pending"
    dep.error = None
    dep.last_updated = now
    attempt = DeploymentAttempt(
        deployment_id=dep.id, version=version, generation=generation, created=now
    )
    session.add(attempt)
    session.flush()
    return dep, attempt


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

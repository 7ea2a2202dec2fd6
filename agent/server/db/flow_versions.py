"""Flow versions: what a release names, with its artifacts (by digest)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.server.db.blobs import ensure_blob
from agent.server.db.models import Deployment, FlowVersion
from agent.server.errors import Conflict


def create(
    session: Session,
    app_id: str,
    flow_id: str,
    version: str,
    kind: str,
    artifacts: list[dict[str, Any]],
    manifest: dict[str, Any] | None,
    notes: str,
) -> FlowVersion:
    for item in artifacts:
        ensure_blob(session, item["sha256"], item["size"])
    row = FlowVersion(
        application_id=app_id,
        flow_id=flow_id,
        version=version,
        kind=kind,
        artifacts=artifacts,
        manifest=manifest,
        notes=notes,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"flow {flow_id} has a version {version!r} already") from None
    return row


def get(
    session: Session, app_id: str, flow_id: str, version: str, *, lock: bool = False
) -> FlowVersion | None:
    """The version; ``lock``: its row locked until the transaction ends (``FOR
    UPDATE`` on PostgreSQL, and read afresh; SQLite's transactions hold the database's
    write lock already), for a change of its items that must not lose another's."""
    stmt = select(FlowVersion).where(
        FlowVersion.application_id == app_id,
        FlowVersion.flow_id == flow_id,
        FlowVersion.version == version,
    )
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    return session.scalar(stmt)


def list_for_flow(session: Session, app_id: str, flow_id: str) -> list[FlowVersion]:
    return list(
        session.scalars(
            select(FlowVersion)
            .where(FlowVersion.application_id == app_id, FlowVersion.flow_id == flow_id)
            .order_by(FlowVersion.created, FlowVersion.version)
        )
    )


def set_artifacts(session: Session, fv: FlowVersion, artifacts: list[dict[str, Any]]) -> None:
    """Replace the version's artifact items (a new list, so that SQLAlchemy sees the
    JSON column change)."""
    for item in artifacts:
        ensure_blob(session, item["sha256"], item["size"])
    fv.artifacts = [dict(item) for item in artifacts]
    session.flush()


def delete(session: Session, fv: FlowVersion) -> None:
    session.delete(fv)
    session.flush()


def is_desired(session: Session, app_id: str, flow_id: str, version: str) -> bool:
    """Whether a deployment record (Losant's, one flow on one device) wants this version."""
    return (
        session.scalar(
            select(Deployment.id)
            .where(
                Deployment.application_id == app_id,
                Deployment.flow_id == flow_id,
                Deployment.desired_version == version,
            )
            .limit(1)
        )
        is not None
    )

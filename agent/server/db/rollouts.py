"""Rollouts (Mender's deployments): their phases, devices and events, and the devices'
deployment logs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from agent.server.db.models import (
    DeploymentLog,
    Rollout,
    RolloutDevice,
    RolloutEvent,
    RolloutPhase,
    utcnow,
)

#: The ids this repository hands out (UUIDs, as Mender's); anything else is unknown
#: without a query.
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CHUNK = 500


def is_uuid(value: str) -> bool:
    return UUID.fullmatch(value) is not None


@dataclass(frozen=True)
class RolloutQuery:
    status: str | None = None
    #: (LIKE pattern, escape character) on the name.
    name_like: tuple[str, str] | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def _filtered(app_id: str, q: RolloutQuery) -> Select[Any]:
    stmt = select(Rollout).where(Rollout.application_id == app_id)
    if q.status is not None:
        stmt = stmt.where(Rollout.status == q.status)
    if q.name_like is not None:
        pattern, escape = q.name_like
        stmt = stmt.where(Rollout.name.like(pattern, escape=escape))
    if q.created_after is not None:
        stmt = stmt.where(Rollout.created >= q.created_after)
    if q.created_before is not None:
        stmt = stmt.where(Rollout.created <= q.created_before)
    return stmt


def search(
    session: Session, app_id: str, q: RolloutQuery, *, offset: int, limit: int
) -> tuple[list[Rollout], int]:
    """One page of rollouts, newest first, and how many match in all."""
    stmt = _filtered(app_id, q).order_by(Rollout.created.desc(), Rollout.id)
    total = session.scalar(select(func.count()).select_from(_filtered(app_id, q).subquery()))
    rows = list(session.scalars(stmt.offset(offset).limit(limit)))
    return rows, int(total or 0)


def get(session: Session, app_id: str, rollout_id: str, *, lock: bool = False) -> Rollout | None:
    if not is_uuid(rollout_id):
        return None
    stmt = select(Rollout).where(Rollout.application_id == app_id, Rollout.id == rollout_id)
    if lock:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def lock_active(session: Session, rollout_id: str) -> Rollout | None:
    """An unfinished rollout, locked; None if it finished, or if another server process
    holds it now (``SKIP LOCKED`` on PostgreSQL; SQLite's writers are serial)."""
    return session.scalar(
        select(Rollout)
        .where(Rollout.id == rollout_id, Rollout.status != "finished")
        .with_for_update(skip_locked=True)
    )


def active(session: Session) -> list[tuple[str, str]]:
    """(application id, rollout id) of every unfinished rollout, oldest first."""
    rows = session.execute(
        select(Rollout.application_id, Rollout.id)
        .where(Rollout.status != "finished")
        .order_by(Rollout.created, Rollout.id)
    ).all()
    return [(a, r) for a, r in rows]


def phases(session: Session, rollout_id: str) -> list[RolloutPhase]:
    return list(
        session.scalars(
            select(RolloutPhase)
            .where(RolloutPhase.rollout_id == rollout_id)
            .order_by(RolloutPhase.number)
        )
    )


def phases_of(session: Session, rollout_ids: Sequence[str]) -> dict[str, list[RolloutPhase]]:
    out: dict[str, list[RolloutPhase]] = {r: [] for r in rollout_ids}
    ids = sorted(set(rollout_ids))
    for i in range(0, len(ids), CHUNK):
        rows = session.scalars(
            select(RolloutPhase)
            .where(RolloutPhase.rollout_id.in_(ids[i : i + CHUNK]))
            .order_by(RolloutPhase.number)
        )
        for p in rows:
            out[p.rollout_id].append(p)
    return out


def devices(
    session: Session,
    rollout_id: str,
    *,
    status: str | None = None,
    offset: int = 0,
    limit: int | None = None,
) -> list[RolloutDevice]:
    stmt = select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
    if status is not None:
        stmt = stmt.where(RolloutDevice.status == status)
    stmt = stmt.order_by(RolloutDevice.phase, RolloutDevice.device_id).offset(offset)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt))


def count_devices(session: Session, rollout_id: str, status: str | None = None) -> int:
    stmt = select(func.count()).where(RolloutDevice.rollout_id == rollout_id)
    if status is not None:
        stmt = stmt.where(RolloutDevice.status == status)
    return int(session.scalar(stmt) or 0)


def device(session: Session, rollout_id: str, device_id: str) -> RolloutDevice | None:
    return session.get(RolloutDevice, (rollout_id, device_id))


def device_ids(session: Session, rollout_id: str) -> list[str]:
    return list(
        session.scalars(
            select(RolloutDevice.device_id)
            .where(RolloutDevice.rollout_id == rollout_id)
            .order_by(RolloutDevice.phase, RolloutDevice.device_id)
        )
    )


def status_counts(session: Session, rollout_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Rollout id → device status → how many."""
    out: dict[str, dict[str, int]] = {r: {} for r in rollout_ids}
    ids = sorted(set(rollout_ids))
    for i in range(0, len(ids), CHUNK):
        rows = session.execute(
            select(RolloutDevice.rollout_id, RolloutDevice.status, func.count())
            .where(RolloutDevice.rollout_id.in_(ids[i : i + CHUNK]))
            .group_by(RolloutDevice.rollout_id, RolloutDevice.status)
        ).all()
        for rollout_id, status, n in rows:
            out[rollout_id][status] = int(n)
    return out


def artifact_ids(session: Session, rollout_id: str) -> list[str]:
    return sorted(
        a
        for a in session.scalars(
            select(RolloutDevice.artifact_id)
            .where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.artifact_id.is_not(None))
            .distinct()
        )
        if a is not None
    )


def unfinished_of_device(
    session: Session, app_id: str, device_id: str, final: Sequence[str]
) -> list[RolloutDevice]:
    """The device's places in unfinished rollouts that have not ended for it."""
    return list(
        session.scalars(
            select(RolloutDevice)
            .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .where(
                RolloutDevice.application_id == app_id,
                RolloutDevice.device_id == device_id,
                RolloutDevice.status.not_in(list(final)),
                Rollout.status != "finished",
            )
            .order_by(RolloutDevice.rollout_id)
        )
    )


def add_event(
    session: Session,
    rollout_id: str,
    kind: str,
    device_id: str | None = None,
    time: datetime | None = None,
    **detail: Any,
) -> None:
    session.add(
        RolloutEvent(
            rollout_id=rollout_id,
            time=time or utcnow(),
            kind=kind,
            device_id=device_id,
            detail=detail,
        )
    )


def events(session: Session, rollout_id: str, *, after: int, limit: int) -> list[RolloutEvent]:
    return list(
        session.scalars(
            select(RolloutEvent)
            .where(RolloutEvent.rollout_id == rollout_id, RolloutEvent.id > after)
            .order_by(RolloutEvent.id)
            .limit(limit)
        )
    )


# ------------------------------------------------------------------ deployment logs
def save_log(
    session: Session,
    app_id: str,
    device_id: str,
    deployment_id: str,
    flow_id: str | None,
    messages: list[Any],
) -> None:
    """Store (or replace) a device's deployment log: ``INSERT … ON CONFLICT DO
    UPDATE``, so two server processes hearing the same log are no error."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    row = {
        "application_id": app_id,
        "device_id": device_id,
        "deployment_id": deployment_id,
        "flow_id": flow_id,
        "messages": messages,
        "time": utcnow(),
    }
    stmt = insert(DeploymentLog).values(**row)
    stmt = stmt.on_conflict_do_update(
        index_elements=["application_id", "device_id", "deployment_id"],
        set_={"flow_id": flow_id, "messages": messages, "time": row["time"]},
    )
    session.execute(stmt)


def drop_log(session: Session, app_id: str, device_id: str, deployment_id: str) -> None:
    session.execute(
        delete(DeploymentLog).where(
            DeploymentLog.application_id == app_id,
            DeploymentLog.device_id == device_id,
            DeploymentLog.deployment_id == deployment_id,
        )
    )


def get_log(
    session: Session, app_id: str, device_id: str, deployment_id: str
) -> DeploymentLog | None:
    return session.get(DeploymentLog, (app_id, device_id, deployment_id))


def logs_present(session: Session, app_id: str, pairs: Sequence[tuple[str, str]]) -> set[str]:
    """Of these (device id, deployment id) pairs, the device ids that have a log."""
    wanted = dict(pairs)
    found: set[str] = set()
    ids = sorted(wanted)
    for i in range(0, len(ids), CHUNK):
        rows = session.execute(
            select(DeploymentLog.device_id, DeploymentLog.deployment_id).where(
                DeploymentLog.application_id == app_id,
                DeploymentLog.device_id.in_(ids[i : i + CHUNK]),
            )
        ).all()
        found.update(d for d, a in rows if wanted.get(d) == a)
    return found

"""Rollouts (Mender's deployments): their phases, devices and events, and the devices'
deployment logs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from agent.server.db.models import (
    DeploymentLog,
    Device,
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


#: What the engine looks at: unfinished rollouts, and halted ones whose abort
#: entries are not all written yet.
_LIVE = or_(Rollout.status != "finished", Rollout.halting.is_(True))


def lock_active(session: Session, rollout_id: str) -> Rollout | None:
    """An unfinished (or halting) rollout, locked; None if it finished, or if another
    server process holds it now (``SKIP LOCKED`` on PostgreSQL; SQLite's writers are
    serial)."""
    return session.scalar(
        select(Rollout).where(Rollout.id == rollout_id, _LIVE).with_for_update(skip_locked=True)
    )


def active(session: Session) -> list[tuple[str, str]]:
    """(application id, rollout id) of every unfinished or halting rollout, oldest
    first."""
    rows = session.execute(
        select(Rollout.application_id, Rollout.id)
        .where(_LIVE)
        .order_by(Rollout.created, Rollout.id)
    ).all()
    return [(a, r) for a, r in rows]


def active_naming(session: Session, app_id: str) -> list[tuple[str, str, str]]:
    """(id, name, artifact name) of the application's unfinished rollouts."""
    rows = session.execute(
        select(Rollout.id, Rollout.name, Rollout.artifact_name).where(
            Rollout.application_id == app_id, Rollout.status != "finished"
        )
    ).all()
    return [(i, n, a) for i, n, a in rows]


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


def _column_of(
    session: Session,
    app_id: str,
    device_ids: Sequence[str],
    column: Any,
    *where: ColumnElement[bool],
) -> dict[str, Any]:
    """Device id → one column of its row (chunked ``IN`` queries; no other column is
    read, so no state documents are loaded to get a device type)."""
    ids = sorted(set(device_ids))
    out: dict[str, Any] = {}
    for i in range(0, len(ids), CHUNK):
        rows = session.execute(
            select(Device.id, column).where(
                Device.application_id == app_id, Device.id.in_(ids[i : i + CHUNK]), *where
            )
        ).all()
        out.update((d, value) for d, value in rows)
    return out


def device_types_of(
    session: Session, app_id: str, device_ids: Sequence[str]
) -> dict[str, str | None]:
    """Device id → its type, for the devices that exist and are not decommissioned."""
    return _column_of(
        session, app_id, device_ids, Device.device_type, Device.decommissioned.is_(False)
    )


def desired_of(
    session: Session, app_id: str, device_ids: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Device id → its desired document."""
    found = _column_of(session, app_id, device_ids, Device.desired)
    return {d: doc or {} for d, doc in found.items()}


def states_of(
    session: Session, app_id: str, device_ids: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Device id → its last state report."""
    found = _column_of(session, app_id, device_ids, Device.state)
    return {d: doc or {} for d, doc in found.items()}


@dataclass(frozen=True)
class InFlight:
    """A started device not final yet, with what its device row says now."""

    device_id: str
    status: str
    substate: str | None
    flow_id: str | None
    attempt_id: str
    #: Whether the device's row exists.
    present: bool
    decommissioned: bool
    state: dict[str, Any] | None


def in_flight(
    session: Session,
    app_id: str,
    rollout_id: str,
    since: datetime | None,
    final: Sequence[str],
    only: Sequence[str] | None = None,
) -> list[InFlight]:
    """The rollout's started devices that are not final, whose device row changed at
    or after ``since`` (None: all of them) or is gone (``only``: of these few
    devices); one statement (the state report of each, not its desired document)."""
    stmt = (
        select(
            RolloutDevice.device_id,
            RolloutDevice.status,
            RolloutDevice.substate,
            RolloutDevice.flow_id,
            RolloutDevice.attempt_id,
            Device.id,
            Device.decommissioned,
            Device.state,
        )
        .outerjoin(
            Device,
            and_(Device.application_id == app_id, Device.id == RolloutDevice.device_id),
        )
        .where(
            RolloutDevice.rollout_id == rollout_id,
            RolloutDevice.attempt_id.is_not(None),
            RolloutDevice.status.not_in(list(final)),
        )
    )
    if since is not None:
        stmt = stmt.where(or_(Device.id.is_(None), Device.last_updated >= since))
    if only is not None:
        stmt = stmt.where(RolloutDevice.device_id.in_(list(only)))
    return [
        InFlight(d, st, sub, flow, attempt, dev is not None, bool(dec), state)
        for d, st, sub, flow, attempt, dev, dec, state in session.execute(stmt)
    ]


def update_devices(session: Session, rollout_id: str, changes: Sequence[dict[str, Any]]) -> None:
    """Change rows of the rollout's devices: each dict has ``device_id`` and the
    columns to set (the same columns in every dict of a call); ``UPDATE … WHERE``
    the primary key, executed many times in one statement per ``CHUNK``."""
    rows = [{"rollout_id": rollout_id, **c} for c in changes]
    for i in range(0, len(rows), CHUNK):
        session.execute(update(RolloutDevice), rows[i : i + CHUNK])


def progress_of(
    session: Session, rollout_id: str, device_ids: Sequence[str]
) -> dict[str, tuple[str, str | None]]:
    """Device id → (status, attempt id) of these devices of the rollout."""
    ids = sorted(set(device_ids))
    out: dict[str, tuple[str, str | None]] = {}
    for i in range(0, len(ids), CHUNK):
        rows = session.execute(
            select(RolloutDevice.device_id, RolloutDevice.status, RolloutDevice.attempt_id).where(
                RolloutDevice.rollout_id == rollout_id,
                RolloutDevice.device_id.in_(ids[i : i + CHUNK]),
            )
        ).all()
        out.update((d, (st, a)) for d, st, a in rows)
    return out


def timed_out(
    session: Session, rollout_id: str, started_before: datetime, final: Sequence[str]
) -> list[tuple[str, str]]:
    """(device id, status) of the started devices, not final, whose update was sent
    before ``started_before``."""
    rows = session.execute(
        select(RolloutDevice.device_id, RolloutDevice.status).where(
            RolloutDevice.rollout_id == rollout_id,
            RolloutDevice.attempt_id.is_not(None),
            RolloutDevice.status.not_in(list(final)),
            RolloutDevice.started < started_before,
        )
    ).all()
    return [(d, st) for d, st in rows]


def phase_status_counts(session: Session, rollout_id: str) -> dict[tuple[int, str, bool], int]:
    """(phase, status, started: the update was sent) → how many devices."""
    rows = session.execute(
        select(
            RolloutDevice.phase,
            RolloutDevice.status,
            RolloutDevice.attempt_id.is_not(None),
            func.count(),
        )
        .where(RolloutDevice.rollout_id == rollout_id)
        .group_by(RolloutDevice.phase, RolloutDevice.status, RolloutDevice.attempt_id.is_not(None))
    ).all()
    out: dict[tuple[int, str, bool], int] = {}
    for phase, status, started, n in rows:
        key = (int(phase), str(status), bool(started))
        out[key] = out.get(key, 0) + int(n)
    return out


def to_start(session: Session, rollout_id: str, phases: Sequence[int]) -> list[str]:
    """The devices of these phases that are pending and were not sent their update."""
    if not phases:
        return []
    return list(
        session.scalars(
            select(RolloutDevice.device_id)
            .where(
                RolloutDevice.rollout_id == rollout_id,
                RolloutDevice.phase.in_(list(phases)),
                RolloutDevice.attempt_id.is_(None),
                RolloutDevice.status == "pending",
            )
            .order_by(RolloutDevice.device_id)
        )
    )


def not_final(
    session: Session, rollout_id: str, final: Sequence[str]
) -> list[tuple[str, str, str | None]]:
    """(device id, status, attempt id) of the rollout's devices not final."""
    rows = session.execute(
        select(RolloutDevice.device_id, RolloutDevice.status, RolloutDevice.attempt_id)
        .where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.status.not_in(list(final)))
        .order_by(RolloutDevice.device_id)
    ).all()
    return [(d, st, a) for d, st, a in rows]


def finish_devices(
    session: Session,
    rollout_id: str,
    final: Sequence[str],
    status: str,
    substate: str,
    now: datetime,
    device_ids: Sequence[str] | None = None,
) -> None:
    """Every device of the rollout not final (or only these) gets a final status:
    one UPDATE (a statement per ``CHUNK`` ids)."""
    stmt = (
        update(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.status.not_in(list(final)))
        .values(status=status, substate=substate, finished=now)
        .execution_options(synchronize_session=False)
    )
    if device_ids is None:
        session.execute(stmt)
        return
    ids = sorted(set(device_ids))
    for i in range(0, len(ids), CHUNK):
        session.execute(stmt.where(RolloutDevice.device_id.in_(ids[i : i + CHUNK])))


@dataclass(frozen=True)
class AbortTarget:
    device_id: str
    flow_id: str
    attempt_id: str


def abort_targets(session: Session, rollout_id: str) -> list[AbortTarget]:
    """The devices a halt aborted after their update was sent."""
    rows = session.execute(
        select(RolloutDevice.device_id, RolloutDevice.flow_id, RolloutDevice.attempt_id).where(
            RolloutDevice.rollout_id == rollout_id,
            RolloutDevice.status == "aborted",
            RolloutDevice.attempt_id.is_not(None),
            RolloutDevice.flow_id.is_not(None),
        )
    ).all()
    return [AbortTarget(d, f, a) for d, f, a in rows if f is not None and a is not None]


def rollout_of_attempt(session: Session, app_id: str, attempt_id: str) -> tuple[str, str] | None:
    """(id, name) of the rollout that wrote this deployment attempt, if one did."""
    row = session.execute(
        select(Rollout.id, Rollout.name)
        .join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
        .where(RolloutDevice.attempt_id == attempt_id, Rollout.application_id == app_id)
        .limit(1)
    ).first()
    return (row[0], row[1]) if row is not None else None


def busy(
    session: Session,
    app_id: str,
    rollouts: dict[str, set[str]],
    device_ids: Sequence[str] | None,
    flows: set[str],
    final: Sequence[str],
) -> dict[str, str]:
    """Device id → the rollout it is in, of the devices (``None``: any) that are in
    one of ``rollouts`` (id → the flows its artifact name names) and not final there,
    for one of ``flows``: a started device by the flow it was sent, one not started by
    its rollout's flows."""
    ids = None if device_ids is None else sorted(set(device_ids))
    candidates = sorted(r for r, fl in rollouts.items() if fl & flows)
    out: dict[str, str] = {}
    for i in range(0, len(candidates), CHUNK):
        base = select(
            RolloutDevice.device_id, RolloutDevice.rollout_id, RolloutDevice.flow_id
        ).where(
            RolloutDevice.application_id == app_id,
            RolloutDevice.rollout_id.in_(candidates[i : i + CHUNK]),
            RolloutDevice.status.not_in(list(final)),
        )
        batches = (
            [base]
            if ids is None
            else [
                base.where(RolloutDevice.device_id.in_(ids[j : j + CHUNK]))
                for j in range(0, len(ids), CHUNK)
            ]
        )
        for stmt in batches:
            for device_id, rollout_id, flow_id in session.execute(stmt):
                if flow_id is None or flow_id in flows:
                    out.setdefault(device_id, rollout_id)
    return out


def device_types(session: Session, rollout_id: str) -> set[str | None]:
    """The distinct device types of the rollout's devices."""
    return set(
        session.scalars(
            select(RolloutDevice.device_type)
            .where(RolloutDevice.rollout_id == rollout_id)
            .distinct()
        )
    )


def phase_counts(session: Session, rollout_id: str) -> dict[int, tuple[int, int]]:
    """Phase → (devices in it, devices whose update was sent)."""
    rows = session.execute(
        select(
            RolloutDevice.phase,
            func.count(),
            func.sum(case((RolloutDevice.attempt_id.is_not(None), 1), else_=0)),
        )
        .where(RolloutDevice.rollout_id == rollout_id)
        .group_by(RolloutDevice.phase)
    ).all()
    return {int(p): (int(n), int(sent or 0)) for p, n, sent in rows}


def insert_devices(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rollout devices in batches (``INSERT … VALUES`` many rows at once)."""
    for i in range(0, len(rows), CHUNK):
        session.execute(insert(RolloutDevice), list(rows[i : i + CHUNK]))


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


def event_row(
    rollout_id: str, kind: str, device_id: str | None, time: datetime, **detail: Any
) -> dict[str, Any]:
    """An event as a row for :func:`add_events`."""
    return {
        "rollout_id": rollout_id,
        "time": time,
        "kind": kind,
        "device_id": device_id,
        "detail": detail,
    }


def add_events(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert many events in batches (in the order given)."""
    for i in range(0, len(rows), CHUNK):
        session.execute(insert(RolloutEvent), list(rows[i : i + CHUNK]))


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


def logs_of_device(
    session: Session, app_id: str, device_id: str, limit: int = 50
) -> list[DeploymentLog]:
    """A device's stored deployment logs, newest first (the web console's device page)."""
    return list(
        session.scalars(
            select(DeploymentLog)
            .where(DeploymentLog.application_id == app_id, DeploymentLog.device_id == device_id)
            .order_by(DeploymentLog.time.desc())
            .limit(limit)
        )
    )

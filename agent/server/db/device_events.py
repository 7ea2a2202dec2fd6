"""The devices' events (a flow's status transitions), kept for the console's
timeline: the newest :data:`MAX_PER_DEVICE` of each device."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from agent.server.db.models import Device, DeviceEvent
from agent.server.text import text_problem

#: Events kept per device (the newest, by id: the order they were recorded).
MAX_PER_DEVICE = 500


def store(session: Session, app_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """Add events (each a dict of :class:`DeviceEvent`'s fields but the application),
    then drop each named device's oldest over the cap; returns how many were added."""
    by_device: dict[str, int] = {}
    added = 0
    for fields in rows:
        session.add(DeviceEvent(application_id=app_id, **fields))
        by_device[fields["device_id"]] = by_device.get(fields["device_id"], 0) + 1
        added += 1
    if not added:
        return 0
    session.flush()
    for device_id in sorted(by_device):
        _trim(session, app_id, device_id)
    return added


def _trim(session: Session, app_id: str, device_id: str) -> None:
    mine = (DeviceEvent.application_id == app_id, DeviceEvent.device_id == device_id)
    count = session.scalar(select(func.count()).select_from(DeviceEvent).where(*mine)) or 0
    if count <= MAX_PER_DEVICE:
        return
    # The id of the newest event that falls out; it and every older one go.
    cut = session.scalar(
        select(DeviceEvent.id)
        .where(*mine)
        .order_by(DeviceEvent.id.desc())
        .offset(MAX_PER_DEVICE)
        .limit(1)
    )
    if cut is not None:
        session.execute(delete(DeviceEvent).where(*mine, DeviceEvent.id <= cut))


def recent(session: Session, app_id: str, device_id: str, limit: int = 200) -> list[DeviceEvent]:
    """A device's newest events, newest first."""
    return list(
        session.scalars(
            select(DeviceEvent)
            .where(DeviceEvent.application_id == app_id, DeviceEvent.device_id == device_id)
            .order_by(DeviceEvent.id.desc())
            .limit(max(0, limit))
        )
    )


def timeline(session: Session, app_id: str, device_id: str, limit: int) -> list[DeviceEvent] | None:
    """A device's newest ``limit`` events, newest first; None when the application
    has no such device, or it was decommissioned (the console answers 404).

    The console polls it every few seconds per open device page, so it reads one
    column of the device's row (not its state and desired documents) and nothing of
    its deployment logs."""
    if limit < 0:
        raise ValueError("timeline: limit is 0 or more")
    if not device_id or len(device_id) > 128 or text_problem(device_id) is not None:
        return None  # (no device has such an id; PostgreSQL refuses a NUL even here)
    decommissioned = session.scalar(
        select(Device.decommissioned).where(Device.application_id == app_id, Device.id == device_id)
    )
    if decommissioned is None or decommissioned:
        return None
    return recent(session, app_id, device_id, limit)

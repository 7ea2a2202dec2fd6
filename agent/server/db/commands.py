"""The commands the server sent to devices, and the responses matched to them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from agent.server.db.models import CommandRecord


def create(session: Session, **fields: Any) -> CommandRecord:
    row = CommandRecord(**fields)
    session.add(row)
    session.flush()
    return row


#: Commands kept per device (the newest, by when they were sent).
MAX_PER_DEVICE = 200


def trim(session: Session, app_id: str, device_id: str) -> None:
    """Drop a device's commands older than its newest :data:`MAX_PER_DEVICE`."""
    mine = (CommandRecord.application_id == app_id, CommandRecord.device_id == device_id)
    old = list(
        session.scalars(
            select(CommandRecord.id)
            .where(*mine)
            .order_by(CommandRecord.sent.desc(), CommandRecord.id.desc())
            .offset(MAX_PER_DEVICE)
        )
    )
    if old:
        session.execute(delete(CommandRecord).where(*mine, CommandRecord.id.in_(old)))


def get(session: Session, app_id: str, command_id: str) -> CommandRecord | None:
    row = session.get(CommandRecord, command_id)
    return row if row is not None and row.application_id == app_id else None


def recent(session: Session, app_id: str, device_id: str, limit: int = 20) -> list[CommandRecord]:
    """A device's newest commands, newest first."""
    return list(
        session.scalars(
            select(CommandRecord)
            .where(CommandRecord.application_id == app_id, CommandRecord.device_id == device_id)
            .order_by(CommandRecord.sent.desc(), CommandRecord.id.desc())
            .limit(max(0, limit))
        )
    )


def answer(
    session: Session,
    app_id: str,
    device_id: str,
    command_id: str,
    response: dict[str, Any],
    when: datetime,
) -> bool:
    """Record a device's response to its command ``command_id``; False (nothing
    recorded) if no such command was sent to that device of that application, or it
    was answered already (the first answer wins)."""
    row = session.get(CommandRecord, command_id, with_for_update=True)
    if (
        row is None
        or row.application_id != app_id
        or row.device_id != device_id
        or row.answered is not None
    ):
        return False
    row.response = response
    row.answered = when
    return True

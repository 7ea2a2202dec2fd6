"""The web console's sessions (``console_sessions``): the repository of their rows.

A row's id is the SHA-256 of the cookie's secret; the secret itself is never stored."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from agent.server.db.models import ConsoleSession


def create(
    session: Session,
    *,
    digest: str,
    app_id: str,
    who: str,
    csrf: str,
    expires: datetime,
    user_id: str | None = None,
    token_id: str | None = None,
) -> ConsoleSession:
    row = ConsoleSession(
        id=digest,
        application_id=app_id,
        who=who[:255],
        csrf=csrf,
        expires=expires,
        user_id=user_id,
        token_id=token_id,
    )
    session.add(row)
    session.flush()
    return row


def get(session: Session, digest: str) -> ConsoleSession | None:
    return session.get(ConsoleSession, digest)


def delete_one(session: Session, digest: str) -> None:
    session.execute(delete(ConsoleSession).where(ConsoleSession.id == digest))


def delete_expired(session: Session, now: datetime) -> int:
    result = session.execute(delete(ConsoleSession).where(ConsoleSession.expires < now))
    return int(getattr(result, "rowcount", 0) or 0)

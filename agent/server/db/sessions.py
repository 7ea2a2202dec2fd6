"""The web console's sessions (``console_sessions``): the repository of their rows.

A row's id is the SHA-256 of the cookie's secret; the secret itself is never stored."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select
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
    """Drop the sessions that ended (``ix_console_sessions_expires`` finds them)."""
    result = session.execute(delete(ConsoleSession).where(ConsoleSession.expires < now))
    return int(getattr(result, "rowcount", 0) or 0)


def keep_newest(
    session: Session,
    *,
    user_id: str | None = None,
    token_id: str | None = None,
    keep: int,
    spare: str | None = None,
) -> int:
    """Drop the oldest sessions of one sign-in identity (a user, or an API token) so
    that at most ``keep`` remain: each session may hold live streams, so one identity
    signing in again and again must not pile them up. ``spare`` (the session just
    made) stays and counts among them, whatever the clock said when the others were
    made. Returns how many went."""
    if (user_id is None) == (token_id is None):
        raise ValueError("keep_newest: give exactly one of user_id and token_id")
    if keep < 0:
        raise ValueError("keep_newest: keep is 0 or more")
    who = (
        ConsoleSession.user_id == user_id
        if user_id is not None
        else ConsoleSession.token_id == token_id
    )
    others = select(ConsoleSession.id).where(who)
    if spare is not None:
        others = others.where(ConsoleSession.id != spare)
        keep -= 1
    old = list(
        session.scalars(
            others.order_by(ConsoleSession.created.desc(), ConsoleSession.id.desc()).offset(
                max(0, keep)
            )
        )
    )
    if old:
        session.execute(delete(ConsoleSession).where(ConsoleSession.id.in_(old)))
    return len(old)

"""Applications and their API tokens (the repository of both aggregates' rows)."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.server.db.models import ApiToken, Application
from agent.server.errors import Conflict, Validation
from agent.server.scopes import validate_scopes

#: An MQTT topic prefix: one or more plain levels (no wildcards, no empty level).
_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,3}")
#: Every token starts so: secret scanners (and people) can tell a leaked one apart.
TOKEN_PREFIX = "eat_"  # noqa: S105 (a marker, not a secret)


def create_application(session: Session, name: str, prefix: str) -> Application:
    name = name.strip()
    if not name or len(name) > 255:
        raise Validation("name: 1 to 255 characters")
    if not _PREFIX.fullmatch(prefix) or len(prefix) > 128:
        raise Validation(f"prefix {prefix!r}: plain topic levels [A-Za-z0-9_-], no wildcards")
    app = Application(name=name, topic_prefix=prefix)
    session.add(app)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"prefix {prefix!r} belongs to another application") from None
    return app


def lock(session: Session, app_id: str) -> None:
    """Serialize a check of an application's other rows with the write it allows,
    until the transaction ends: its row locked (PostgreSQL's ``FOR NO KEY UPDATE``,
    which rows that only refer to the application, such as a new device's, do not
    wait for; SQLite's transactions hold the database's write lock already). Taken
    by an artifact upload (the name rule, the storage limit), a deployment's
    creation and a dynamic deployment's enrolment (a device in one unfinished
    deployment of a flow), before anything else they lock."""
    session.execute(
        select(Application.id).where(Application.id == app_id).with_for_update(key_share=True)
    )


def get_application(session: Session, app_id: str) -> Application | None:
    return session.get(Application, app_id)


def all_applications(session: Session) -> list[Application]:
    return list(session.scalars(select(Application).order_by(Application.created)))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    session: Session, app_id: str, scopes: list[str], name: str = ""
) -> tuple[ApiToken, str]:
    """A new token; returns the row and the secret (shown once, never stored)."""
    validate_scopes(scopes)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        application_id=app_id, name=name, secret_sha256=_digest(secret), scopes=sorted(scopes)
    )
    session.add(token)
    session.flush()
    return token, secret


def token_for_secret(session: Session, secret: str) -> ApiToken | None:
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
        return None
    token = session.scalar(select(ApiToken).where(ApiToken.secret_sha256 == _digest(secret)))
    if token is None or token.revoked:
        return None
    return token


def tokens(session: Session, app_id: str) -> list[ApiToken]:
    """The application's tokens, newest first (revoked ones too)."""
    return list(
        session.scalars(
            select(ApiToken)
            .where(ApiToken.application_id == app_id)
            .order_by(ApiToken.created.desc(), ApiToken.id)
        )
    )


def revoke_token(session: Session, app_id: str, token_id: str) -> bool:
    """Revoke one of the application's tokens; False if it has none of that id."""
    token = session.get(ApiToken, token_id) if len(token_id) <= 24 else None
    if token is None or token.application_id != app_id:
        return False
    token.revoked = True
    return True

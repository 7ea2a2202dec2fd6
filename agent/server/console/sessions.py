"""Signed-in browsers: the ``edge_console`` cookie and the ``console_sessions`` rows.

The cookie holds 256 random bits; the row is keyed by their SHA-256 (a leaked
database signs nobody in). A session lasts :data:`IDLE_S` after its last request
(sliding), and never more than :data:`MAX_S` after the sign-in. It belongs to one
application: every page reads that application's data only. A session signed in
with an API token stops working when the token is revoked; one signed in as a user,
when the user is deleted; such a session's row is deleted at its next request.
One user or token has at most :data:`MAX_PER_WHO` sessions (each may hold live
streams): a sign-in beyond ends its oldest. Expired rows are purged at every sign-in
and, at most every :data:`PURGE_S`, by a request. A token with
``all.Application.read`` (and not ``all.Application``) gives a read-only session:
its pages show no forms that change anything, and such a POST is refused.

Cookies are ``HttpOnly``, ``SameSite=Strict``, ``Path=/console``, and ``Secure``
when the server's public URL is https. Secrets are never logged."""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from fastapi import Request, Response
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session as OrmSession

from agent.server.context import ServerContext
from agent.server.db import applications as apps_repo
from agent.server.db import sessions as repo
from agent.server.db import users as users_repo
from agent.server.db.engine import Database
from agent.server.db.models import ApiToken, Application, utcnow
from agent.server.errors import Forbidden, Unauthorized

from . import csrf

log = structlog.get_logger("agent.server.console")

COOKIE = "edge_console"
PATH = "/console"
#: A session ends this long after its last request...
IDLE_S = 12 * 3600
#: ...and at the latest this long after the sign-in.
MAX_S = 7 * 86400
#: ``last_seen`` (and the sliding expiry) is written at most this often.
TOUCH_S = 60
#: Scopes that sign in: the whole application, or all of it read-only.
FULL, READ = "all.Application", "all.Application.read"
#: Live sessions one user or one API token may have; a sign-in beyond ends the oldest.
MAX_PER_WHO = 20
#: Seconds between two purges of the expired sessions (by one process, per database).
PURGE_S = 600.0

#: When this process last purged each database's expired sessions (monotonic).
_purged: weakref.WeakKeyDictionary[Database, float] = weakref.WeakKeyDictionary()
_purge_lock = threading.Lock()


@dataclass(frozen=True)
class SignedIn:
    """The session of a request: its application, who, its CSRF token."""

    digest: str
    app: Application
    who: str
    csrf: str
    read_only: bool
    #: Signed in as a user (not with a token): only such a session manages tokens.
    by_user: bool = False

    def require_write(self) -> None:
        if self.read_only:
            raise Forbidden("this session is read-only (signed in with a read-only token)")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secure(ctx: ServerContext) -> bool:
    return (ctx.cfg.public_url or "").lower().startswith("https://")


def set_cookie(ctx: ServerContext, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=secure(ctx),
    )


def scopes_allow(token: ApiToken) -> bool | None:
    """None: the token may not sign in; else whether its session is read-only."""
    scopes = set(token.scopes or [])
    if FULL in scopes:
        return False
    if READ in scopes:
        return True
    return None


def start(
    ctx: ServerContext,
    app_id: str,
    who: str,
    *,
    user_id: str | None = None,
    token_id: str | None = None,
) -> str:
    """A new session; the cookie's secret (the row keeps its digest only). The
    identity's oldest sessions beyond :data:`MAX_PER_WHO` end."""
    import secrets

    if (user_id is None) == (token_id is None):
        raise ValueError("a console session is a user's or an API token's: give one of them")
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    with ctx.db.transaction() as s:
        repo.delete_expired(s, now)
        row = repo.create(
            s,
            digest=digest(secret),
            app_id=app_id,
            who=who,
            csrf=csrf.new_token(),
            expires=now + timedelta(seconds=IDLE_S),
            user_id=user_id,
            token_id=token_id,
        )
        ended = repo.keep_newest(
            s,
            user_id=user_id,
            token_id=token_id,
            keep=MAX_PER_WHO,
            spare=row.id,
        )
    _purged[ctx.db] = time.monotonic()
    log.info("console sign-in", application=app_id, user=user_id, token=token_id, ended=ended)
    return secret


def with_token(ctx: ServerContext, secret: str) -> str:
    """Sign in with an API token; the cookie's secret, or 401."""
    secret = secret.strip()
    with ctx.db.transaction() as s:
        token = apps_repo.token_for_secret(s, secret)
        if token is None or scopes_allow(token) is None:
            raise Unauthorized(
                "Invalid or revoked token, or one without all.Application (or its .read)"
            )
        app_id, token_id, name = token.application_id, token.id, token.name
    return start(ctx, app_id, name or f"token {token_id}", token_id=token_id)


def resolve(ctx: ServerContext, request: Request) -> SignedIn:
    """The request's session, or 401 (the pages redirect to the sign-in). A session
    whose token was revoked, whose user is gone, or that expired is deleted (and
    that is committed) before the 401."""
    secret = request.cookies.get(COOKIE, "")
    if not secret or len(secret) > 128:
        raise Unauthorized("sign in first")
    _purge_if_due(ctx)
    now = utcnow()
    with ctx.db.transaction() as s:
        found = _check(s, digest(secret), now)
        if isinstance(found, str):
            repo.delete_one(s, digest(secret))
    # (Raised once the transaction committed: raised inside, it would roll back the
    # delete.)
    if isinstance(found, str):
        raise Unauthorized(found)
    return found


def _check(s: OrmSession, key: str, now: datetime) -> SignedIn | str:
    """The session of the digest ``key``, or why it is over (the caller deletes it);
    a live one's sliding expiry is moved on."""
    row = repo.get(s, key)
    if row is None:
        return "the session has ended: sign in again"
    if row.expires <= now:
        return "the session has ended: sign in again"
    read_only = False
    if row.token_id is not None:
        token = s.get(ApiToken, row.token_id)
        allowed = None if token is None or token.revoked else scopes_allow(token)
        if allowed is None:
            return "the session's token was revoked: sign in again"
        read_only = allowed
    elif row.user_id is None or users_repo.get(s, row.user_id) is None:
        return "the session's user is gone: sign in again"
    app = apps_repo.get_application(s, row.application_id)
    if app is None:
        return "sign in first"
    if (now - row.last_seen).total_seconds() > TOUCH_S:
        row.last_seen = now
        row.expires = min(now + timedelta(seconds=IDLE_S), _cap(row.created))
    return SignedIn(row.id, app, row.who, row.csrf, read_only, row.user_id is not None)


def _purge_if_due(ctx: ServerContext) -> None:
    """Delete every expired session, at most every :data:`PURGE_S` per database in
    this process: a browser that never comes back leaves its row behind, and without
    this only a sign-in would clear them. Cheap (``ix_console_sessions_expires``),
    and it never fails the request."""
    mono = time.monotonic()
    with _purge_lock:
        last = _purged.get(ctx.db)
        if last is not None and mono - last < PURGE_S:
            return
        _purged[ctx.db] = mono
    try:
        with ctx.db.transaction() as s:
            gone = repo.delete_expired(s, utcnow())
    except SQLAlchemyError as exc:  # (the next request tries again)
        with _purge_lock:
            _purged.pop(ctx.db, None)
        log.warning("could not purge the expired console sessions", error=str(exc)[:200])
        return
    if gone:
        log.info("expired console sessions purged", sessions=gone)


def _cap(created: datetime) -> datetime:
    return created + timedelta(seconds=MAX_S)


def end(ctx: ServerContext, session: SignedIn) -> None:
    with ctx.db.transaction() as s:
        repo.delete_one(s, session.digest)
    log.info("console sign-out", application=session.app.id)

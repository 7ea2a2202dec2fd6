"""Users and their login tokens (Mender's ``useradm``).

A login (email and password, :func:`login`) gets a JWT signed with HS256 by a key
every server process shares (a random 256-bit secret in the database, made by the
first process that needs it). The token is stateless: it is good until it expires
(``login_ttl_s``) or its user is deleted; logging out does not revoke it.

Tokens and passwords are never logged.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import jwt
import structlog

from agent.server.db import applications as apps_repo
from agent.server.db import users as repo
from agent.server.errors import NotFound, Unauthorized, Validation
from agent.server.service.passwords import MAX_PASSWORD, hash_password, verify_password
from agent.server.text import text_problem

if TYPE_CHECKING:
    from agent.server.api.auth import Caller
    from agent.server.context import ServerContext
    from agent.server.db.engine import Database

log = structlog.get_logger("agent.server.users")

ISSUER = "edge-agent"
ALGORITHM = "HS256"
#: The name of the signing key among the server's shared secrets.
KEY_NAME = "login-token-key"
#: Bounds of what a login may send (longer is refused before any work).
MAX_HEADER = 1024
MAX_EMAIL = 255
#: A token longer than this is not one of ours (ours are ~400 characters).
MAX_TOKEN = 4096
#: The claim that names the user's application.
APP_CLAIM = "app"

_keys: weakref.WeakKeyDictionary[ServerContext, bytes] = weakref.WeakKeyDictionary()
_keys_lock = threading.Lock()


def normalize_email(email: str) -> str:
    return email.strip().lower()


def check_email(email: str) -> str:
    """The stored form of an email; 400 if it cannot be one."""
    email = normalize_email(email)
    local, at, domain = email.rpartition("@")
    if (
        not at
        or not local
        or not domain
        or len(email) > MAX_EMAIL
        or any(c.isspace() for c in email)
        or text_problem(email) is not None
        or not email.isprintable()
    ):
        raise Validation("email: an address like name@example.com, at most 255 characters")
    return email


def create_user(db: Database, app_id: str, email: str, password: str) -> str:
    """A new user of ``app_id``; its id. 400 for a bad email or password, 404 for an
    unknown application, 409 for an email already taken."""
    email = check_email(email)
    if not password or len(password) > MAX_PASSWORD:
        raise Validation(f"password: 1 to {MAX_PASSWORD} characters")
    hashed = hash_password(password)
    with db.transaction() as s:
        if apps_repo.get_application(s, app_id) is None:
            raise NotFound(f"no application {app_id}")
        return repo.create(s, app_id, email, hashed).id


def delete_user(db: Database, email: str) -> str:
    """Delete a user (its tokens stop working at once); the id it had. 404 if none."""
    with db.transaction() as s:
        user_id = repo.delete_by_email(s, normalize_email(email))
    if user_id is None:
        raise NotFound(f"no user {normalize_email(email)!r}")
    return user_id


def signing_key(ctx: ServerContext) -> bytes:
    """The key login tokens are signed with (made on first use, then cached)."""
    with _keys_lock:
        key = _keys.get(ctx)
        if key is None:
            candidate = secrets.token_urlsafe(32)  # 256 bits
            with ctx.db.transaction() as s:
                key = repo.secret(s, KEY_NAME, candidate).encode()
            _keys[ctx] = key
        return key


def basic_credentials(header: str) -> tuple[str, str]:
    """Email and password from ``Authorization: Basic …``; 401 if it is not that."""
    if len(header) > MAX_HEADER:
        raise Unauthorized("Authorization header too long")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized("Authorization: Basic <email:password> is required")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise Unauthorized("Authorization: Basic: not base64 of UTF-8 email:password") from None
    email, colon, password = decoded.partition(":")
    if not colon or not email or len(email) > MAX_EMAIL or len(password) > MAX_PASSWORD:
        raise Unauthorized("Authorization: Basic: expected email:password")
    return email, password


def login(ctx: ServerContext, header: str) -> str:
    """A new login token for the user the Basic ``header`` names, or 401 (the same
    answer, after the same scrypt, for an unknown email as for a wrong password)."""
    email, password = basic_credentials(header)
    with ctx.db.transaction() as s:
        storable = text_problem(email) is None  # (PostgreSQL cannot even look up a NUL)
        user = repo.by_email(s, normalize_email(email)) if storable else None
        user_id, app_id = (user.id, user.application_id) if user is not None else ("", "")
        stored = user.password_hash if user is not None else None
    if not verify_password(password, stored) or user is None:
        log.info("login refused", known=user is not None)
        raise Unauthorized("Wrong email or password")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        APP_CLAIM: app_id,
        "iat": now,
        "exp": now + ctx.cfg.login_ttl_s,
        "jti": secrets.token_hex(16),
        "iss": ISSUER,
    }
    log.info("login", user=user_id, application=app_id)
    return jwt.encode(claims, signing_key(ctx), algorithm=ALGORITHM)


def caller_for_token(ctx: ServerContext, token: str, scopes: frozenset[str]) -> Caller:
    """The caller a login token names, with ``scopes``; 401 unless this server signed
    it (HS256 only), it has not expired, and its user still exists."""
    from agent.server.api.auth import Caller

    if len(token) > MAX_TOKEN:
        raise Unauthorized("Invalid or expired token")
    try:
        claims = jwt.decode(
            token,
            signing_key(ctx),
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "iss", "sub", "jti"]},
        )
    except jwt.InvalidTokenError:
        raise Unauthorized("Invalid or expired token") from None
    user_id, app_id = claims.get("sub"), claims.get(APP_CLAIM)
    if not isinstance(user_id, str) or not isinstance(app_id, str):
        raise Unauthorized("Invalid or expired token")
    with ctx.db.transaction() as s:
        user = repo.get(s, user_id) if len(user_id) <= 36 else None
        app = apps_repo.get_application(s, app_id) if user is not None else None
        if user is None or app is None or user.application_id != app.id:
            raise Unauthorized("Invalid or expired token")
    return Caller(app, str(claims.get("jti") or user_id), scopes)

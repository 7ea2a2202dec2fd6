"""Users and their login tokens (Mender's ``useradm``).

A login (email and password, :func:`login`) gets a JWT signed with HS256 by a key
every server process shares (a random 256-bit secret in the database, made by the
first process that needs it, or the server's ``login_key_file``). The token is
stateless: it is good until it expires (``login_ttl_s``) or its user is deleted;
logging out does not revoke it.

Logins are bounded, since each costs a scrypt (32 MiB, ~100 ms of a core) that anyone
can ask for: at most :data:`HASH_SLOTS` hash at once (a login that waits
:data:`HASH_WAIT_S` for a slot is answered 503, without holding a thread meanwhile),
and an address with :data:`MAX_FAILURES` failed logins within
:data:`FAILURE_WINDOW_S` is answered 429 until that window ends (the addresses kept
are bounded, :data:`MAX_ADDRESSES`, the least recently failed forgotten first).

Tokens and passwords are never logged.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import jwt
import structlog

from agent.server.config import read_login_key
from agent.server.db import applications as apps_repo
from agent.server.db import users as repo
from agent.server.errors import ApiError, NotFound, Unauthorized, Validation
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

#: Password hashes computed at once, at most (each takes 32 MiB and a core).
HASH_SLOTS = 4
#: Seconds a login waits for a hash slot before it is answered 503.
HASH_WAIT_S = 2.0
#: Failed logins (a password checked and wrong, or an unknown email) from one address
#: within FAILURE_WINDOW_S seconds of its first, after which its logins are 429.
MAX_FAILURES = 10
FAILURE_WINDOW_S = 60.0
#: Addresses whose failures are remembered, at most.
MAX_ADDRESSES = 10_000

_T = TypeVar("_T")

_keys: weakref.WeakKeyDictionary[ServerContext, bytes] = weakref.WeakKeyDictionary()
_keys_lock = threading.Lock()


class LoginBusy(ApiError):
    """503: every hash slot is taken (come back in ``retry_after`` seconds)."""

    status = 503
    type = "ServiceUnavailable"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyLogins(LoginBusy):
    """429: this address failed too often lately."""

    status = 429
    type = "TooManyRequests"


class FailureThrottle:
    """Failed logins per address in a window that starts at the first failure: at
    ``limit`` failures, the address waits for the window's end. Bounded: ``size``
    addresses, the least recently failed forgotten first. Thread-safe."""

    def __init__(
        self,
        limit: int = MAX_FAILURES,
        window: float = FAILURE_WINDOW_S,
        size: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window, self.size, self.clock = limit, window, size, clock
        self._lock = threading.Lock()
        #: address → (the window's start, failures in it), least recently failed first
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def wait(self, address: str) -> int:
        """Seconds ``address`` must wait before it may try again; 0: it may now."""
        with self._lock:
            entry = self._failures.get(address)
            if entry is None:
                return 0
            start, count = entry
            left = start + self.window - self.clock()
            if left <= 0:
                del self._failures[address]
                return 0
            return math.ceil(left) if count >= self.limit else 0

    def failed(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            start, count = self._failures.pop(address, (now, 0))
            if now - start >= self.window:
                start, count = now, 0
            self._failures[address] = (start, count + 1)
            while len(self._failures) > self.size:
                self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)


class _Guard:
    """A server's bounds on logins (see the module)."""

    def __init__(self) -> None:
        self.throttle = FailureThrottle()
        self._slots: anyio.CapacityLimiter | None = None

    @property
    def slots(self) -> anyio.CapacityLimiter:
        # (Made on first use: an anyio limiter is made in a running event loop.)
        if self._slots is None:
            self._slots = anyio.CapacityLimiter(HASH_SLOTS)
        return self._slots


_guards: weakref.WeakKeyDictionary[ServerContext, _Guard] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def _guard(ctx: ServerContext) -> _Guard:
    with _guards_lock:
        guard = _guards.get(ctx)
        if guard is None:
            guard = _guards[ctx] = _Guard()
        return guard


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
    """The key login tokens are signed with: the ``login_key_file``'s, else the one
    in the database (made on first use); read once, then cached."""
    with _keys_lock:
        key = _keys.get(ctx)
        if key is None:
            if ctx.cfg.login_key_file is not None:
                key = read_login_key(ctx.cfg.login_key_file)
            else:
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


async def guarded_login(ctx: ServerContext, header: str, address: str) -> str:
    """:func:`login` within the bounds of the module: 429 (:class:`TooManyLogins`)
    for an ``address`` that failed too often lately, 503 (:class:`LoginBusy`) when no
    hash slot freed up in time; a failure (401 after the hash) counts against the
    address. A malformed header is answered 401 at once (no hash, not counted)."""
    _throttled(ctx, address)
    email, password = basic_credentials(header)
    return await _bounded(ctx, address, lambda: check_password(ctx, email, password))


async def guarded_verify(
    ctx: ServerContext, email: str, password: str, address: str
) -> tuple[str, str]:
    """:func:`verify_user` within the bounds of :func:`guarded_login` (the same
    throttle and hash slots): the web console's sign-in."""
    _throttled(ctx, address)
    if not email or len(email) > MAX_EMAIL or len(password) > MAX_PASSWORD:
        raise Unauthorized("Wrong email or password")
    return await _bounded(ctx, address, lambda: verify_user(ctx, email, password))


def _throttled(ctx: ServerContext, address: str) -> None:
    wait = _guard(ctx).throttle.wait(address)
    if wait:
        raise TooManyLogins(f"Too many failed logins from this address: retry in {wait} s", wait)


async def _bounded(ctx: ServerContext, address: str, check: Callable[[], _T]) -> _T:
    guard = _guard(ctx)
    slots = guard.slots
    with anyio.move_on_after(HASH_WAIT_S) as waited:
        await slots.acquire()
    if waited.cancelled_caught:
        log.debug("login refused: every hash slot is busy", address=address)
        raise LoginBusy("Too many logins at once: retry shortly", 1)
    try:
        return await anyio.to_thread.run_sync(check)
    except Unauthorized:
        guard.throttle.failed(address)
        if guard.throttle.wait(address):  # (logged once a window, not at every 429)
            log.warning(
                "logins from an address refused for a while: too many failures", address=address
            )
        raise
    finally:
        slots.release()


def login(ctx: ServerContext, header: str) -> str:
    """A new login token for the user the Basic ``header`` names, or 401 (the same
    answer, after the same scrypt, for an unknown email as for a wrong password).
    Unbounded: the API calls :func:`guarded_login`."""
    return check_password(ctx, *basic_credentials(header))


def verify_user(ctx: ServerContext, email: str, password: str) -> tuple[str, str]:
    """The user's id and application if ``password`` is the user's, else 401 (the
    same answer, after the same scrypt, for an unknown email)."""
    with ctx.db.transaction() as s:
        storable = text_problem(email) is None  # (PostgreSQL cannot even look up a NUL)
        user = repo.by_email(s, normalize_email(email)) if storable else None
        user_id, app_id = (user.id, user.application_id) if user is not None else ("", "")
        stored = user.password_hash if user is not None else None
    if not verify_password(password, stored) or user is None:
        log.info("login refused", known=user is not None)
        raise Unauthorized("Wrong email or password")
    return user_id, app_id


def check_password(ctx: ServerContext, email: str, password: str) -> str:
    """A new login token if ``password`` is the user's, else 401 (see :func:`login`)."""
    user_id, app_id = verify_user(ctx, email, password)
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

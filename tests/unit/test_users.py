"""Password hashes (scrypt, parameters in the hash), Basic credentials, and a login
that costs one scrypt whether or not the email is known."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.server.config import ServerConfig
from agent.server.context import ServerContext
from agent.server.errors import Conflict, NotFound, Unauthorized, Validation
from agent.server.service import passwords, users
from agent.server.service.passwords import Cost, hash_password, verify_password

#: A cheap cost for the property tests (the default's 100 ms per hash, times hundreds
#: of examples, would prove nothing more).
CHEAP = Cost(n=16, r=1, p=1)


@settings(max_examples=100, deadline=None)
@given(password=st.text(max_size=64), other=st.text(max_size=64))
def test_a_hash_matches_its_password_only(password: str, other: str) -> None:
    stored = hash_password(password, CHEAP)
    assert verify_password(password, stored)
    assert verify_password(other, stored) is (other == password)


def test_the_hash_carries_its_parameters_and_a_salt_of_its_own() -> None:
    one, two = hash_password("pässwörd ✓"), hash_password("pässwörd ✓")
    assert one != two  # each has its own salt
    scheme, n, r, p, salt, key = one.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", passwords.N, passwords.R, passwords.P)
    assert len(base64.urlsafe_b64decode(salt + "==")) == passwords.SALT_BYTES
    assert len(base64.urlsafe_b64decode(key + "=")) == passwords.KEY_BYTES
    assert verify_password("pässwörd ✓", one)
    assert verify_password("pässwörd ✓", two)
    assert not verify_password("passwörd ✓", one)
    # A hash made at another cost is still read at that cost.
    assert verify_password("x", hash_password("x", Cost(n=1 << 10, r=4, p=2)))


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "bcrypt$2$1$1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5",
        "scrypt$1048577$8$1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5",  # n not a power of 2
        "scrypt$1073741824$8$1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5",  # n too large
        "scrypt$16$1024$1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5",  # r too large
        "scrypt$16$1$1$!!$a2V5a2V5a2V5a2V5a2V5a2V5",
        "scrypt$16$1$1$c2FsdHNhbHQ",
    ],
)
def test_a_malformed_or_too_costly_stored_hash_matches_nothing(stored: str) -> None:
    assert not verify_password("password", stored)


def test_an_unknown_user_costs_the_same_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = hash_password("secret")
    assert not verify_password("secret", None)  # (the decoy is made once, here)
    calls: list[dict[str, Any]] = []
    real = hashlib.scrypt

    def counted(password: bytes, **kw: Any) -> bytes:
        calls.append(kw)
        return real(password, **kw)

    monkeypatch.setattr(hashlib, "scrypt", counted)
    assert not verify_password("secret", None)
    assert not verify_password("wrong", stored)
    assert not verify_password("x" * 2000, stored)
    assert verify_password("secret", stored)
    assert len(calls) == 4
    assert all(c["n"] == passwords.N and c["r"] == passwords.R for c in calls)


def test_passwords_over_the_bound_are_not_hashed() -> None:
    with pytest.raises(ValueError, match="at most"):
        hash_password("x" * (passwords.MAX_PASSWORD + 1), CHEAP)


def _basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_basic_credentials() -> None:
    assert users.basic_credentials(_basic("a@b.c:p:q")) == ("a@b.c", "p:q")
    assert users.basic_credentials("basic " + _basic("a@b.c:")[6:]) == ("a@b.c", "")
    for header in [
        "",
        "Bearer abc",
        "Basic",
        "Basic !!!!",
        _basic("no-colon"),
        _basic(":password"),
        _basic("a" * 256 + ":p"),
        "Basic " + base64.b64encode(b"\xff\xfe:p").decode(),
        _basic("a@b.c:" + "p" * 800),  # over 1 KiB encoded
    ]:
        with pytest.raises(Unauthorized):
            users.basic_credentials(header)


@pytest.mark.parametrize(
    "email", ["", "no-at", "@example.com", "a@", "a b@c.d", "a@b\x00.c", "a" * 251 + "@b.cd"]
)
def test_emails_that_cannot_be_a_login_are_refused(email: str) -> None:
    with pytest.raises(Validation):
        users.check_email(email)


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServerContext]:
    cfg = ServerConfig.model_validate(
        {"db": f"sqlite:///{tmp_path / 'server.db'}", "state_dir": str(tmp_path)}
    )
    context = ServerContext(cfg, with_broker=False)
    try:
        yield context
    finally:
        context.db.close()


def test_users_in_the_database(ctx: ServerContext, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.server.db import applications as apps_repo

    with ctx.db.transaction() as s:
        app_id = apps_repo.create_application(s, "a", "edge").id
    user_id = users.create_user(ctx.db, app_id, " Me@Example.COM ", "pw")
    with pytest.raises(Conflict):
        users.create_user(ctx.db, app_id, "me@example.com", "other")
    with pytest.raises(NotFound):
        users.create_user(ctx.db, "f" * 24, "new@example.com", "pw")
    with pytest.raises(Validation):
        users.create_user(ctx.db, app_id, "new@example.com", "")

    token = users.login(ctx, _basic("ME@example.com:pw"))
    caller = users.caller_for_token(ctx, token, frozenset({"all.Application"}))
    assert caller.app.id == app_id
    assert caller.scopes == frozenset({"all.Application"})
    assert caller.token_id != user_id  # the token's own id (jti)

    # One scrypt for a wrong password, one for an unknown email: the same work.
    verify_password("", None)  # (the decoy hash is made once per process)
    calls: list[int] = []
    real = hashlib.scrypt

    def counted(password: bytes, **kw: Any) -> bytes:
        calls.append(kw["n"])
        return real(password, **kw)

    monkeypatch.setattr(hashlib, "scrypt", counted)
    for header in (_basic("me@example.com:wrong"), _basic("who@example.com:pw")):
        with pytest.raises(Unauthorized, match="Wrong email or password"):
            users.login(ctx, header)
    assert calls == [passwords.N, passwords.N]

    assert users.delete_user(ctx.db, "me@example.com") == user_id
    with pytest.raises(Unauthorized):
        users.caller_for_token(ctx, token, frozenset())
    with pytest.raises(NotFound):
        users.delete_user(ctx.db, "me@example.com")


def test_the_failure_throttle_counts_per_address_in_a_window() -> None:
    now = [1000.0]
    throttle = users.FailureThrottle(limit=3, window=60, size=2, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.wait("a") == 0
        throttle.failed("a")
    assert throttle.wait("a") == 60
    assert throttle.wait("b") == 0
    now[0] += 59.5
    assert throttle.wait("a") == 1  # (rounded up)
    now[0] += 0.5
    assert throttle.wait("a") == 0  # the window is over: forgotten
    throttle.failed("a")
    assert throttle.wait("a") == 0  # one failure of a new window
    # Bounded: the least recently failed address is forgotten first.
    throttle.failed("b")
    throttle.failed("c")
    assert len(throttle) == 2
    for _ in range(3):
        throttle.failed("c")
    throttle.failed("d")
    assert len(throttle) == 2
    assert throttle.wait("c") == 60
    throttle.failed("e")  # ("c" failed before "d": it is forgotten)
    assert throttle.wait("c") == 0


def test_a_login_key_file_signs_the_tokens(tmp_path: Path) -> None:
    key_file = tmp_path / "login.key"
    key_file.write_bytes(b"k" * 40 + b"\n")
    key_file.chmod(0o600)
    settings = {"db": f"sqlite:///{tmp_path / 'server.db'}", "state_dir": str(tmp_path)}
    cfg = ServerConfig.model_validate({**settings, "login_key_file": str(key_file)})
    context = ServerContext(cfg, with_broker=False)
    try:
        from agent.server.db import applications as apps_repo
        from agent.server.db.models import ServerSecret

        with context.db.transaction() as s:
            app_id = apps_repo.create_application(s, "a", "edge").id
        users.create_user(context.db, app_id, "me@example.com", "pw")
        token = users.login(context, _basic("me@example.com:pw"))
        claims = jwt.decode(token, b"k" * 40, algorithms=["HS256"], issuer=users.ISSUER)
        assert claims["app"] == app_id
        assert users.caller_for_token(context, token, frozenset()).app.id == app_id
        with context.db.transaction() as s:
            assert s.get(ServerSecret, users.KEY_NAME) is None  # nothing in the database
    finally:
        context.db.close()
    # Only a file of the owner's, of 32 bytes or more.
    for content, mode, message in [
        (b"k" * 40, 0o644, "mode 644 lets others read it"),
        (b"k" * 31 + b"\n", 0o600, "32 to 4096 bytes"),
    ]:
        key_file.write_bytes(content)
        key_file.chmod(mode)
        with pytest.raises(ValidationError, match=message):
            ServerConfig.model_validate({**settings, "login_key_file": str(key_file)})
    with pytest.raises(ValidationError, match="cannot read"):
        ServerConfig.model_validate({**settings, "login_key_file": str(tmp_path / "none")})

"""Login for Mender's tools (useradm): the real ``mender-cli login`` against the
server, its saved token used by the real ``mender-cli``, and the tokens the server
must refuse (wrong password, expired, another key, ``alg: none``, a deleted user,
the Losant API's routes).

One server for the module (SQLite: the database does not matter here, except to the
shared signing key, which is checked on both databases)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import jwt
import pytest
from broker import Broker
from server_harness import RunningServer, admin, running_server

from agent import cli
from agent.server.db import users as users_repo
from agent.server.db.engine import Database
from agent.server.service import users

LOGIN = "/api/management/v1/useradm/auth/login"
LOGOUT = "/api/management/v1/useradm/auth/logout"
ARTIFACTS = "/api/management/v1/deployments/artifacts"
PASSWORD = "correct horse battery staple ✓"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("login")
    broker = Broker(root / "broker")
    broker.start()
    try:
        db = f"sqlite:///{root / 'server.db'}"
        with running_server(root / "server", db, broker.url, prefix="login") as srv:
            yield srv
    finally:
        broker.stop()


def _db_args(srv: RunningServer) -> list[str]:
    return ["--db", srv.db_url, "--state-dir", str(srv.cfg.state_dir)]


def create_user(srv: RunningServer, tmp_path: Path, email: str, password: str = PASSWORD) -> str:
    secret = tmp_path / f"{email}.password"
    secret.write_text(password + "\n")
    return admin(
        *_db_args(srv),
        "create-user",
        "--application",
        srv.app_id,
        "--email",
        email,
        "--password-file",
        str(secret),
    )


def basic(email: str, password: str) -> dict[str, str]:
    pair = base64.b64encode(f"{email}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def login(srv: RunningServer, email: str, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(srv.url + LOGIN, headers=basic(email, password), timeout=30)


def get(srv: RunningServer, path: str, token: str) -> httpx.Response:
    return httpx.get(srv.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def mender_call(srv: RunningServer, token: str) -> httpx.Response:
    """A call of Mender's API with ``token`` (every route checks it the same way)."""
    return get(srv, ARTIFACTS, token)


@contextmanager
def database(url: str) -> Iterator[Database]:
    db = Database(url)
    try:
        yield db
    finally:
        db.close()


def mender_cli(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    return subprocess.run(
        ["mender-cli", *argv], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def assert_mender_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    body = r.json()
    assert set(body) == {"error", "request_id"}, body
    assert r.headers["x-men-requestid"] == body["request_id"]


def test_mender_cli_logs_in_and_uses_the_saved_token(server: RunningServer, tmp_path: Path) -> None:
    user_id = create_user(server, tmp_path, "Ops@Example.com")
    home = tmp_path / "home"
    home.mkdir()
    # (the email is matched whatever its case)
    done = mender_cli(
        home, "login", "--server", server.url, "--username", "ops@example.com",
        "--password", PASSWORD,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    saved = home / ".cache" / "mender" / "authtoken"
    token = saved.read_text().strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == user_id
    assert claims["app"] == server.app_id
    assert claims["iss"] == "edge-agent"
    assert claims["exp"] - claims["iat"] == server.cfg.login_ttl_s
    assert jwt.get_unverified_header(token)["alg"] == "HS256"

    # The saved token is what the next mender-cli command sends.
    listed = mender_cli(home, "--server", server.url, "artifacts", "list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    r = get(server, ARTIFACTS, token)
    assert r.status_code == 200, r.text
    assert r.json() == []
    # The same claims signed with another key: the server refuses mender-cli.
    saved.write_text(jwt.encode(claims, b"another key, 32 bytes long......", algorithm="HS256"))
    refused = mender_cli(home, "--server", server.url, "artifacts", "list")
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr

    # Logging out answers 204 and does not revoke (documented: tokens are stateless).
    logout = httpx.post(server.url + LOGOUT, headers={"Authorization": f"Bearer {token}"})
    assert logout.status_code == 204
    assert mender_call(server, token).status_code == 200
    assert_mender_401(httpx.post(server.url + LOGOUT))


def test_a_wrong_password_or_unknown_user_is_one_401(server: RunningServer, tmp_path: Path) -> None:
    create_user(server, tmp_path, "wrong@example.com")
    assert login(server, "wrong@example.com").status_code == 200
    refused = [
        login(server, "wrong@example.com", "not it"),
        login(server, "nobody@example.com"),
        login(server, "wrong@example.com", "x" * 1025),
        login(server, "wr\0ng@example.com"),
        httpx.post(server.url + LOGIN, headers={"Authorization": "Basic !!!"}),
        httpx.post(server.url + LOGIN, headers={"Authorization": "Basic " + "A" * 2000}),
        httpx.post(server.url + LOGIN),
    ]
    for r in refused:
        assert_mender_401(r)
    # Unknown email and wrong password: the same answer.
    assert refused[0].json()["error"] == refused[1].json()["error"]

    home = tmp_path / "home"
    home.mkdir()
    done = mender_cli(
        home, "login", "--server", server.url, "--username", "wrong@example.com",
        "--password", "not it",
    )  # fmt: skip
    assert done.returncode != 0
    assert not (home / ".cache" / "mender" / "authtoken").exists()


def forged(server: RunningServer, user_id: str, *, key: bytes, **over: object) -> str:
    now = int(time.time())
    claims = {
        "sub": user_id,
        "app": server.app_id,
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "iss": "edge-agent",
        **over,
    }
    return jwt.encode(claims, key, algorithm="HS256")


def test_tokens_the_server_did_not_sign_or_that_expired_are_refused(
    server: RunningServer, tmp_path: Path
) -> None:
    user_id = create_user(server, tmp_path, "forge@example.com")
    assert login(server, "forge@example.com").status_code == 200  # (the key exists now)
    with database(server.db_url) as db, db.transaction() as s:
        key = users_repo.secret(s, users.KEY_NAME, "unused").encode()
    # The real key makes a good token: what follows differs from it in one thing each.
    assert mender_call(server, forged(server, user_id, key=key)).status_code == 200
    now = int(time.time())
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    payload = forged(server, user_id, key=key).split(".")[1]
    bad = {
        "expired": forged(server, user_id, key=key, iat=now - 700, exp=now - 100),
        "another key": forged(server, user_id, key=b"k" * 32),
        "alg none": f"{header}.{payload}.",
        "another issuer": forged(server, user_id, key=key, iss="mender"),
        "no such user": forged(server, str(uuid.uuid4()), key=key),
        "no exp": jwt.encode({"sub": user_id, "app": server.app_id, "iss": "edge-agent"}, key),
        "garbage": "x" * 5000,
    }
    for what, token in bad.items():
        r = mender_call(server, token)
        assert r.status_code == 401, (what, r.text)
        assert r.json()["error"] == "Invalid or expired token", what


def test_a_deleted_users_token_stops_working(server: RunningServer, tmp_path: Path) -> None:
    create_user(server, tmp_path, "leaver@example.com")
    token = login(server, "leaver@example.com").text
    assert mender_call(server, token).status_code == 200
    admin(*_db_args(server), "delete-user", "--email", "leaver@example.com")
    assert_mender_401(mender_call(server, token))
    assert_mender_401(login(server, "leaver@example.com"))
    # Deleting again: nothing to delete.
    assert cli.main(["server", "admin", *_db_args(server), "delete-user", "--email",
                     "leaver@example.com"]) == 2  # fmt: skip


def test_losant_routes_keep_requiring_api_tokens(server: RunningServer, tmp_path: Path) -> None:
    create_user(server, tmp_path, "losant@example.com")
    token = login(server, "losant@example.com").text
    r = get(server, f"/applications/{server.app_id}/devices", token)
    assert r.status_code == 401, r.text
    assert r.json()["type"] == "Unauthorized"
    assert get(server, f"/applications/{server.app_id}/devices", server.token).status_code == 200


def from_address(address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (of 127.0.0.0/8): what the
    server takes for a client's address."""
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(transport=transport, timeout=30, trust_env=False)


def assert_retry(r: httpx.Response, status: int) -> int:
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "request_id"}, r.text
    return int(r.headers["retry-after"])


def test_failed_logins_from_one_address_are_throttled(
    server: RunningServer, tmp_path: Path
) -> None:
    create_user(server, tmp_path, "throttle@example.com")
    with from_address("127.0.0.2") as guesser, from_address("127.0.0.3") as other:
        for i in range(users.MAX_FAILURES):
            r = guesser.post(server.url + LOGIN, headers=basic("throttle@example.com", f"{i}"))
            assert_mender_401(r)
        # Then even the right password is 429 from that address, for the window.
        r = guesser.post(server.url + LOGIN, headers=basic("throttle@example.com", PASSWORD))
        assert 0 < assert_retry(r, 429) <= users.FAILURE_WINDOW_S
        assert "Too many failed logins" in r.json()["error"]
        # Another address logs in.
        r = other.post(server.url + LOGIN, headers=basic("throttle@example.com", PASSWORD))
        assert r.status_code == 200, r.text
        assert mender_call(server, r.text).status_code == 200


def test_logins_past_the_hash_slots_are_answered_503(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Password hashes are bounded: with every slot taken by a login whose hash does
    not end (a stand-in for a slow scrypt: a fault this test cannot cause otherwise),
    one more login is answered 503 with Retry-After once its short wait is over,
    without its hash ever starting; the held ones then finish."""
    create_user(server, tmp_path, "slots@example.com")
    real = users.verify_password
    release = threading.Event()
    started: list[str] = []

    def held(password: str, stored: str | None) -> bool:
        started.append(password)
        release.wait(60)
        return real(password, stored)

    monkeypatch.setattr(users, "verify_password", held)
    monkeypatch.setattr(users, "HASH_WAIT_S", 0.2)
    answers: list[httpx.Response] = []
    holders = [
        threading.Thread(target=lambda: answers.append(login(server, "slots@example.com")))
        for _ in range(users.HASH_SLOTS)
    ]
    try:
        for t in holders:
            t.start()
        deadline = time.monotonic() + 30
        while len(started) < users.HASH_SLOTS:
            assert time.monotonic() < deadline, f"{len(started)} hashes started"
            time.sleep(0.01)
        with from_address("127.0.0.4") as late:
            r = late.post(server.url + LOGIN, headers=basic("slots@example.com", PASSWORD))
        assert assert_retry(r, 503) == 1
        assert len(started) == users.HASH_SLOTS
    finally:
        release.set()
        for t in holders:
            t.join(30)
    assert [a.status_code for a in answers] == [200] * users.HASH_SLOTS


def test_create_user_reads_the_password_from_stdin(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = [
        "server", "admin", *_db_args(server), "create-user",
        "--application", server.app_id, "--email", "stdin@example.com",
    ]  # fmt: skip
    done = subprocess.run(
        [".venv/bin/edge-agent", *command],
        input="from stdin ü\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert login(server, "stdin@example.com", "from stdin ü").status_code == 200
    assert login(server, "stdin@example.com", "from stdin ü\n").status_code == 401
    # The email is taken (in any case); an empty password.
    monkeypatch.setattr(sys, "stdin", io.StringIO("other\n"))
    assert cli.main([*command[:-1], "STDIN@example.com"]) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert cli.main([*command[:-1], "new@example.com"]) == 2
    assert "new@example.com" not in _emails(server)
    assert login(server, "stdin@example.com", "from stdin ü").status_code == 200


def _emails(server: RunningServer) -> set[str]:
    from sqlalchemy import select

    from agent.server.db.models import User

    with database(server.db_url) as db, db.transaction() as s:
        return set(s.scalars(select(User.email)))


def test_processes_racing_to_make_the_key_get_the_same_one(db_url: str) -> None:
    """The first transaction's key wins; one racing it (blocked by it on either
    database) gets that key, not its own."""
    first, second = Database(db_url), Database(db_url)
    first.migrate()
    got: list[str] = []
    try:
        with first.transaction() as s:
            assert users_repo.secret(s, "k", "from-first") == "from-first"
            racer = threading.Thread(
                target=lambda: got.append(_secret(second, "from-second")), daemon=True
            )
            racer.start()
            time.sleep(0.3)  # (the racer's insert waits for this transaction)
        racer.join(30)
        assert got == ["from-first"]
        assert _secret(second, "again") == "from-first"
    finally:
        first.close()
        second.close()


def _secret(db: Database, candidate: str) -> str:
    with db.transaction() as s:
        return users_repo.secret(s, "k", candidate)

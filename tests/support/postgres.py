"""A private PostgreSQL cluster for tests.

:class:`PostgresCluster` runs ``postgres`` on a free loopback port with its own data
directory, so a test can stop, kill and restart it (committed rows survive both a clean
stop and a ``kill -9``: restart runs crash recovery, as on a real server).

``initdb`` runs once per test session into a template data directory
(:func:`session_template`); each cluster starts from a copy of it, which is faster.

Running as root (the tests do, in CI): PostgreSQL refuses to run as root, so ``initdb``
and ``postgres`` run as the ``postgres`` system user. That user cannot enter pytest's
``tmp_path`` (``/tmp/pytest-of-root`` is mode 0700), so the data directory then lives in
a private directory of its own under the system temp directory, owned by ``postgres``;
``workdir/data`` is a symlink to it, and :meth:`PostgresCluster.remove` deletes it. The
server log is always ``workdir/postgres.log`` (written through the server's stderr).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from broker import free_port
from psycopg import sql

SERVER_USER = "postgres"  # the OS user that runs the server when the tests run as root
SUPERUSER = "postgres"  # the database superuser (initdb -U), trusted on loopback


def _find_bin() -> Path | None:
    """The newest Debian ``/usr/lib/postgresql/N/bin``, else wherever ``initdb`` is on PATH."""
    found: list[tuple[int, Path]] = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bindir = Path(initdb).parent
        with contextlib.suppress(ValueError):
            found.append((int(bindir.parent.name), bindir))
    if found:
        return max(found)[1]
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


POSTGRES_BIN = _find_bin()


def postgres_available() -> str | None:
    """Why a cluster cannot run here, or None when it can."""
    if POSTGRES_BIN is None:
        return "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb nor initdb)"
    for name in ("initdb", "postgres"):
        if not os.access(POSTGRES_BIN / name, os.X_OK):
            return f"PostgreSQL is incomplete: {POSTGRES_BIN / name} is missing"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL as"
    return None


def _bin(name: str) -> str:
    if POSTGRES_BIN is None:
        raise RuntimeError(postgres_available() or "PostgreSQL is not installed")
    return str(POSTGRES_BIN / name)


def _as_server_user() -> dict[str, Any]:
    """Popen arguments that run the child as the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(SERVER_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _chown_tree(path: Path) -> None:
    """Give ``path`` and everything under it to the server user (when we are root)."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(SERVER_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def _server_home(workdir: Path, prefix: str) -> tuple[Path, bool]:
    """A directory the server user owns and can reach: (path, whether it is outside workdir)."""
    if os.geteuid() != 0:
        return workdir, False
    home = Path(tempfile.mkdtemp(prefix=prefix))
    _chown_tree(home)
    atexit.register(shutil.rmtree, home, ignore_errors=True)  # in case nobody calls remove()
    return home, True


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError as e:
        return f"(no log: {e})"


def initdb(data: Path, log: Path) -> None:
    """``initdb`` into ``data`` (whose parent the server user must own); output to ``log``."""
    cmd = [
        _bin("initdb"),
        "-D",
        str(data),
        "-U",
        SUPERUSER,
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",  # independent of the caller's LANG (which may name a missing locale)
        "--no-sync",
    ]
    with log.open("ab") as out:  # the child keeps its own copy
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=data.parent,  # initdb needs a current directory it can enter
            check=False,
            timeout=120,
            **_as_server_user(),
        )
    if done.returncode != 0:
        raise RuntimeError(f"initdb exited with {done.returncode}: {_tail(log)}")


_templates: dict[Path, Path] = {}  # basetemp -> template data directory, one per session


def session_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly ``initdb``-ed data directory, made once per test session, to copy from."""
    key = tmp_path_factory.getbasetemp()
    template = _templates.get(key)
    if template is not None and (template / "PG_VERSION").exists():
        return template
    workdir = tmp_path_factory.mktemp("postgres-template")
    home, _ = _server_home(workdir, "edge-pg-template-")
    template = home / "data"
    initdb(template, workdir / "initdb.log")
    _templates[key] = template
    return template


def _stat(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp,
    …), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the postmaster's backends and workers)."""
    out = []
    for path in glob.glob("/proc/[0-9]*/stat"):
        child = path.split("/")[2]
        fields = _stat(child)
        if fields is not None and len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(child))
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped does not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != b"Z"


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting to be reaped do not)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc/self"):
        return True
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


class PostgresCluster:
    """One ``postgres`` server on 127.0.0.1, a free port, trust auth for ``postgres``.

    The first :meth:`start` copies ``template`` (or runs ``initdb`` when there is none)
    and creates the database ``database``; :attr:`url` is its SQLAlchemy URL.
    ``settings`` are more ``-c name=value`` server settings.

    The server runs with ``fsync=off`` and ``full_page_writes=off``: fast, and still
    durable across ``kill -9`` of the server (the kernel keeps what was written), not
    across a crash of the machine. ``synchronous_commit`` stays on on purpose: with it
    off, a commit returns before its WAL is written, and a :meth:`kill` within the WAL
    writer's delay loses transactions that were reported committed.
    """

    def __init__(
        self,
        workdir: Path,
        template: Path | None = None,
        database: str = "edge",
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.dir = workdir
        self.settings = dict(settings or {})
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.database = database
        self.template = template
        self.log_path = self.dir / "postgres.log"
        home, self._outside = _server_home(self.dir, "edge-pg-")
        self.data = home / "data"
        if self._outside:
            (self.dir / "data").symlink_to(self.data)
        self.proc: subprocess.Popen[bytes] | None = None

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the cluster's database (``edge`` unless told otherwise)."""
        return self.url_for(self.database)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connect(self, database: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A plain psycopg connection (close it: ``with cluster.connect() as conn: ...``)."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            dbname=database,
            connect_timeout=2,
            **kwargs,
        )

    def _make_data(self) -> None:
        if self.template is None:
            initdb(self.data, self.dir / "initdb.log")
            return
        shutil.copytree(self.template, self.data, symlinks=True)  # keeps modes (0700)
        _chown_tree(self.data)  # copies are root's: give them back to the server user

    def _socket_dir(self) -> str:
        # Unix socket paths are limited to ~107 bytes; tests use TCP anyway, so without
        # room for ".s.PGSQL.<port>" the server gets no Unix socket at all.
        return str(self.data) if len(str(self.data)) < 90 else ""

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts connections (RuntimeError if not)."""
        if self.running:
            raise RuntimeError(f"postgres on port {self.port} is already running")
        if not (self.data / "PG_VERSION").exists():
            self._make_data()
        cmd = [
            _bin("postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            self._socket_dir(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
        ]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        with self.log_path.open("ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.data,
                start_new_session=True,  # its own process group, so kill() gets every process
                **_as_server_user(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"postgres exited with {code}: {_tail(self.log_path)}")
            if self._ours():
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"postgres did not accept connections on {self.port} within "
                    f"{timeout} s: {_tail(self.log_path)}"
                )
            time.sleep(0.02)
        with self.connect(autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
        if not exists:
            self.create_database(self.database)

    def _ours(self) -> bool:
        """Whether our server accepts connections on the port (not another one's)."""
        try:
            with self.connect() as conn:
                row = conn.execute("SHOW data_directory").fetchone()
        except psycopg.OperationalError:
            return False
        return row is not None and os.path.realpath(row[0]) == os.path.realpath(self.data)

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns its SQLAlchemy URL."""
        with self.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT): open sessions are ended, a checkpoint is written."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """``kill -9`` of the whole server (postmaster and all its children), as in a crash.

        Killing only the postmaster would leave backends running on the old shared
        memory, and the next start would refuse to run beside them. Every backend
        makes itself a process group leader (``setsid`` in PostgreSQL's
        ``InitPostmasterChild``), so the postmaster's group does not hold them: they
        are found as its children and killed one by one (else a backend could still
        answer a query for a moment, until it notices its postmaster is gone: seen
        in CI under load).
        """
        # returncode None: not reaped yet, so its pid (the group id) cannot have been reused
        if self.proc is not None and self.proc.returncode is None:
            pgid = self.proc.pid  # the postmaster, its group's leader (start_new_session)
            children = _children(pgid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(10)
            deadline = time.monotonic() + 10
            while (_group_alive(pgid) or any(map(_alive, children))) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.01)
        self.proc = None

    def restart(self) -> None:
        """Stop (if running) and start again, on the same port with the same data."""
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop, and delete the data directory when it lives outside ``workdir``."""
        self.stop()
        if self._outside:
            shutil.rmtree(self.data.parent, ignore_errors=True)


def postgres_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """Body of a ``postgres`` fixture: a started cluster, removed afterwards.

    Use with ``yield from postgres_fixture(tmp_path_factory)`` in a fixture of any scope.
    """
    reason = postgres_available()
    if reason is not None:
        pytest.fail(f"{reason}: run `make test`: it installs postgresql", pytrace=False)
    cluster = PostgresCluster(
        tmp_path_factory.mktemp("postgres"), template=session_template(tmp_path_factory)
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()

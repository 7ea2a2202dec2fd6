"""The database connection: URLs, engines, sessions, and migrating to the schema.

``sqlite:///path`` (the default, under the server's state dir) or
``postgresql://user@host/db``. SQLite is for one server process; several processes
need PostgreSQL (they coordinate through row locks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from agent.server.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"


def normalize_url(url: str) -> str:
    """``postgresql://`` gets the psycopg 3 driver; other schemes than SQLite and
    PostgreSQL are refused."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"not a database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return parsed.render_as_string(hide_password=False)
    if backend == "sqlite":
        return url
    raise ConfigError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")


#: The execution option of a connection whose transactions only read (SQLite: a
#: deferred BEGIN, see :meth:`Database.reading`).
READING = "edge_reading"


def make_engine(url: str, **kw: Any) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kw)
        event.listen(engine, "connect", _sqlite_pragmas)
        # SQLite's own BEGIN is deferred: a read then a write in one transaction can
        # fail with "database is locked". BEGIN IMMEDIATE takes the write lock first;
        # a reading transaction (Database.reading) takes none (WAL: it reads a
        # snapshot while others write).
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, **kw)


def _sqlite_begin(conn: Connection) -> None:
    reading = conn.get_execution_options().get(READING, False)
    conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # transactions are begun by the "begin" event
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema (Alembic ``upgrade head``)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Database:
    """An engine and its session factory."""

    def __init__(self, url: str, **kw: Any) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, **kw)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def migrate(self) -> None:
        migrate(self.engine)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed at the end, rolled back on error."""
        with self.sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session in one transaction that only reads: on SQLite it does not take the
        write lock (the other transactions' writes go on meanwhile), on PostgreSQL it
        is ``READ ONLY``. A write in it fails."""
        with self.engine.connect() as conn:
            conn.execution_options(**{READING: True})
            if self.is_postgres:
                conn.execution_options(postgresql_readonly=True)
            with Session(bind=conn) as session, session.begin():
                yield session

    def close(self) -> None:
        self.engine.dispose()

"""The private PostgreSQL cluster of tests/support/postgres.py: start, crash, restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from postgres import PostgresCluster, postgres_fixture, session_template

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    yield from postgres_fixture(tmp_path_factory)


def test_table_round_trip_with_sqlalchemy(pg: PostgresCluster) -> None:
    assert pg.url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/edge"
    engine = sa.create_engine(pg.url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE devices (id text PRIMARY KEY, fw text)"))
            conn.execute(
                sa.text("INSERT INTO devices VALUES (:id, :fw)"), {"id": "dev-1", "fw": "1.2.3"}
            )
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, fw FROM devices")).all()
            assert [tuple(r) for r in rows] == [("dev-1", "1.2.3")]
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == "edge"
    finally:
        engine.dispose()


def test_kill_loses_nothing_committed(pg: PostgresCluster) -> None:
    url = pg.create_database("crash")
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (n int)"))
            conn.execute(sa.text("INSERT INTO t VALUES (42)"))
        with pg.connect("crash") as held:  # a live backend while the server dies
            pg.kill()
            assert not pg.running
            with pytest.raises(psycopg.OperationalError):
                held.execute("SELECT 1")
        with pytest.raises(sa.exc.OperationalError), engine.connect():
            pass
        pg.restart()
        assert pg.running
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT n FROM t")).scalar_one() == 42
    finally:
        engine.dispose()
    assert "database system was interrupted" in pg.log_path.read_text()  # crash recovery


def test_clean_restart_keeps_port_and_data(pg: PostgresCluster) -> None:
    port = pg.port
    pg.restart()
    assert pg.port == port
    with pg.connect("edge") as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (1,)


def test_two_clusters_at_once(
    pg: PostgresCluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = PostgresCluster(tmp_path / "other", template=session_template(tmp_path_factory))
    try:
        other.start()
        assert other.port != pg.port
        for cluster in (pg, other):
            with cluster.connect() as conn:
                assert conn.execute("SELECT inet_server_port()").fetchone() == (cluster.port,)
        with other.connect("edge") as conn:  # a separate cluster: no table from the first one
            assert conn.execute("SELECT to_regclass('devices')").fetchone() == (None,)
    finally:
        other.remove()


def test_start_failure_reports_the_log(
    pg: PostgresCluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    clash = PostgresCluster(tmp_path / "clash", template=session_template(tmp_path_factory))
    clash.port = pg.port  # taken: the server cannot bind it
    try:
        with pytest.raises(RuntimeError, match="postgres exited with") as info:
            clash.start()
        assert "could not" in str(info.value)
        assert not clash.running
    finally:
        clash.remove()


def test_fixture_fails_without_binaries(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import postgres

    monkeypatch.setattr(postgres, "POSTGRES_BIN", None)
    assert "not installed" in (postgres.postgres_available() or "")
    with pytest.raises(pytest.fail.Exception, match="run `make test`: it installs postgresql"):
        next(postgres_fixture(tmp_path_factory))

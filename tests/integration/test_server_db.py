"""The server's database: the migrations build exactly the tables the code declares,
on SQLite and on PostgreSQL, and migrating twice changes nothing."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from agent.server.db.engine import Database
from agent.server.db.models import Base


def test_migrations_match_the_models(db_url: str) -> None:
    db = Database(db_url)
    try:
        db.migrate()
        db.migrate()  # idempotent: already at head
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            tables = set(inspect(conn).get_table_names())
        assert diff == []
        assert set(Base.metadata.tables) <= tables
        assert "alembic_version" in tables
    finally:
        db.close()

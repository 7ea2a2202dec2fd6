"""Users (Mender's ``useradm``) and the secrets every server process shares: the
repository of both tables' rows."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.server.db.models import ServerSecret, User
from agent.server.errors import Conflict


def create(session: Session, app_id: str, email: str, password_hash: str) -> User:
    """A new user; 409 if the email is taken (in any application: it is the login)."""
    user = User(application_id=app_id, email=email, password_hash=password_hash)
    try:
        with session.begin_nested():
            session.add(user)
    except IntegrityError:
        raise Conflict(f"a user {email!r} exists already") from None
    return user


def get(session: Session, user_id: str) -> User | None:
    return session.get(User, user_id)


def by_email(session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(User.email == email))


def delete_by_email(session: Session, email: str) -> str | None:
    """Delete a user; the id it had, or ``None`` if there was none."""
    user = by_email(session, email)
    if user is None:
        return None
    session.execute(delete(User).where(User.id == user.id))
    return user.id


def secret(session: Session, name: str, candidate: str) -> str:
    """The shared secret ``name``: ``candidate`` if it did not exist yet (it is stored
    then), else the one stored. Of several processes racing to create it, one insert
    wins and every process gets the winner's value (the others' inserts do nothing;
    PostgreSQL makes them wait for the winner's commit, SQLite takes one writer)."""
    found = session.get(ServerSecret, name)
    if found is not None:
        return found.value
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(
        insert(ServerSecret).values(name=name, value=candidate).on_conflict_do_nothing()
    )
    value = session.scalar(
        select(ServerSecret.value)
        .where(ServerSecret.name == name)
        .execution_options(populate_existing=True)
    )
    assert value is not None
    return value

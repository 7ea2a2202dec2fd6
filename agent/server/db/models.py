"""The tables of the control plane (SQLAlchemy 2 declarative, typed).

Every schema change comes with an Alembic migration in ``migrations/versions``; the
test ``test_server_db`` checks that the migrations produce exactly these tables.

Ids the API hands out (applications, tokens, deployments, jobs) are 24 hex digits,
like Losant's. Device ids are the agent's own ids (they are MQTT topic levels), unique
per application.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    """24 hex digits (96 random bits), the shape of Losant's object ids."""
    return secrets.token_hex(12)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and read back timezone-aware, on SQLite too (which
    keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class Application(Base):
    """A fleet: its devices live under one MQTT topic prefix."""

    __tablename__ = "applications"

    id: Mapped[str] = mapped_column(String(24), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255))
    topic_prefix: Mapped[str] = mapped_column(String(128), unique=True)
    #: Signs the artifact URLs handed to this application's devices (HMAC-SHA256).
    url_key: Mapped[str] = mapped_column(String(64), default=lambda: secrets.token_hex(32))
    #: An ed25519 private key (PEM) that signs the artifacts released to its devices
    #: (the agent's signature format; devices trusting its public key verify them).
    signing_key: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """An API token: only the SHA-256 of its secret is kept (the secret is 256 random
    bits, so a fast hash is enough: there is nothing to guess)."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(24), primary_key=True, default=new_id)
    application_id: Mapped[str] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255), default="")
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Device(Base):
    """A device of an application: created through the API or when it first connects.

    ``desired`` is the document the server last wrote (it is its only writer);
    ``published_generation`` says up to which generation the broker acknowledged it,
    so a document written while the broker was away is published later.
    """

    __tablename__ = "devices"

    application_id: Mapped[str] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    attributes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    device_class: Mapped[str] = mapped_column(String(32), default="edgeCompute")
    device_type: Mapped[str | None] = mapped_column(String(64))
    agent_version: Mapped[str | None] = mapped_column(String(64))
    runtime: Mapped[str | None] = mapped_column(String(128))
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[datetime | None]
    connected_at: Mapped[datetime | None]
    disconnected_at: Mapped[datetime | None]
    creation_date: Mapped[datetime] = mapped_column(default=utcnow)
    last_updated: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    decommissioned: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The last state report (the agent's own document, for the console and export).
    state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    desired: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    published_generation: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_devices_unpublished", "application_id", "published_generation"),)


class Blob(Base):
    """An artifact's bytes, stored once by content (``artifacts/<sha256>``)."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(default=utcnow)


class FlowVersion(Base):
    """A version of a flow: what a release names. ``artifacts`` is a list of
    ``{"sha256", "size", "deviceTypes"?}`` (one without device types serves every type)."""

    __tablename__ = "flow_versions"

    id: Mapped[str] = mapped_column(String(24), primary_key=True, default=new_id)
    application_id: Mapped[str] = mapped_column(ForeignKey("applications.id", ondelete="CASCADE"))
    flow_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    artifacts: Mapped[list[Any]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    notes: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("application_id", "flow_id", "version"),)


class Deployment(Base):
    """One flow on one device (Losant's edge or embedded deployment): what is wanted,
    what the device reports, and its attempts (``DeploymentAttempt``)."""

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(24), primary_key=True, default=new_id)
    application_id: Mapped[str] = mapped_column(ForeignKey("applications.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(128))
    flow_id: Mapped[str] = mapped_column(String(128))
    #: "edge" or "embedded": the Losant resource it is listed under.
    kind: Mapped[str] = mapped_column(String(16), default="edge")
    desired_version: Mapped[str | None] = mapped_column(String(128))
    current_version: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    #: The sha256 the device reports it runs (the embedded export serves it).
    current_sha256: Mapped[str | None] = mapped_column(String(64))
    creation_date: Mapped[datetime] = mapped_column(default=utcnow)
    last_updated: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("application_id", "device_id", "flow_id"),
        Index("ix_deployments_app_flow", "application_id", "flow_id"),
        Index("ix_deployments_app_updated", "application_id", "last_updated"),
    )


class DeploymentAttempt(Base):
    """One release of a version to one deployment, kept after the next one."""

    __tablename__ = "deployment_attempts"

    id: Mapped[str] = mapped_column(String(24), primary_key=True, default=new_id)
    deployment_id: Mapped[str] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[str | None] = mapped_column(String(128))
    generation: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32), default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    finished: Mapped[datetime | None]


class Job(Base):
    """A background job (exports): queued, then ``done`` or ``failed`` with a result."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(24), primary_key=True, default=new_id)
    application_id: Mapped[str] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    finished: Mapped[datetime | None]

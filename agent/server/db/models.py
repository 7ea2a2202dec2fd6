"""The tables of the control plane (SQLAlchemy 2 declarative, typed).

Every schema change comes with an Alembic migration in ``migrations/versions``; the
test ``test_server_db`` checks that the migrations produce exactly these tables.

Ids the API hands out (applications, tokens, deployments, jobs) are 24 hex digits,
like Losant's. Device ids are the agent's own ids (they are MQTT topic levels), unique
per application.
"""

from __future__ import annotations

import secrets
import uuid
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
    false,
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


# ---------------------------------------------------------------- Mender's deployments API
# Mender's ids are UUIDs (36 characters); its "deployments" are called rollouts here, so
# they are not confused with Losant's deployment records (one flow on one device) that
# a rollout writes through the desired writer.


def new_uuid() -> str:
    return str(uuid.uuid4())


class Artifact(Base):
    """A Mender artifact in the repository: the ``.mender`` file as uploaded (its bytes
    in the artifact store, ``mender_sha256``) and the payload it carries, which is an
    artifact item of the flow version ``flow_id``/``version`` (one repository, two
    views: Losant's flow versions and Mender's artifacts). A flow version uploaded
    through Losant's API gets a row too (``source`` "flow-version"; it has no ``.mender``
    file)."""

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    application_id: Mapped[str] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), index=True
    )
    #: The artifact name (Mender's release name).
    name: Mapped[str] = mapped_column(String(256))
    description: Mapped[str] = mapped_column(Text, default="")
    device_types: Mapped[list[Any]] = mapped_column(JSON)
    signed: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Bytes of the file a device would download (the ``.mender`` file, or the payload).
    size: Mapped[int] = mapped_column(BigInteger)
    #: ``{"format": "mender", "version": 3}``
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Mender's ``updates``: ``[{"type_info": {"type"}, "files": [...], "meta_data"}]``.
    updates: Mapped[list[Any]] = mapped_column(JSON, default=list)
    provides: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    flow_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(128))
    #: The payload (wasm module, EEA bundle or workflow bundle) the devices get.
    payload_sha256: Mapped[str] = mapped_column(String(64))
    #: The ``.mender`` file as uploaded (None for a flow version uploaded directly).
    mender_sha256: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16), default="mender")
    created: Mapped[datetime] = mapped_column(default=utcnow)
    modified: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_artifacts_app_name", "application_id", "name"),)


class Rollout(Base):
    """A Mender deployment: an artifact name to a set of devices, in phases.

    ``status`` is Mender's (scheduled, pending, inprogress, finished); ``aborted`` and
    ``stopped`` (this project's failure threshold) say how a finished one ended.
    """

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    application_id: Mapped[str] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(256))
    artifact_name: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    aborted: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Why the engine stopped it (the failure threshold), or None.
    stopped: Mapped[str | None] = mapped_column(Text)
    #: Aborted or stopped (``finished``), and the abort entries of the devices that
    #: were in progress not all written yet: the engine finishes writing them.
    halting: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    dynamic: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The inventory filter (``{"id", "name", "terms": [...]}``) of a filter deployment.
    filter: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    max_devices: Mapped[int | None] = mapped_column(Integer)
    initial_device_count: Mapped[int | None] = mapped_column(Integer)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    #: This project's extensions: ``failure_threshold`` (percent of the devices that
    #: finished), ``revert``, ``health_window`` (seconds).
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    finished: Mapped[datetime | None]

    __table_args__ = (Index("ix_rollouts_app_status", "application_id", "status"),)


class RolloutPhase(Base):
    __tablename__ = "rollout_phases"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    #: Percent of the devices not yet assigned (None: the rest; the last phase).
    batch_size: Mapped[int | None] = mapped_column(Integer)
    start_ts: Mapped[datetime | None]
    #: When the engine started it (None: not yet).
    started: Mapped[datetime | None]

    __table_args__ = (UniqueConstraint("rollout_id", "number"),)


class RolloutDevice(Base):
    """One device of a rollout: its phase, the artifact chosen for its type, and its
    Mender status, kept in step with the device's reports by the engine."""

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    application_id: Mapped[str] = mapped_column(String(24))
    phase: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(32), default="pending")
    substate: Mapped[str | None] = mapped_column(Text)
    device_type: Mapped[str | None] = mapped_column(String(64))
    artifact_id: Mapped[str | None] = mapped_column(String(36))
    flow_id: Mapped[str | None] = mapped_column(String(128))
    #: The Losant deployment attempt written for it (the ``deploymentId`` the device
    #: reports back), once its phase started.
    attempt_id: Mapped[str | None] = mapped_column(String(24), index=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    started: Mapped[datetime | None]
    finished: Mapped[datetime | None]

    __table_args__ = (Index("ix_rollout_devices_app_device", "application_id", "device_id"),)


class RolloutEvent(Base):
    """Every transition of a rollout (created, phase started, device status, stopped,
    aborted, finished), in order."""

    __tablename__ = "rollout_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    time: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    device_id: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class DeploymentLog(Base):
    """A device's deployment log (the agent's retained ``deployments/{id}/log``)."""

    __tablename__ = "deployment_logs"

    application_id: Mapped[str] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: The ``deploymentId`` of the entry (an attempt id for the server's own).
    deployment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    flow_id: Mapped[str | None] = mapped_column(String(128))
    messages: Mapped[list[Any]] = mapped_column(JSON)
    time: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    """A person who logs in (Mender's ``useradm``): the password as scrypt."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    application_id: Mapped[str] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created: Mapped[datetime] = mapped_column(default=utcnow)


class ServerSecret(Base):
    """Secrets every server process shares (the key that signs login tokens)."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


# ---------------------------------------------------------------- the web console


class ConsoleSession(Base):
    """A signed-in browser: the cookie holds a random secret of which only the
    SHA-256 is kept (like API tokens), so a leaked database does not sign anyone in.
    ``user_id`` or ``token_id`` says who signed in (a user, or with an API token);
    ``csrf`` is the token every form of the session carries. Indexed by ``expires``
    (the periodic purge of ended sessions) and by who signed in (each sign-in caps
    that identity's sessions)."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the secret
    application_id: Mapped[str] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[str | None] = mapped_column(String(36), index=True)
    token_id: Mapped[str | None] = mapped_column(String(24), index=True)
    #: Who it is, as the pages show it (an email, or the token's name).
    who: Mapped[str] = mapped_column(String(255), default="")
    csrf: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    expires: Mapped[datetime] = mapped_column(index=True)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)


class DeviceEvent(Base):
    """A device's event (``{prefix}/{id}/events``: a flow's status transition), kept
    for the console's timeline (the newest few hundred per device)."""

    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    application_id: Mapped[str] = mapped_column(ForeignKey("applications.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(128))
    time: Mapped[datetime] = mapped_column(default=utcnow)
    flow_id: Mapped[str | None] = mapped_column(String(128))
    deployment_id: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (Index("ix_device_events_app_device", "application_id", "device_id", "id"),)


class CommandRecord(Base):
    """A command the server sent to a device (console or API) and the device's
    response, matched by ``id`` (the command's id, echoed by the agent)."""

    __tablename__ = "commands"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    application_id: Mapped[str] = mapped_column(ForeignKey("applications.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(255))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    sent: Mapped[datetime] = mapped_column(default=utcnow)
    #: The device's answer (``{"ok", "result" | "error", …}``), once it came.
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    answered: Mapped[datetime | None]

    __table_args__ = (Index("ix_commands_app_device", "application_id", "device_id", "sent"),)

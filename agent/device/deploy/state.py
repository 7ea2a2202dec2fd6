"""Persisted agent state: what is desired, what is installed, what is in flight.

``state.json`` under the state dir is rewritten whole with write-temp + fsync +
rename (see :mod:`agent.device._fsutil`), so a crash at any moment leaves the previous or
the next version, never a torn one. It carries a schema version; an unreadable or
unknown-schema file is moved aside (``state.json.corrupt-<time>``) with an error in
the log, and the agent starts from an empty state rather than guessing.

The record of each flow is written *before* the work that could be interrupted
(Mender's rule), and :meth:`agent.device.deploy.records.FlowRecords.recover` maps every
saved in-flight step to a safe resume point after a restart:

============  =======================================================
in flight     on restart
============  =======================================================
download      resume: the same attempt goes on (the partial file is kept)
install       the attempt counts as failed ("interrupted during install");
              it is retried if its retry budget allows
(none)        nothing: installed flows start from the local store
============  =======================================================
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError

from agent.device._fsutil import atomic_write, remove_stale_temps
from agent.errors import StateError
from agent.wire.manifest import Manifest
from agent.wire.protocol import (
    ArtifactRef,
    FlowSpec,
    RejectedDesired,
    Status,
    utc_now_iso,
)

log = structlog.get_logger("agent.device.deploy.state")

SCHEMA_VERSION = 1
STATE_FILE = "state.json"

InFlight = Literal["download", "install", "revert"]


class Installed(BaseModel):
    """A version that passed install and is (or was) the active one."""

    model_config = ConfigDict(extra="ignore")

    version: str
    sha256: str
    kind: str = "wasm"
    config: dict[str, Any] = Field(default_factory=dict)
    #: Triggers and permissions (canonical JSON of :class:`agent.wire.manifest.Manifest`).
    manifest: str = Field(default_factory=lambda: Manifest().canonical())
    deployment_id: str | None = None
    installed_at: str = Field(default_factory=utc_now_iso)


class FlowRecord(BaseModel):
    """Everything the agent knows about one flow."""

    model_config = ConfigDict(extra="ignore")

    installed: Installed | None = None
    previous: Installed | None = None
    desired_version: str | None = None
    deployment_id: str | None = None
    status: Status = Status.PENDING
    error: str | None = None
    attempts: int = 0
    #: Identity of the target the status refers to (see :func:`target_key`).
    target: str | None = None
    #: The flow trapped too often; it stays stopped until a new deployment or restart.
    broken: bool = False
    #: Generation of the desired document the status refers to.
    generation: int | None = None
    inflight: InFlight | None = None
    next_retry_at: float | None = None
    #: This target failed in a way retrying cannot fix (it was reverted, or failed its
    #: health window): no retry until a new target (e.g. a new ``deploymentId``).
    no_retry: bool = False
    #: The installed version is on probation until then (epoch seconds): a failure
    #: before it puts ``previous`` back when ``revert_on_failure``.
    probation_until: float | None = None
    revert_on_failure: bool = True
    #: The last attempt's version was rolled back; ``installed`` is the one before.
    reverted: bool = False
    #: The install of ``target`` waits (a flow's defer, the maintenance window): since
    #: when, and until when at the latest.
    deferred_since: float | None = None
    deferred_until: float | None = None
    last_updated: str = Field(default_factory=utc_now_iso)


class PersistedState(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    #: The raw bytes (as text) of the last accepted desired document.
    desired_raw: str | None = None
    generation: int | None = None
    flows: dict[str, FlowRecord] = Field(default_factory=dict)
    rejected: RejectedDesired | None = None


def target_key(spec: FlowSpec, artifact: ArtifactRef | None) -> str:
    """What makes two desired entries the same deployment target (``artifact`` is
    the one this device picks from the entry)."""
    if spec.is_removal or artifact is None:
        return "remove"
    cfg = json.dumps(spec.config, sort_keys=True, separators=(",", ":"))
    return (
        f"{spec.version}@{artifact.sha256}:{artifact.kind}#{spec.deployment_id}"
        f"|{cfg}|{spec.manifest().canonical()}"
    )


def installed_matches(
    installed: Installed | None, spec: FlowSpec, artifact: ArtifactRef | None
) -> bool:
    """Whether the running version is what ``spec`` asks for (version, bytes, config)."""
    if installed is None or artifact is None:
        return False
    return (
        installed.version == spec.version
        and installed.sha256 == artifact.sha256
        and installed.kind == artifact.kind.value
        and installed.config == spec.config
        and installed.manifest == spec.manifest().canonical()
    )


def serialise(state: PersistedState) -> bytes:
    """The state file's bytes; :class:`StateError` if the state cannot be written out.

    What the protocol layer accepts always serialises (see :mod:`agent.wire._boundedjson`);
    this is the last line, so that a state that cannot be written is an error the
    caller reports, never an exception that takes the agent down. The file on disk
    keeps the last good state.
    """
    try:
        return state.model_dump_json(indent=1).encode()
    except (PydanticSerializationError, ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StateError(f"cannot serialise the state: {first[:200]}") from None


class StateStore:
    """Reads and atomically writes ``state.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / STATE_FILE

    def load(self) -> PersistedState:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state dir {self.dir}: {exc.strerror}") from None
        removed = remove_stale_temps(self.dir, STATE_FILE)
        if removed:
            log.info("removed temp files left by an interrupted write", count=removed)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return PersistedState()
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            version = data.get("schema_version")
            if version != SCHEMA_VERSION:
                raise TypeError(f"unknown schema_version {version!r}")
            return PersistedState.model_validate(data)
        except (ValueError, TypeError, RecursionError, ValidationError) as exc:
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
            self.path.replace(aside)
            log.error(
                "state file unreadable; moved aside, starting empty",
                path=str(self.path),
                moved_to=str(aside),
                error=str(exc).splitlines()[0],
            )
            return PersistedState()

    def save(self, state: PersistedState) -> None:
        """Blocking: write the whole state atomically."""
        self.save_bytes(serialise(state))

    def save_bytes(self, data: bytes) -> None:
        """Blocking: atomically replace the state file with an already serialised state."""
        try:
            atomic_write(self.path, data)
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror}") from None

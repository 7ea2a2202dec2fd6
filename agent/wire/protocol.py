"""Wire protocol v1: the messages on the MQTT topics, as pydantic models.

Topics (``{prefix}`` defaults to ``edge``; see :mod:`agent.wire.topics`):

- ``{prefix}/{deviceId}/desired`` (retained, operator → agent): :class:`DesiredState`
- ``{prefix}/{deviceId}/state``   (retained, agent → operator): :class:`StateReport`
- ``{prefix}/{deviceId}/events``  (QoS 1, agent → operator):    :class:`Event`
- ``{prefix}/{deviceId}/status``  (retained, agent; also the last will): :class:`DeviceStatus`
- ``{prefix}/{deviceId}/deployments/{id}/log`` (retained, agent): :class:`DeploymentLog`

Parsing a desired document is two-level on purpose: structural problems (not JSON,
no integer ``generation``, a flow id that is not an id) reject the whole document,
while a problem inside one flow's entry (bad sha256, unknown kind, missing artifact)
only fails that flow. See :func:`parse_desired`.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StringConstraints,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from agent.errors import ProtocolError
from agent.wire._boundedjson import load as load_json
from agent.wire.manifest import Manifest, Permissions, Trigger
from agent.wire.redact import redact_value

PROTOCOL_VERSION = 1
#: Device and flow ids: 1-64 of ``[A-Za-z0-9._-]``, and not dots alone, so that an id
#: can never be a path component with a special meaning (``.``, ``..``).
ID_PATTERN = r"^(?!\.+$)[A-Za-z0-9._-]{1,64}$"
_ID_RE = re.compile(ID_PATTERN)
#: :data:`ID_PATTERN` in words, for error messages.
ID_RULE = "1-64 of A-Z a-z 0-9 . _ -, not dots alone"

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
#: Deployment ids become a topic level (deployments/<id>/log): no MQTT wildcards or "/"
#: (and, like flow ids, not dots alone).
DEPLOYMENT_ID_PATTERN = r"^(?!\.+$)[A-Za-z0-9._:-]{1,128}$"
#: Generations are non-negative 63-bit integers (what a signed 64-bit column holds).
MAX_GENERATION = 2**63 - 1
#: Nesting of a desired document (the document, ``flows``, an entry, and 29 levels
#: inside an entry's ``config``) and of a command (its payload included).
DESIRED_MAX_DEPTH = 32
DeploymentId = Annotated[str, StringConstraints(pattern=DEPLOYMENT_ID_PATTERN)]
Sha256Hex = Annotated[
    str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$", to_lower=True, strip_whitespace=True)
]


def is_valid_id(value: str) -> bool:
    """Whether ``value`` is a valid device or flow id (``[A-Za-z0-9._-]{1,64}``, not
    dots alone)."""
    return bool(_ID_RE.fullmatch(value))


def utc_now_iso() -> str:
    """The current time as ISO-8601 UTC with millisecond precision and a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Status(StrEnum):
    """Per-flow deployment status, in the vocabulary of Mender deployments."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    SUCCESS = "success"
    FAILURE = "failure"
    ALREADY_INSTALLED = "already-installed"
    NOARTIFACT = "noartifact"
    ABORTED = "aborted"
    REMOVED = "removed"


#: Statuses after which nothing more happens until the desired state changes.
TERMINAL_STATUSES = frozenset(
    {Status.SUCCESS, Status.ALREADY_INSTALLED, Status.NOARTIFACT, Status.REMOVED}
)


class ArtifactKind(StrEnum):
    """What the artifact's bytes are. ``wasm``: a WASI preview 1 core module (an EEA
    bundle is detected by its imports too); ``eea``: a Losant EEA bundle; ``bundle``: a
    workflow bundle (.tar.gz with a manifest and modules, see :mod:`agent.wire.bundle`)."""

    WASM = "wasm"
    EEA = "eea"
    BUNDLE = "bundle"


# The id patterns use a look-ahead (not dots alone), which needs Python's re engine.
#: Nothing a URL may hold unescaped: white space, C0 and C1 controls, DEL.
_URL_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")

_STRICT = ConfigDict(extra="forbid", populate_by_name=True, regex_engine="python-re")
_LENIENT = ConfigDict(extra="ignore", populate_by_name=True)


class ArtifactSignature(BaseModel):
    """An ed25519 signature over the artifact's SHA-256 digest (see :mod:`agent.wire.signing`)."""

    model_config = _STRICT

    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] = Field(alias="keyId")
    sig: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")]


class ArtifactRef(BaseModel):
    """Where a flow version's bytes are and how to check them."""

    model_config = _STRICT

    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    sha256: Sha256Hex
    size: Annotated[int, Field(gt=0)] | None = None
    kind: ArtifactKind = ArtifactKind.WASM
    signature: ArtifactSignature | None = None

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("http://", "https://", "file://", "mqtt:")):
            raise ValueError(
                "unsupported URL scheme (expected http://, https://, file:// or mqtt:<topic>)"
            )
        if url.startswith("mqtt:") and len(url) == len("mqtt:"):
            raise ValueError("mqtt: URL needs a topic, e.g. mqtt:edge/artifacts/<sha256>")
        if _URL_FORBIDDEN.search(url):
            raise ValueError("URL holds white space or a control character")
        if url.startswith("mqtt:") and ("+" in url or "#" in url):
            raise ValueError("mqtt: URL needs a plain topic (no + or # wildcards)")
        return url


DeviceType = Annotated[str, StringConstraints(min_length=1, max_length=64)]

#: The longest health window a flow entry may ask for (one day).
MAX_HEALTH_WINDOW_S = 86_400.0
#: Per-device-type artifacts one entry may list.
MAX_TYPED_ARTIFACTS = 32


class TypedArtifact(ArtifactRef):
    """One entry of ``artifacts``: an artifact for the device types it names."""

    device_types: list[DeviceType] = Field(alias="deviceTypes", min_length=1, max_length=64)


class HealthSpec(BaseModel):
    """``health``: how long a new version is on probation after it starts, and whether
    a failure in that time puts the previous version back. A field left out takes the
    agent's default (``[health]`` in its configuration)."""

    model_config = _STRICT

    window: Annotated[float, Field(ge=0, le=MAX_HEALTH_WINDOW_S, allow_inf_nan=False)] | None = None
    revert: StrictBool | None = None


class FlowSpec(BaseModel):
    """One flow's entry in a desired document."""

    model_config = _STRICT

    version: Annotated[str, StringConstraints(max_length=128)] | None = None
    artifact: ArtifactRef | None = None
    #: Per-device-type artifacts: the first whose ``deviceTypes`` holds the device's
    #: type is used; ``artifact`` (if any) serves every other type.
    artifacts: list[TypedArtifact] | None = Field(default=None, max_length=MAX_TYPED_ARTIFACTS)
    device_types: list[DeviceType] | None = Field(default=None, alias="deviceTypes")
    config: dict[str, Any] = Field(default_factory=dict)
    triggers: list[Trigger] = Field(default_factory=list, max_length=64)
    permissions: Permissions = Field(default_factory=Permissions)
    retries: Annotated[int, Field(ge=0, le=100)] = 2
    deployment_id: DeploymentId | None = Field(default=None, alias="deploymentId")
    health: HealthSpec | None = None
    #: Stop this deployment (``deploymentId``) on the device: an attempt that has not
    #: activated ends ``aborted``; with ``revert``, an activated one is rolled back.
    abort: StrictBool = False
    revert: StrictBool = False

    def manifest(self) -> Manifest:
        return Manifest(triggers=tuple(self.triggers), permissions=self.permissions)

    @property
    def is_removal(self) -> bool:
        """A null or empty version means: remove the flow (like a blank Losant release)."""
        return not self.version

    def artifact_for(self, device_type: str) -> ArtifactRef | None:
        """The artifact a device of ``device_type`` installs (None: none fits it)."""
        for typed in self.artifacts or ():
            if device_type in typed.device_types:
                return typed
        return self.artifact

    def all_artifacts(self) -> list[ArtifactRef]:
        """Every artifact the entry names, for every device type."""
        return [*(self.artifacts or ()), *([self.artifact] if self.artifact else [])]

    @model_validator(mode="after")
    def _artifact_when_versioned(self) -> FlowSpec:
        if not self.is_removal and self.artifact is None and not self.artifacts:
            raise ValueError("a flow with a version needs an artifact (or artifacts)")
        if self.abort and self.deployment_id is None:
            raise ValueError("abort names the deployment it stops: deploymentId is required")
        if self.revert and not self.abort:
            raise ValueError("revert goes with abort (a failing version reverts by health)")
        return self


class DesiredState(BaseModel):
    """The whole desired state of a device, as accepted by :func:`parse_desired`.

    ``flows`` holds the valid entries; ``invalid`` maps the id of each entry that
    failed validation to the reason (those flows get status ``failure``).
    """

    model_config = _STRICT

    generation: Annotated[int, Field(ge=0, le=MAX_GENERATION)]
    flows: dict[Identifier, FlowSpec] = Field(default_factory=dict)
    invalid: dict[str, str] = Field(default_factory=dict, exclude=True)


class DesiredEnvelope(BaseModel):
    """The top level of a desired document (used to parse structure first)."""

    model_config = _LENIENT

    generation: Annotated[int, Field(ge=0, le=MAX_GENERATION, strict=True)]
    flows: dict[str, Any] = Field(default_factory=dict)


def _first_error(exc: ValidationError) -> str:
    """One line naming the field and the problem of the first validation error."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more)" if more else ""
    return f"{loc}: {msg}{suffix}" if loc else f"{msg}{suffix}"


def parse_desired(payload: bytes, max_bytes: int = 256 * 1024) -> DesiredState:
    """Parse a desired document.

    Raises :class:`ProtocolError` for a document that must be rejected as a whole.
    A single flow whose entry is invalid is kept out of ``flows`` and listed in
    ``invalid`` with the reason instead.
    """
    raw = load_json(
        payload, what="desired document", max_bytes=max_bytes, max_depth=DESIRED_MAX_DEPTH
    )
    if not isinstance(raw, dict):
        raise ProtocolError("desired document must be a JSON object")
    try:
        env = DesiredEnvelope.model_validate(raw)
    except ValidationError as exc:
        raise ProtocolError(f"desired document invalid: {_first_error(exc)}") from None
    flows: dict[str, FlowSpec] = {}
    invalid: dict[str, str] = {}
    for flow_id, entry in env.flows.items():
        if not is_valid_id(flow_id):
            raise ProtocolError(
                f"desired document invalid: flow id {flow_id[:80]!r} is not an id ({ID_RULE})"
            )
        if entry is None:  # {"flowId": null} is a removal too
            flows[flow_id] = FlowSpec()
            continue
        try:
            flows[flow_id] = FlowSpec.model_validate(entry)
        except ValidationError as exc:
            invalid[flow_id] = f"invalid flow entry: {_first_error(exc)}"
    return DesiredState(generation=env.generation, flows=flows, invalid=invalid)


class BundleInfo(BaseModel):
    """An EEA bundle's identity, read from the bundle (see
    :mod:`agent.device.runtime.eea_identity`)."""

    model_config = _LENIENT

    identifier: str | None = None
    interface_version: str | None = Field(default=None, alias="interfaceVersion")


class RegisteredFunctions(BaseModel):
    """The registered functions (``eea_fn_*``) an EEA bundle imports, and which of them
    no plugin provides (calls to those return an error)."""

    model_config = _LENIENT

    imported: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)


class FlowRuntime(BaseModel):
    """How an installed flow is running (supervision), next to its deployment status.
    ``bundle`` and ``registeredFunctions`` appear for EEA bundles only."""

    model_config = _LENIENT

    health: str
    restarts: int = 0
    last_error: str | None = Field(default=None, alias="lastError")
    bundle: BundleInfo | None = None
    registered_functions: RegisteredFunctions | None = Field(
        default=None, alias="registeredFunctions"
    )

    @model_serializer(mode="wrap")
    def _eea_only(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        # (unannotated on purpose: the JSON Schema keeps the fields above)
        data = handler(self)
        for key in ("bundle", "registeredFunctions", "registered_functions"):
            if data.get(key, 0) is None:
                del data[key]
        return data


class HealthState(StrEnum):
    PROBATION = "probation"
    HEALTHY = "healthy"
    #: It failed within its health window and stays installed (nothing to go back to).
    FAILED = "failed"


class FlowHealth(BaseModel):
    """Where the installed version stands after its install: on probation until
    ``until`` (a failure then reverts it), healthy, or failed (within its window,
    with nothing to go back to)."""

    model_config = _LENIENT

    state: HealthState
    until: str | None = None


class FlowState(BaseModel):
    """One flow in the state report."""

    model_config = _LENIENT

    desired_version: str | None = Field(default=None, alias="desiredVersion")
    current_version: str | None = Field(default=None, alias="currentVersion")
    status: Status
    error: str | None = None
    attempts: int = 0
    #: With status ``failure``: when the next attempt starts; None: no retry is coming
    #: (retries spent, or a failure that retrying cannot fix) until desired changes.
    retry_at: str | None = Field(default=None, alias="retryAt")
    deployment_id: str | None = Field(default=None, alias="deploymentId")
    last_updated: str = Field(alias="lastUpdated")
    #: sha256 of the installed artifact, and the version and sha256 of the one before.
    sha256: str | None = None
    previous_version: str | None = Field(default=None, alias="previousVersion")
    previous_sha256: str | None = Field(default=None, alias="previousSha256")
    #: The deployment's version failed (health or abort) and the previous one runs again.
    reverted: bool = False
    health: FlowHealth | None = None
    #: With status ``pending``: the install waits (a flow's defer, the maintenance
    #: window) until this time at the latest.
    deferred_until: str | None = Field(default=None, alias="deferredUntil")
    runtime: FlowRuntime | None = None


class RejectedDesired(BaseModel):
    """Why the last desired document that was not applied was refused."""

    model_config = _LENIENT

    generation: int | None = None
    reason: str
    time: str


class OutboxState(BaseModel):
    """The offline outbox: messages waiting for the broker, and messages dropped when
    it was full (since the state dir was created)."""

    model_config = _LENIENT

    queued: int
    bytes: int
    dropped: int


class StateReport(BaseModel):
    """The agent's current state, published retained on ``{prefix}/{deviceId}/state``."""

    model_config = _LENIENT

    device_id: str = Field(alias="deviceId")
    generation: int | None = None
    flows: dict[str, FlowState] = Field(default_factory=dict)
    rejected: RejectedDesired | None = None
    outbox: OutboxState | None = None
    time: str
    protocol: int = PROTOCOL_VERSION


class Progress(BaseModel):
    """Download progress carried by a ``downloading`` event."""

    bytes: int
    total: int | None = None


class Event(BaseModel):
    """One status transition of one flow, on ``{prefix}/{deviceId}/events``."""

    model_config = _LENIENT

    flow_id: str = Field(alias="flowId")
    deployment_id: str | None = Field(default=None, alias="deploymentId")
    version: str | None = None
    status: Status
    error: str | None = None
    progress: Progress | None = None
    time: str


class DeviceStatus(BaseModel):
    """Online status, retained on ``{prefix}/{deviceId}/status`` (and the last will)."""

    model_config = _LENIENT

    online: bool
    agent_version: str | None = Field(default=None, alias="agentVersion")
    device_type: str | None = Field(default=None, alias="deviceType")
    runtime: str | None = None
    #: Messages the outbox dropped because it was full.
    dropped: int | None = None
    time: str | None = None


class LogMessage(BaseModel):
    time: str
    level: str
    message: str


class DeploymentLog(BaseModel):
    """The agent's log lines for a failed attempt (Mender's deployment log)."""

    model_config = _LENIENT

    device_id: str = Field(alias="deviceId")
    flow_id: str = Field(alias="flowId")
    deployment_id: str | None = Field(default=None, alias="deploymentId")
    version: str | None = None
    attempts: int
    messages: list[LogMessage]
    time: str


def dump(model: BaseModel, *, exclude_none: bool = False) -> bytes:
    """Serialise a wire model with its wire (camelCase) names, compact, with every URL
    in it redacted (see :mod:`agent.wire.redact`)."""
    data = model.model_dump_json(by_alias=True, exclude_none=exclude_none).encode()
    if b"://" not in data:
        return data
    plain = model.model_dump(mode="json", by_alias=True, exclude_none=exclude_none)
    return json.dumps(redact_value(plain), separators=(",", ":")).encode()


class DesiredDocument(BaseModel):
    """The desired document as published (for its JSON Schema). A null entry, or one
    whose version is null or empty, removes the flow; unknown top-level keys are
    ignored; an invalid entry fails only that flow."""

    model_config = ConfigDict(
        extra="ignore",
        regex_engine="python-re",
        json_schema_extra=lambda schema: schema["properties"]["flows"].update(
            additionalProperties=False  # a flow id off the pattern rejects the document
        ),
    )

    generation: Annotated[int, Field(ge=0, le=MAX_GENERATION)]
    flows: dict[Identifier, FlowSpec | None] = Field(default_factory=dict)


WIRE_MODELS: dict[str, type[BaseModel]] = {
    "desired": DesiredDocument,
    "state": StateReport,
    "event": Event,
    "status": DeviceStatus,
    "deployment-log": DeploymentLog,
}


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every wire message, keyed by message name."""
    return {
        name: model.model_json_schema(
            by_alias=True, mode="validation" if name == "desired" else "serialization"
        )
        for name, model in WIRE_MODELS.items()
    }

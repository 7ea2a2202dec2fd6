"""Configuration: the pydantic model, TOML loading, environment and flag overrides.

Precedence, lowest to highest: built-in defaults < the TOML file < ``EDGE_AGENT_*``
environment variables < command-line flags.

Environment variables name a key path with ``__`` between sections, e.g.
``EDGE_AGENT_MQTT__BROKER=mqtts://broker:8883`` or ``EDGE_AGENT_SANDBOX__MEMORY_LIMIT=33554432``;
top-level keys need no section (``EDGE_AGENT_DEVICE_ID=dev1``). Values that look like
JSON arrays or objects are parsed as JSON; everything else is passed as a string and
converted by the model. ``EDGE_AGENT_CONFIG`` names the config file when ``--config``
is not given.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.device.deploy.windows import MaintenanceWindow, zone_error
from agent.device.runtime.eea_settings import LOSANT_ID_PATTERN, EEADefaults
from agent.errors import ConfigError
from agent.wire.protocol import ID_RULE, is_valid_id

ENV_PREFIX = "EDGE_AGENT_"
DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
_MIB = 1024 * 1024

_Strict = ConfigDict(extra="forbid", validate_default=True)


def _default_device_id() -> str:
    """The host name when it is a valid id, else empty (then ``device_id`` must be set)."""
    name = socket.gethostname().split(".")[0]
    return name if is_valid_id(name) else ""


def _default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY``, else /var/lib/edge-agent for root, else XDG state."""
    if sd := os.environ.get("STATE_DIRECTORY"):
        return Path(sd.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/edge-agent")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "edge-agent"


class MqttConfig(BaseModel):
    """Connection to the MQTT broker."""

    model_config = _Strict

    broker: str = Field(
        "mqtt://127.0.0.1:1883", description="mqtt://host:port, or mqtts://host:port for TLS."
    )
    client_id: str = Field("", description="MQTT client id; empty means edge-agent-<device_id>.")
    username: str | None = Field(None, description="Username, if the broker wants one.")
    password: SecretStr | None = Field(None, description="Password (prefer password_file).")
    password_file: Path | None = Field(
        None, description="File whose first line is the password; wins over password."
    )
    ca_file: Path | None = Field(None, description="CA bundle for mqtts://; default: system CAs.")
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    protocol: Literal["5", "3.1.1"] = Field("5", description='MQTT protocol: "5" or "3.1.1".')
    keepalive: Annotated[int, Field(ge=5, le=3600)] = Field(
        30, description="Keepalive interval in seconds."
    )
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9._/-]{1,64}$")] = Field(
        "edge", description="First topic level(s): {prefix}/{deviceId}/desired, ..."
    )
    session_expiry: Annotated[int, Field(ge=0)] = Field(
        7 * 24 * 3600,
        description="MQTT 5 session expiry (s): the broker keeps subscriptions and queued "
        "QoS 1 messages this long while the device is offline.",
    )
    reconnect_min: Annotated[float, Field(gt=0)] = Field(
        0.5, description="First reconnect delay (s); doubles per failure, with jitter."
    )
    reconnect_max: Annotated[float, Field(gt=0)] = Field(
        60.0, description="Reconnect delay cap (s)."
    )
    connect_timeout: Annotated[float, Field(gt=0)] = Field(
        10.0, description="TCP/TLS connect and CONNACK timeout (s)."
    )
    max_inflight: Annotated[int, Field(ge=1, le=65535)] = Field(
        20, description="QoS 1 messages in flight; keep at or below the broker's receive maximum."
    )
    max_queued: Annotated[int, Field(ge=0)] = Field(
        10000, description="Outgoing messages paho may queue while offline (0 = unlimited)."
    )
    persistent_session: bool = Field(
        True,
        description="Ask the broker to keep the session (MQTT 5 clean start off, "
        "3.1.1 clean session off).",
    )

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"expected mqtt://host:port or mqtts://host:port, got {value!r}")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError(f"invalid port in {value!r}") from None
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.broker).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.broker)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker).scheme == "mqtts"

    def resolved_password(self) -> str | None:
        """The password, read from ``password_file`` when one is configured."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text().splitlines()[0]
            except (OSError, IndexError) as exc:
                raise ConfigError(
                    str(self.password_file), "mqtt.password_file", f"cannot read: {exc}"
                ) from None
        return self.password.get_secret_value() if self.password else None


class ArtifactsConfig(BaseModel):
    """Downloading artifacts."""

    model_config = _Strict

    max_size: Annotated[int, Field(gt=0)] = Field(
        64 * _MIB, description="Largest artifact accepted, in bytes."
    )
    connect_timeout: Annotated[float, Field(gt=0)] = Field(10.0, description="Seconds.")
    read_timeout: Annotated[float, Field(gt=0)] = Field(30.0, description="Seconds per read.")
    stall_timeout: Annotated[float, Field(gt=0)] = Field(
        30.0, description="Abort a download that receives no data for this long (s)."
    )
    retries: Annotated[int, Field(ge=0, le=20)] = Field(
        3, description="Transport retries inside one download attempt (resuming with Range)."
    )
    backoff_initial: Annotated[float, Field(gt=0)] = Field(0.5, description="Seconds.")
    backoff_max: Annotated[float, Field(gt=0)] = Field(10.0, description="Seconds.")
    min_free_space: Annotated[int, Field(ge=0)] = Field(
        16 * _MIB, description="Bytes to leave free on the state disk after a download."
    )
    trusted_keys: list[Path] = Field(
        default_factory=list,
        description="PEM files of the ed25519 public keys whose artifact signatures are "
        "trusted (list the old and the new key while rotating). Empty: signatures are "
        "not checked.",
    )
    require_signature: bool = Field(
        False,
        description="Refuse artifacts without a valid signature by a trusted key "
        "(the flow gets status failure).",
    )

    @model_validator(mode="after")
    def _keys_when_required(self) -> ArtifactsConfig:
        if self.require_signature and not self.trusted_keys:
            raise ValueError("require_signature needs at least one key in trusted_keys")
        return self


class SandboxConfig(BaseModel):
    """Limits of each flow's wasmtime sandbox."""

    model_config = _Strict

    memory_limit: Annotated[int, Field(ge=65536)] = Field(
        64 * _MIB, description="Linear memory cap per flow instance, in bytes."
    )
    call_deadline_ms: Annotated[int, Field(ge=10)] = Field(
        5000, description="Wall-clock deadline of one call into a flow (start-up included)."
    )
    epoch_tick_ms: Annotated[int, Field(ge=1, le=1000)] = Field(
        10, description="Resolution of the deadline clock."
    )
    workers: Annotated[int, Field(ge=1, le=64)] = Field(
        4, description="Threads that run wasm calls off the event loop."
    )
    fuel_per_call: Annotated[int, Field(ge=0)] = Field(
        10_000_000_000,
        description="Deterministic CPU budget of one call (wasmtime fuel; 0 = unlimited).",
    )
    max_sleep_ms: Annotated[int, Field(ge=0)] = Field(
        0, description="Longest single WASI sleep of a flow (ms); 0 = call_deadline_ms."
    )
    max_failures: Annotated[int, Field(ge=1, le=1000)] = Field(
        3, description="Traps within failure_window_s after which a flow is marked broken."
    )
    failure_window_s: Annotated[float, Field(gt=0)] = Field(3600.0, description="Seconds.")
    restart_backoff_initial: Annotated[float, Field(ge=0)] = Field(
        1.0, description="Delay before restarting a trapped flow (s); doubles."
    )
    restart_backoff_max: Annotated[float, Field(gt=0)] = Field(60.0, description="Seconds.")


class ReconcileConfig(BaseModel):
    """Applying desired state."""

    model_config = _Strict

    retry_backoff_initial: Annotated[float, Field(gt=0)] = Field(
        5.0, description="Delay before retrying a failed deployment attempt (s); doubles."
    )
    retry_backoff_max: Annotated[float, Field(gt=0)] = Field(300.0, description="Seconds.")
    desired_max_bytes: Annotated[int, Field(ge=1024)] = Field(
        256 * 1024, description="Largest desired document accepted."
    )
    state_coalesce_ms: Annotated[int, Field(ge=0, le=10000)] = Field(
        50,
        description="Bursts of intermediate status changes within this window give one "
        "state report (verdicts go at once).",
    )
    log_lines: Annotated[int, Field(ge=10, le=100000)] = Field(
        500, description="Log lines kept per deployment attempt for the deployment log."
    )


class HealthConfig(BaseModel):
    """The health window after a new version starts (an entry's ``health`` overrides)."""

    model_config = _Strict

    window_s: Annotated[float, Field(ge=0, le=86_400)] = Field(
        60.0,
        description="A new version is on probation this long after it starts; 0: no window.",
    )
    revert: bool = Field(True, description="A failure on probation puts the previous version back.")


class UpdatesConfig(BaseModel):
    """When installs may happen: a maintenance window, and flows' defer requests."""

    model_config = _Strict

    maintenance_window: str | None = Field(
        None,
        description='Daily "HH:MM-HH:MM" (may wrap midnight) outside which installs wait; '
        "unset: any time. Removals never wait.",
    )
    timezone: str = Field("UTC", description="IANA time zone of maintenance_window.")
    max_defer_s: Annotated[float, Field(ge=0, le=86_400)] = Field(
        3600.0,
        description="The longest flows' defer requests may hold one deployment back (s).",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        zone_error(name)
        return name

    @field_validator("maintenance_window")
    @classmethod
    def _window_parses(cls, text: str | None) -> str | None:
        if text is not None:
            MaintenanceWindow.parse(text)  # (its time zone is checked on its own)
        return text


class OutboxConfig(BaseModel):
    """The offline outbox (QoS 1 messages persisted until the broker acknowledges them)."""

    model_config = _Strict

    max_messages: Annotated[int, Field(ge=10)] = Field(
        50_000, description="Messages kept while offline; beyond it the oldest are dropped."
    )
    max_bytes: Annotated[int, Field(ge=65536)] = Field(
        64 * _MIB, description="Payload bytes kept while offline; beyond it the oldest go."
    )
    drain_rate: Annotated[float, Field(gt=0)] = Field(
        200.0, description="Messages per second sent when draining after a reconnect."
    )


class LosantConfig(BaseModel):
    """The Losant MQTT profile: run as a Losant Embedded Edge Agent device."""

    model_config = _Strict

    enabled: bool = Field(False, description="Use the Losant profile (or --profile losant).")
    broker: str = Field("mqtts://broker.losant.com:8883", description="Losant's MQTT broker.")
    access_key: str | None = Field(None, description="Application access key (username).")
    access_secret: SecretStr | None = Field(None, description="Access secret (password).")
    access_secret_file: Path | None = Field(
        None, description="File whose first line is the access secret; wins over access_secret."
    )
    ca_file: Path | None = Field(None, description="CA bundle for the broker; default: system CAs.")
    trace_level: Annotated[int, Field(ge=0, le=2)] = Field(
        2, description="EEA trace level announced in the hello message and set on bundles."
    )
    device_id: Annotated[str, Field(pattern=LOSANT_ID_PATTERN)] | None = Field(
        None,
        description="The Losant device id (24 hex digits) EEA bundles get from "
        "eea_get_device_id, when device_id is not one; a flow's config.eea.deviceId wins.",
    )
    max_bundle_bytes: Annotated[int, Field(gt=0)] = Field(
        16 * _MIB, description="Largest bundle accepted (after gzip decompression)."
    )
    window_s: Annotated[float, Field(gt=0)] = Field(15.0, description="Rate-limit window (s).")
    per_topic: Annotated[int, Field(ge=1)] = Field(
        30, description="Messages per window per topic (Losant's limit)."
    )
    per_connection: Annotated[int, Field(ge=1)] = Field(
        300, description="Messages per window per connection (Losant's limit)."
    )


class CommandsConfig(BaseModel):
    """Device commands on {prefix}/{deviceId}/command."""

    model_config = _Strict

    max_age_s: Annotated[float, Field(gt=0)] = Field(
        300.0, description="Commands whose time is older than this are refused as stale (s)."
    )
    max_concurrent: Annotated[int, Field(ge=1, le=1000)] = Field(
        32, description="Commands handled at the same time; more wait their turn."
    )


class LogConfig(BaseModel):
    """Logging (to stderr; under systemd, the journal)."""

    model_config = _Strict

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["console", "json"] = Field("console", description="console or json.")


class AgentConfig(BaseModel):
    """The whole agent configuration (``agent.toml``)."""

    model_config = _Strict

    device_id: str = Field(
        default_factory=_default_device_id,
        description="This device's id ([A-Za-z0-9._-]{1,64}); default: the host name.",
    )
    device_type: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        "generic", description="Matched against a flow's deviceTypes."
    )
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Where state, artifacts and caches live. Default: $STATE_DIRECTORY, "
        "/var/lib/edge-agent (root) or ~/.local/state/edge-agent.",
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig)  # type: ignore[arg-type]
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)  # type: ignore[arg-type]
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)  # type: ignore[arg-type]
    reconcile: ReconcileConfig = Field(default_factory=ReconcileConfig)  # type: ignore[arg-type]
    health: HealthConfig = Field(default_factory=HealthConfig)  # type: ignore[arg-type]
    updates: UpdatesConfig = Field(default_factory=UpdatesConfig)  # type: ignore[arg-type]
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)  # type: ignore[arg-type]
    losant: LosantConfig = Field(default_factory=LosantConfig)  # type: ignore[arg-type]
    eea: EEADefaults = Field(default_factory=EEADefaults)  # type: ignore[arg-type]
    commands: CommandsConfig = Field(default_factory=CommandsConfig)  # type: ignore[arg-type]
    log: LogConfig = Field(default_factory=LogConfig)  # type: ignore[arg-type]

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if not value:
            raise ValueError("required (the host name is not a valid id; set device_id)")
        if not is_valid_id(value):
            raise ValueError(f"{value!r} is not an id ({ID_RULE})")
        return value

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-agent-{self.device_id}"

    def effective_mqtt(self) -> MqttConfig:
        """The MQTT settings in force: the Losant profile overrides the [mqtt] section."""
        los = self.losant
        if not los.enabled:
            return self.mqtt
        secret = los.access_secret
        if los.access_secret_file is not None:
            try:
                secret = SecretStr(los.access_secret_file.read_text().splitlines()[0])
            except (OSError, IndexError) as exc:
                raise ConfigError(
                    str(los.access_secret_file), "losant.access_secret_file", f"cannot read: {exc}"
                ) from None
        return self.mqtt.model_copy(
            update={
                "broker": los.broker,
                "client_id": self.device_id,
                "username": los.access_key,
                "password": secret,
                "password_file": None,
                "ca_file": los.ca_file,
                "protocol": "3.1.1",
                "persistent_session": False,
            }
        )

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data with secrets masked."""
        data = self.model_dump(mode="json")
        if self.mqtt.password is not None:
            data["mqtt"]["password"] = "********"  # noqa: S105 - a mask, not a password
        if self.losant.access_secret is not None:
            data["losant"]["access_secret"] = "********"  # noqa: S105
        if self.losant.enabled:  # what the Losant profile puts in force instead of [mqtt]
            eff = self.effective_mqtt().model_dump(mode="json")
            if eff.get("password") is not None:
                eff["password"] = "********"  # noqa: S105
            data["effective_mqtt"] = eff
        return data


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        nxt = target.setdefault(part, {})
        if not isinstance(nxt, dict):
            nxt = target[part] = {}
        target = nxt
    target[path[-1]] = value


def _env_value(raw: str) -> Any:
    if raw[:1] in "[{":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``EDGE_AGENT_SECTION__KEY=value`` variables into a nested dict."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if path:
            _set_path(out, path, _env_value(raw))
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_LOC_RE = re.compile(r"^Value error, ")


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the effective configuration (defaults < file < environment < overrides).

    ``path`` None means ``$EDGE_AGENT_CONFIG``, else /etc/edge-agent/agent.toml if it
    exists, else no file. Raises :class:`ConfigError` naming the source, key and problem.
    """
    env = os.environ if environ is None else environ
    explicit = path is not None or bool(env.get(ENV_PREFIX + "CONFIG"))
    if path is None:
        path = Path(env.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH)
    data: dict[str, Any] = {}
    sources: list[tuple[str, dict[str, Any]]] = []
    if path.exists() or explicit:
        try:
            with path.open("rb") as fh:
                file_data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(str(path), "", "file not found") from None
        except OSError as exc:
            raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), "", f"invalid TOML: {exc}") from None
        sources.append((str(path), file_data))
    sources.append(("environment", env_overrides(env)))
    sources.append(("command line", dict(overrides or {})))
    for _, layer in sources:
        data = _merge(data, layer)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = _LOC_RE.sub("", err["msg"])
            if err["type"] == "extra_forbidden":
                msg = "unknown option"
            source = next(
                (name for name, layer in reversed(sources) if _has_path(layer, err["loc"])),
                sources[0][0],
            )
            problems.append(ConfigError(source, key, msg))
        first = problems[0]
        if len(problems) == 1:
            raise first from None
        # Every problem at once (one line each), so a file is fixed in one pass.
        more = "\n".join(f"  {p}" for p in problems[1:])
        raise ConfigError(
            first.source, first.key, f"{first.problem}\n  and {len(problems) - 1} more:\n{more}"
        ) from None


def _has_path(layer: Mapping[str, Any], loc: tuple[int | str, ...]) -> bool:
    node: Any = layer
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True

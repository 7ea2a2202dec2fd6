"""The server's settings: a TOML file (``--config``), then command-line flags.

```toml
db = "postgresql://edge@db.example/edge"   # default: sqlite:///{state_dir}/server.db
listen = "0.0.0.0:8080"
public_url = "https://fleet.example"       # what devices use to download artifacts
state_dir = "/var/lib/edge-agent-server"

[mqtt]                                     # the agent's [mqtt] settings, TLS included
broker = "mqtts://broker.example:8883"
```
"""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.device.config import MqttConfig
from agent.server.errors import ConfigError

DEFAULT_STATE_DIR = Path("/var/lib/edge-agent-server")
#: Bytes of a login key file, at least (256 bits) and at most.
MIN_LOGIN_KEY = 32
MAX_LOGIN_KEY = 4096


def read_login_key(path: Path) -> bytes:
    """The key in a ``login_key_file`` (its bytes, a final newline dropped); a
    ValueError unless it is a regular file that only its owner may read (mode 0600 or
    0400) of 32 to 4096 bytes."""
    try:
        info = path.stat()
        data = path.read_bytes()[: MAX_LOGIN_KEY + 3] if stat.S_ISREG(info.st_mode) else b""
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if info.st_mode & 0o077:
        raise ValueError(
            f"{path}: mode {stat.S_IMODE(info.st_mode):o} lets others read it (chmod 600)"
        )
    key = data.removesuffix(b"\n").removesuffix(b"\r")
    if not MIN_LOGIN_KEY <= len(key) <= MAX_LOGIN_KEY:
        raise ValueError(f"{path}: {MIN_LOGIN_KEY} to {MAX_LOGIN_KEY} bytes are needed")
    return key


#: The shortest grace the artifact sweep may be set to: an upload writes its file
#: before its rows, a release reads a version before it writes the documents, and
#: neither may find its bytes gone (``admin sweep-artifacts --grace --force`` may go
#: lower, by hand, on a quiet server).
MIN_SWEEP_GRACE_S = 600.0
#: The shortest interval between two sweeps (0 turns them off).
MIN_SWEEP_INTERVAL_S = 60.0


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    db: str | None = Field(None, description="Database URL; default SQLite in state_dir.")
    listen: str = Field("127.0.0.1:8080", description="HOST:PORT of the HTTP API.")
    public_url: str | None = Field(
        None, description="Base URL devices download artifacts from; default http://listen."
    )
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Database (SQLite) and artifacts.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig)  # type: ignore[arg-type]
    #: Largest flow version upload (bytes).
    max_upload: Annotated[int, Field(gt=0, le=1 << 32)] = 64 << 20
    #: Server processes sharing one PostgreSQL name themselves apart in logs.
    instance: str = ""
    #: Artifacts of at most this many bytes travel as retained MQTT messages
    #: (``{prefix}/artifacts/{sha256}``) instead of by URL; 0: always by URL. The
    #: broker must allow messages this large, and its ACL should let devices read
    #: their prefix's artifacts only.
    mqtt_artifact_limit: Annotated[int, Field(ge=0, le=16 << 20)] = 0
    #: URL prefixes export results may be POSTed to (``callbackUrl``), each ending
    #: in "/" after the host; none by default.
    callbacks: list[Annotated[str, Field(pattern=r"^https?://[^/\s]+/\S*$")]] = Field(
        default_factory=list, max_length=64
    )
    #: Seconds a device's desired document may wait unpublished before a retry.
    publish_retry_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    #: Bytes the artifacts of one application may take (Mender's storage limit);
    #: 0: no limit.
    storage_limit: Annotated[int, Field(ge=0)] = 0
    #: Seconds between the rollout engine's looks at active rollouts (device reports
    #: wake it sooner).
    rollout_tick_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    #: Seconds a login token (``useradm/auth/login``) is valid.
    login_ttl_s: Annotated[int, Field(gt=0, le=366 * 86400)] = 7 * 86400
    #: Seconds a download link (Mender's ``artifacts/{id}/download``) is valid.
    download_link_s: Annotated[int, Field(gt=0, le=7 * 86400)] = 3600
    #: Seconds between sweeps of artifact bytes nothing references any more (deleted
    #: artifacts and flow versions, interrupted uploads); 0: no sweep in this process
    #: (``edge-agent server admin sweep-artifacts`` still runs one).
    sweep_interval_s: Annotated[float, Field(ge=0, le=7 * 86400)] = 3600.0
    #: Seconds unreferenced bytes are kept before the sweep removes them: the blob
    #: row, the file and the sweep's first sighting must all be this old (an upload
    #: writes its file before its rows, a release reads a version before it writes).
    sweep_grace_s: Annotated[float, Field(ge=MIN_SWEEP_GRACE_S, le=30 * 86400)] = 3600.0
    #: The key login tokens are signed with, in a file (``read_login_key``), instead
    #: of a random one kept in the database (``server_secrets``).
    login_key_file: Path | None = None

    @field_validator("login_key_file")
    @classmethod
    def _login_key(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_login_key(value)
        return value

    @field_validator("sweep_interval_s")
    @classmethod
    def _sweep_interval(cls, value: float) -> float:
        if 0 < value < MIN_SWEEP_INTERVAL_S:
            raise ValueError(f"0 (no sweep) or at least {MIN_SWEEP_INTERVAL_S:g} seconds")
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.state_dir / 'server.db'}"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.listen}").rstrip("/")

    @property
    def artifact_dir(self) -> Path:
        return self.state_dir / "artifacts"


def load_server_config(path: Path | None, overrides: dict[str, Any]) -> ServerConfig:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "broker":
            data.setdefault("mqtt", {})["broker"] = value
        else:
            data[key] = value
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path or 'command line'}: {key}: {err['msg']}") from None

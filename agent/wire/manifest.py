"""What a flow declares: its triggers and its permissions.

Given in a desired entry (``"triggers"``, ``"permissions"``) or in a workflow
bundle's ``manifest.json``. Topics a flow may publish to are relative to the
device's base topic ``{prefix}/{deviceId}/``; the flow's own area
``flows/{flowId}/#`` is always allowed, and ``~/x`` is shorthand for
``flows/{flowId}/x``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from paho.mqtt.client import topic_matches_sub
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

_Strict = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

TriggerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
#: Upper bound on the storage quota a manifest may ask for.
MAX_STORAGE_QUOTA = 16 * 1024 * 1024


def _valid_filter(value: str) -> str:
    if not value or len(value) > 256 or "\0" in value:
        raise ValueError("a topic filter is 1-256 characters without NUL")
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be a whole last level in {value!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level in {value!r}")
    return value


class StartupTrigger(BaseModel):
    model_config = _Strict
    type: Literal["startup"]
    name: TriggerName = "startup"


class IntervalTrigger(BaseModel):
    model_config = _Strict
    type: Literal["interval"]
    name: TriggerName = "interval"
    ms: Annotated[int, Field(ge=10, le=7 * 24 * 3600 * 1000)]


class CommandTrigger(BaseModel):
    model_config = _Strict
    type: Literal["command"]
    command: Annotated[str, StringConstraints(min_length=1, max_length=255)]

    @property
    def name(self) -> str:
        return self.command


class MqttTrigger(BaseModel):
    """Messages on ``topic`` (a filter, absolute) are delivered to the flow."""

    model_config = _Strict
    type: Literal["mqtt"]
    topic: str
    qos: Literal[0, 1] = 1

    @property
    def name(self) -> str:
        return self.topic

    @field_validator("topic")
    @classmethod
    def _filter(cls, value: str) -> str:
        return _valid_filter(value)


Trigger = Annotated[
    StartupTrigger | IntervalTrigger | CommandTrigger | MqttTrigger, Field(discriminator="type")
]


class Permissions(BaseModel):
    """What a flow may do beyond its defaults."""

    model_config = _Strict

    #: Extra publish topic filters, relative to ``{prefix}/{deviceId}/``.
    publish: tuple[str, ...] = ()
    #: Key/value storage quota in bytes (keys + values).
    storage_quota: Annotated[int, Field(ge=0, le=MAX_STORAGE_QUOTA, alias="storageQuota")] = (
        64 * 1024
    )
    #: A private directory, preopened as ``/data`` (off by default).
    data_dir: bool = Field(default=False, alias="dataDir")
    #: Messages per second the flow may publish (burst: twice that).
    publish_rate: Annotated[float, Field(gt=0, le=10_000, alias="publishRate")] = 50.0

    @field_validator("publish")
    @classmethod
    def _relative_filters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for f in value:
            _valid_filter(f)
            if f.startswith(("/", "$")):
                raise ValueError(
                    f"publish filter {f!r} must be relative to {{prefix}}/{{deviceId}}/"
                )
        return value


class TopicPolicy:
    """Resolves and checks the topics one flow publishes to."""

    def __init__(self, device_base: str, flow_id: str, permissions: Permissions) -> None:
        self.device_base = device_base.rstrip("/") + "/"
        self.flow_base = f"{self.device_base}flows/{flow_id}/"
        extra = tuple(self.device_base + f for f in permissions.publish)
        self.allowed = (f"{self.flow_base}#", *extra)
        self._cache: dict[str, str | None] = {}
        #: The agent's own protocol topics: never writable by a flow, whatever is granted.
        self.reserved = tuple(
            self.device_base + t
            for t in (
                "desired",
                "state",
                "events",
                "status",
                "command",
                "command/#",
                "deployments/#",
            )
        )

    def resolve(self, topic: str) -> str | None:
        """The absolute topic, or None if the flow may not publish there (cached: a
        flow publishes to few topics, and this runs on every publish)."""
        if topic in self._cache:
            return self._cache[topic]
        result = self._resolve(topic)
        if len(self._cache) < 1024:
            self._cache[topic] = result
        return result

    def _resolve(self, topic: str) -> str | None:
        if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic) > 512:
            return None
        full = self.flow_base + topic[2:] if topic.startswith("~/") else self.device_base + topic
        if full.endswith("/"):
            return None
        if any(topic_matches_sub(f, full) for f in self.reserved):
            return None
        return full if any(topic_matches_sub(f, full) for f in self.allowed) else None


def check_subscription(topic_filter: str, prefix: str, device_id: str) -> str | None:
    """Why an ``mqtt`` trigger may not subscribe to ``topic_filter``, or None if it may.

    A flow may listen to anything on the broker except the whole broker (``#``,
    ``+/#``, ``$SYS``) and other devices' agent topics under ``{prefix}/``.
    """
    levels = topic_filter.split("/")
    if topic_filter.startswith("$") or levels[0] == "#" or levels[:2] == ["+", "#"]:
        return f"mqtt trigger {topic_filter!r} is too broad"
    plevels = prefix.split("/")
    head = levels[: len(plevels)]
    if all(a in (b, "+") for a, b in zip(head, plevels, strict=False)) and len(head) == len(
        plevels
    ):
        rest = levels[len(plevels) :]
        if not rest or rest[0] in ("#", "+") or rest[0] != device_id:
            return f"mqtt trigger {topic_filter!r} reaches other devices' topics under {prefix}/"
    return None


class Manifest(BaseModel):
    """A flow's triggers and permissions together (what a bundle manifest declares too)."""

    model_config = _Strict

    triggers: tuple[Trigger, ...] = ()
    permissions: Permissions = Field(default_factory=Permissions)

    def canonical(self) -> str:
        """Stable JSON, part of a deployment target's identity."""
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.model_validate_json(text)

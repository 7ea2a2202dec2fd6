"""Devices as the console shows them: online state, type, tags, and per flow the
desired and current versions, status and health (from the device's desired
document, written by the server, and its last state report)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.server.db.models import Device


@dataclass(frozen=True)
class FlowRow:
    flow_id: str
    desired: str
    current: str
    status: str
    health: str
    error: str

    @property
    def summary(self) -> str:
        return f"{self.flow_id} {self.desired or '–'}→{self.current or '–'} ({self.health or '–'})"


@dataclass(frozen=True)
class DeviceRow:
    id: str
    name: str
    online: bool
    device_type: str
    tags: list[tuple[str, str]]
    flows: list[FlowRow]
    last_seen: Any
    agent_version: str


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def flows_of(dev: Device) -> list[FlowRow]:
    desired = _dict(_dict(dev.desired).get("flows"))
    reported = _dict(_dict(dev.state).get("flows"))
    out = []
    for flow_id in sorted(set(desired) | set(reported)):
        want, have = _dict(desired.get(flow_id)), _dict(reported.get(flow_id))
        health = _dict(have.get("health")).get("state") or _dict(have.get("runtime")).get("health")
        out.append(
            FlowRow(
                flow_id=str(flow_id),
                desired=_text(want.get("version")),
                current=_text(have.get("currentVersion")),
                status=_text(have.get("status")),
                health=_text(health),
                error=_text(have.get("error")),
            )
        )
    return out


def tags_of(dev: Device) -> list[tuple[str, str]]:
    return [
        (_text(t.get("key")), _text(t.get("value"))) for t in dev.tags or [] if isinstance(t, dict)
    ]


def row(dev: Device) -> DeviceRow:
    return DeviceRow(
        id=dev.id,
        name=dev.name,
        online=dev.online,
        device_type=dev.device_type or "",
        tags=tags_of(dev),
        flows=flows_of(dev),
        last_seen=dev.last_seen,
        agent_version=dev.agent_version or "",
    )


@dataclass(frozen=True)
class Filter:
    q: str = ""
    online: str = "all"
    device_type: str = ""
    tag: str = ""

    def matches(self, d: DeviceRow) -> bool:
        q = self.q.strip().lower()
        if q and q not in d.id.lower() and q not in d.name.lower():
            return False
        if self.online in ("yes", "no") and d.online != (self.online == "yes"):
            return False
        if self.device_type.strip() and d.device_type != self.device_type.strip():
            return False
        if self.tag.strip():
            key, eq, value = self.tag.strip().partition("=")
            if not any(k == key and (not eq or v == value) for k, v in d.tags):
                return False
        return True

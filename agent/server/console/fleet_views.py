"""Devices as the console shows them: online state, type, tags, and per flow the
desired and current versions, status and health (from the device's desired
document, written by the server, and its last state report); and the fleet page's
search (:func:`search`), which filters in SQL and reads those documents of the
devices it shows only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from agent.server.db import devices as devices_repo
from agent.server.db.devices import FleetQuery, FleetSummary
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
    return _tag_pairs(dev.tags)


def _tag_pairs(tags: Any) -> list[tuple[str, str]]:
    return [(_text(t.get("key")), _text(t.get("value"))) for t in tags or [] if isinstance(t, dict)]


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


def search(s: Session, app_id: str, want: Filter, limit: int) -> tuple[list[DeviceRow], int]:
    """The fleet page: the first ``limit`` devices ``want`` matches (by name, then
    id; decommissioned ones never) and how many it matches in all.

    Exactly :meth:`Filter.matches`, as far as possible in SQL: the online state,
    the type and an ASCII search text are SQL, and so is the count. A tag (a JSON
    list, whose operators SQLite and PostgreSQL do not share) or a non-ASCII search
    text (SQL's case folding is not Python's there) is matched in Python over the
    few columns the filter reads. Either way a device's state and desired documents
    are read only for the rows returned."""
    if limit < 0:
        raise ValueError("search: limit is 0 or more")
    q = want.q.strip().lower()
    query = FleetQuery(
        text=q if q.isascii() else "",
        online={"yes": True, "no": False}.get(want.online),
        device_type=want.device_type.strip() or None,
    )
    if q.isascii() and not want.tag.strip():
        ids = devices_repo.fleet_ids(s, app_id, query, limit)
        total = devices_repo.fleet_count(s, app_id, query)
    else:
        ids, total = [], 0
        for summary in devices_repo.fleet_summaries(s, app_id, query):
            if want.matches(_summary_row(summary)):
                total += 1
                if len(ids) < limit:
                    ids.append(summary.id)
    found = devices_repo.get_many(s, app_id, ids)
    return [row(found[i]) for i in ids if i in found], total


def _summary_row(d: FleetSummary) -> DeviceRow:
    """What :meth:`Filter.matches` reads of a device (it reads no flows)."""
    return DeviceRow(
        id=d.id,
        name=d.name,
        online=d.online,
        device_type=d.device_type or "",
        tags=_tag_pairs(d.tags),
        flows=[],
        last_seen=None,
        agent_version="",
    )

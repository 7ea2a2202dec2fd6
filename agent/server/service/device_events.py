"""The devices' events and command responses, as the inventory records them.

A device chooses every byte of them, so what is stored is checked first: what the
databases cannot store (a NUL, which PostgreSQL refuses in any text, a lone
surrogate, a non-finite number) never reaches them, and every field is bounded.

An event (``{prefix}/{id}/events``, protocol.md § Events) becomes a ``DeviceEvent``
row for the console's timeline: every field bounded, a malformed one (not a JSON
object, no ``flowId`` or ``status`` string, a NUL or a lone surrogate) dropped. A
response (``{prefix}/{id}/command/response``) is matched by its ``id`` with a command
the server sent to that device of that application (``CommandRecord``); a response
for an id the server did not send there is dropped, and the first answer wins. A
response with a valid id whose body cannot be stored is recorded as a failed answer
saying why (the console would otherwise wait for an answer that came). Both are
recorded only for devices the application has and did not decommission.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy.orm import Session

from agent.server.db import commands as commands_repo
from agent.server.db import device_events as events_repo
from agent.server.db import devices as devices_repo
from agent.server.text import text_problem, tree_problem

log = structlog.get_logger("agent.server.inventory")

#: Lengths kept of an event's fields.
EVENT_FIELDS = {"flowId": 128, "deploymentId": 128, "version": 128, "status": 32, "error": 4096}
#: A response's ``result`` kept whole up to this many characters of JSON; a longer
#: one is kept as its first characters (a string).
MAX_RESULT = 16 * 1024
#: Characters kept of a response's ``error`` and ``name``.
MAX_ERROR = 4096
#: A command id as the server makes them (:mod:`agent.server.service.commands`).
MAX_ID = 64
#: A download's progress (bytes) kept: up to a 64-bit integer, as every driver takes.
MAX_BYTES = 2**63 - 1


def event_row(device_id: str, doc: dict[str, Any], now: datetime) -> dict[str, Any] | None:
    """The fields of a ``DeviceEvent`` for an event document, or None if malformed."""
    flow, status = doc.get("flowId"), doc.get("status")
    if not isinstance(flow, str) or not isinstance(status, str) or not flow or not status:
        return None
    if tree_problem(doc) is not None:
        return None
    fields = {k: _text(doc.get(k), n) for k, n in EVENT_FIELDS.items()}
    detail: dict[str, Any] = {}
    progress = doc.get("progress")
    if isinstance(progress, dict):
        detail["progress"] = {
            k: v
            for k in ("bytes", "total")
            if isinstance(v := progress.get(k), int)
            and not isinstance(v, bool)
            and 0 <= v <= MAX_BYTES
        }
    reported = _text(doc.get("time"), 64)
    if reported:
        detail["time"] = reported
    return {
        "device_id": device_id,
        "time": now,
        "flow_id": fields["flowId"],
        "deployment_id": fields["deploymentId"],
        "version": fields["version"],
        "status": fields["status"],
        "error": fields["error"],
        "detail": detail,
    }


def response_doc(doc: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(command id, the response as stored) of a response document, or None if it
    has no id the server could have sent, or is malformed."""
    command_id = doc.get("id")
    if not isinstance(command_id, str) or not 0 < len(command_id) <= MAX_ID:
        return None
    if text_problem(command_id) is not None:
        return None
    problem = tree_problem(doc)
    if problem is not None:
        error = f"the answer could not be stored: {problem}"
        return command_id, {"ok": False, "error": error[:MAX_ERROR]}
    kept: dict[str, Any] = {"ok": doc.get("ok") is True}
    for key, limit in (("name", 255), ("error", MAX_ERROR), ("time", 64)):
        value = _text(doc.get(key), limit)
        if value is not None:
            kept[key] = value
    if "result" in doc:
        text = json.dumps(doc["result"])
        kept["result"] = doc["result"] if len(text) <= MAX_RESULT else text[:MAX_RESULT]
    return command_id, kept


def record(
    s: Session,
    events: dict[str, list[dict[str, Any]]],
    responses: list[tuple[str, str, str, dict[str, Any]]],
    now: datetime,
) -> None:
    """Store ``events`` (by application id) and match ``responses`` (application id,
    device id, command id, response), of the devices the application has and did
    not decommission only (the others are dropped)."""
    named: dict[str, set[str]] = {}
    for app_id, rows in events.items():
        named.setdefault(app_id, set()).update(r["device_id"] for r in rows)
    for app_id, device_id, _, _ in responses:
        named.setdefault(app_id, set()).add(device_id)
    live = {app_id: devices_repo.live_ids(s, app_id, sorted(ids)) for app_id, ids in named.items()}
    for app_id in sorted(events):
        kept = [r for r in events[app_id] if r["device_id"] in live[app_id]]
        if len(kept) < len(events[app_id]):
            log.debug("events of unknown or decommissioned devices dropped", application=app_id)
        events_repo.store(s, app_id, kept)
    for app_id, device_id, command_id, response in responses:
        if device_id not in live[app_id]:
            log.debug("command response of an unknown device dropped", device=device_id)
        elif not commands_repo.answer(s, app_id, device_id, command_id, response, now):
            log.debug("command response for no command of the device dropped", device=device_id)


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None

"""The fleet (devices, filtered) and a device: its flows, timeline, deployment logs,
and commands."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import FormData

from agent.server.db import device_events
from agent.server.db import devices as devices_repo
from agent.server.db import rollouts as rollouts_repo
from agent.server.db.models import CommandRecord
from agent.server.errors import NotFound, Validation
from agent.server.service import commands
from agent.server.service.commands import MAX_NAME
from agent.server.text import text_problem, tree_problem
from agent.wire.protocol import is_valid_id

from . import fleet_views, render
from .fleet_views import Filter, flows_of, tags_of
from .web import Session, checked_form, context, known, page, see_other, text

router = APIRouter(prefix="/console")
#: Devices a fleet page lists at most (the count says how many matched).
MAX_ROWS = 500
#: Events on a device's timeline.
TIMELINE = 100
#: Largest command payload (JSON text).
MAX_PAYLOAD = 64 * 1024
#: A page refreshes its timeline (every 3 s) this many times, about 20 minutes.
TIMELINE_POLLS = 400
#: A sent command's answer is looked for (every second) this many times.
COMMAND_POLLS = 120


@router.get("/", response_class=HTMLResponse)
def fleet(
    request: Request,
    session: Session,
    q: str = Query("", max_length=256),
    online: str = Query("all", pattern="^(all|yes|no)$"),
    device_type: str = Query("", max_length=64),
    tag: str = Query("", max_length=512),
) -> Response:
    for name, value in (("q", q), ("device_type", device_type), ("tag", tag)):
        if (problem := text_problem(value)) is not None:
            raise Validation(f"{name}: {problem}")
    want = Filter(q, online, device_type, tag)
    with context(request).db.transaction() as s:
        rows, matched = fleet_views.search(s, session.app.id, want, MAX_ROWS)
    return page("fleet.html", session, devices=rows, matched=matched, filter=want)


def _device_data(request: Request, session: Session, device_id: str) -> dict[str, Any]:
    app_id = session.app.id
    known(device_id, "Device")
    with context(request).db.transaction() as s:
        dev = devices_repo.get(s, app_id, device_id)
        if dev is None or dev.decommissioned:
            raise NotFound(f"Device {device_id} was not found")
        events = device_events.recent(s, app_id, device_id, TIMELINE)
        logs = rollouts_repo.logs_of_device(s, app_id, device_id)
        return {
            "device": dev,
            "tags": tags_of(dev),
            "flows": flows_of(dev),
            "events": events,
            "logs": [
                (lg.deployment_id, lg.flow_id, lg.time, _log_text(lg.messages)) for lg in logs
            ],
        }


def _log_text(messages: list[Any]) -> str:
    return "\n".join(
        f"{m.get('time', '')} {m.get('level', '')} {m.get('message', '')}"
        for m in messages
        if isinstance(m, dict)
    )


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device(
    request: Request,
    device_id: str,
    session: Session,
    command: str = Query("", max_length=64),
) -> Response:
    data = _device_data(request, session, device_id)
    # (only this device's command: the page polls for it under this device's URL)
    sent = _command(request, session, device_id, command) if command else None
    return page(
        "device.html",
        session,
        command=sent,
        device_id=device_id,
        polls_left=COMMAND_POLLS,
        timeline_polls=TIMELINE_POLLS,
        **data,
    )


def _command(
    request: Request, session: Session, device_id: str, command_id: str
) -> CommandRecord | None:
    if not is_valid_id(command_id):
        return None
    sent = commands.get(context(request), session.app.id, command_id)
    return sent if sent is not None and sent.device_id == device_id else None


@router.get("/devices/{device_id}/timeline", response_class=HTMLResponse)
def timeline(
    request: Request,
    device_id: str,
    session: Session,
    left: int = Query(TIMELINE_POLLS, ge=0, le=TIMELINE_POLLS),
) -> Response:
    known(device_id, "Device")
    with context(request).db.transaction() as s:
        events = device_events.timeline(s, session.app.id, device_id, TIMELINE)
    if events is None:
        return _gone(request, "ol", "timeline", f"Device {device_id} was not found")
    url = f"/console/devices/{quote(device_id, safe='')}/timeline"
    return HTMLResponse(
        render.fragment("_timeline.html", events=events, refresh_url=url, polls_left=left)
    )


@router.get("/devices/{device_id}/commands/{command_id}", response_class=HTMLResponse)
def command_fragment(
    request: Request,
    device_id: str,
    command_id: str,
    session: Session,
    left: int = Query(COMMAND_POLLS, ge=0, le=COMMAND_POLLS),
) -> Response:
    sent = _command(request, session, known(device_id, "Device"), command_id)
    if sent is None:
        return _gone(request, "div", "command-response", "Command was not found")
    fragment = render.fragment("_command.html", command=sent, device_id=device_id, polls_left=left)
    return HTMLResponse(fragment)


def _gone(request: Request, element: str, element_id: str, message: str) -> Response:
    """A poll's subject is gone (a device decommissioned, a command pruned): htmx's
    poll gets its element back without ``hx-get``, which ends the polling (htmx does
    not swap a 404, and would poll it for ever); anything else gets the 404."""
    if request.headers.get("hx-request") != "true":
        raise NotFound(message)
    fragment = render.fragment(
        "_gone.html", element=element, element_id=element_id, message=message
    )
    return HTMLResponse(fragment)


def _command_fields(form: FormData) -> tuple[str, Any]:
    """The form's command name and payload, checked as the API checks its body."""
    name = text(form, "name", MAX_NAME + 1).strip()
    raw = text(form, "payload", MAX_PAYLOAD + 1).strip()
    if not name:
        raise Validation("name: the command's name is required")
    if len(name) > MAX_NAME:
        raise Validation(f"name: at most {MAX_NAME} characters")
    if (problem := text_problem(name)) is not None:
        raise Validation(f"name: {problem}")
    if len(raw) > MAX_PAYLOAD:
        raise Validation(f"payload: over {MAX_PAYLOAD // 1024} KiB")
    try:
        payload = json.loads(raw) if raw else None
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:100]
        raise Validation(f"payload: not JSON ({reason})") from None
    if (problem := tree_problem(payload)) is not None:
        raise Validation(f"payload: {problem}")
    return name, payload


@router.post("/devices/{device_id}/command")
async def send_command(request: Request, device_id: str, session: Session) -> Response:
    known(device_id, "Device")
    form = await checked_form(request, session)
    name, payload = _command_fields(form)
    ctx = context(request)
    # (commands.send: 404 for a device the application does not have)
    record = await anyio.to_thread.run_sync(
        lambda: commands.send(ctx, session.app, device_id, name, payload)
    )
    return see_other(f"/console/devices/{quote(device_id, safe='')}?command={quote(record.id)}")

"""Deployments (Mender's, run by the server as rollouts): the list, a deployment's
progress (live, through server-sent events), its devices' logs, and the abort."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from agent.server.db import rollouts as repo
from agent.server.db.rollouts import RolloutQuery
from agent.server.errors import NotFound, Unauthorized
from agent.server.service import rollout_views as views
from agent.server.service import rollouts as service
from agent.server.service.phases import STATUSES

from . import render, sessions, streams
from .sessions import SignedIn
from .web import Session, checked_form, context, known, page, see_other

router = APIRouter(prefix="/console")
#: Deployments the list shows (newest first).
MAX_LIST = 200
#: Devices a deployment's page lists at most.
MAX_DEVICES = 1000
#: Seconds between two looks at a deployment for its stream.
STREAM_EVERY_S = 1.0
#: A stream ends after this long (the browser's EventSource opens another).
STREAM_MAX_S = 600.0
#: The live parts of the page, each a fragment template.
LIVE = ("status", "statistics", "phases", "deployment-devices")


@router.get("/deployments", response_class=HTMLResponse)
def deployments(request: Request, session: Session) -> Response:
    with context(request).db.transaction() as s:
        rows, total = repo.search(s, session.app.id, RolloutQuery(), offset=0, limit=MAX_LIST)
        ids = [r.id for r in rows]
        counts = repo.status_counts(s, ids)
        items = [(r, sum(counts.get(r.id, {}).values())) for r in rows]
    return page("deployments.html", session, deployments=items, total=total)


def _detail(request: Request, session: SignedIn, rollout_id: str) -> dict[str, Any]:
    """Everything the live parts of a deployment's page show."""
    if not repo.is_uuid(rollout_id):
        raise NotFound("Deployment was not found")
    with context(request).db.transaction() as s:
        r = service.get(s, session.app.id, rollout_id)
        counts = repo.status_counts(s, [r.id])[r.id]
        doc = views.deployment(s, r, repo.phases(s, r.id), counts)
        rows = repo.devices(s, r.id, limit=MAX_DEVICES)
        devices = views.devices(s, session.app.id, rows)
        phase_of = {d.device_id: d.phase for d in rows}
    return {
        "rollout": r,
        "doc": doc,
        "stats": views.statistics(counts),
        "statuses": STATUSES,
        "phases": doc["edge"]["phases"],
        "devices": [{**d, "phase": phase_of.get(d["id"])} for d in devices],
        "finished": r.status == "finished",
        "session": session,
    }


@router.get("/deployments/{rollout_id}", response_class=HTMLResponse)
def deployment(request: Request, rollout_id: str, session: Session) -> Response:
    return page("deployment.html", **_detail(request, session, rollout_id))


def _fragments(data: dict[str, Any]) -> dict[str, str]:
    return {name: render.fragment(f"_{name}.html", **data) for name in LIVE}


#: This process's open streams.
slots = streams.Slots()


def _look(request: Request, session: SignedIn, rollout_id: str) -> dict[str, Any] | None:
    """A stream's look: the page's live data, or None once the session has ended
    (signed out, token revoked, user deleted, expired): the stream stops then."""
    try:
        now = sessions.resolve(context(request), request)
    except Unauthorized:
        return None
    return _detail(request, now, rollout_id)


def _ended() -> str:
    """What a stream says once its session has ended: the status part tells the
    person to sign in again, and ``done`` closes the page's stream (the browser would
    otherwise open it again and again, for ever)."""
    return streams.event("status", render.fragment("_session_ended.html")) + streams.event(
        "done", "session ended"
    )


@router.get("/deployments/{rollout_id}/stream")
async def stream(request: Request, rollout_id: str) -> Response:
    """``text/event-stream``: an event per live part of the page when it changed
    (looked at every second), ``done`` when the deployment finished; it ends when
    the browser goes, the session ends, or after :data:`STREAM_MAX_S` (the browser
    then opens another). Without a session (it ended before a reconnection) the
    answer is :func:`_ended`: no data, and no redirect an ``EventSource`` cannot
    follow."""
    try:
        session = await anyio.to_thread.run_sync(sessions.resolve, context(request), request)
    except Unauthorized:
        return Response(_ended(), media_type="text/event-stream")
    await anyio.to_thread.run_sync(_detail, request, session, rollout_id)  # (404 first)
    slots.take(session.digest, session.app.id)
    deadline = anyio.current_time() + STREAM_MAX_S

    async def events() -> AsyncIterator[str]:
        sent: dict[str, str] = {}
        while anyio.current_time() < deadline and not await request.is_disconnected():
            data = await anyio.to_thread.run_sync(_look, request, session, rollout_id)
            if data is None:
                yield _ended()
                return
            for name, html in _fragments(data).items():
                if sent.get(name) != html:
                    sent[name] = html
                    yield streams.event(name, html)
            if data["finished"]:
                yield streams.event("done", "finished")
                return
            yield ": keep-alive\n\n"
            await anyio.sleep(STREAM_EVERY_S)

    return streams.SlotResponse(events(), slots, session.digest, session.app.id)


@router.get("/deployments/{rollout_id}/devices/{device_id}/log", response_class=HTMLResponse)
def device_log(request: Request, rollout_id: str, device_id: str, session: Session) -> Response:
    if not repo.is_uuid(rollout_id):
        raise NotFound("Deployment was not found")
    known(device_id, "Device")
    with context(request).db.transaction() as s:
        r = service.get(s, session.app.id, rollout_id)
        text = views.log_text(s, session.app.id, r.id, device_id)
        name = r.name
    return page(
        "device_log.html", session, rollout_id=rollout_id, title=name, device_id=device_id, log=text
    )


@router.post("/deployments/{rollout_id}/abort")
async def abort(request: Request, rollout_id: str, session: Session) -> Response:
    await checked_form(request, session)
    if not repo.is_uuid(rollout_id):
        raise NotFound("Deployment was not found")
    await anyio.to_thread.run_sync(service.abort, context(request), session.app, rollout_id)
    return see_other(f"/console/deployments/{rollout_id}")

"""Artifacts and flow versions: the list, uploads (a ``.mender`` file, or a flow
version's module), and deletes."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import UploadFile

from agent.server.db import artifacts as repo
from agent.server.errors import Validation
from agent.server.service import artifacts as service
from agent.server.service import flow_versions

from .web import Session, checked_form, context, known, page, see_other, text

router = APIRouter(prefix="/console")


@router.get("/artifacts", response_class=HTMLResponse)
def artifacts(request: Request, session: Session) -> Response:
    with context(request).db.transaction() as s:
        rows = repo.all_of(s, session.app.id)
    return page("artifacts.html", session, artifacts=rows, kinds=flow_versions.KINDS)


def _file(form: Any, name: str) -> UploadFile:
    value = form.get(name)
    if not isinstance(value, UploadFile):
        raise Validation(f"{name}: a file is required")
    return value


@router.post("/artifacts")
async def upload(request: Request, session: Session) -> Response:
    form = await checked_form(request, session)
    try:  # (the spooled upload is closed whatever happens: no leaked temporary file)
        fh = _file(form, "artifact")
        description = text(form, "description", 4096)
        ctx = context(request)
        await anyio.to_thread.run_sync(
            lambda: service.upload(ctx, session.app, fh.file, description=description, size=None)
        )
    finally:
        await form.close()
    return see_other("/console/artifacts")


@router.post("/artifacts/versions")
async def upload_version(request: Request, session: Session) -> Response:
    form = await checked_form(request, session)
    try:
        fh = _file(form, "artifact")
        flow_id, version = text(form, "flow_id", 128).strip(), text(form, "version", 128).strip()
        kind = text(form, "kind", 16) or "wasm"
        notes = text(form, "notes", 4096)
        ctx = context(request)
        await anyio.to_thread.run_sync(
            lambda: flow_versions.create(
                ctx,
                session.app,
                flow_id,
                version=version,
                kind=kind,
                files=[fh.file],
                device_types=None,
                manifest=None,
                notes=notes,
                per_type=False,
            )
        )
    finally:
        await form.close()
    return see_other("/console/artifacts")


@router.post("/artifacts/{artifact_id}/delete")
async def delete(request: Request, artifact_id: str, session: Session) -> Response:
    known(artifact_id, "Artifact")
    await checked_form(request, session)
    ctx = context(request)
    await anyio.to_thread.run_sync(service.delete, ctx, session.app, artifact_id)
    return see_other("/console/artifacts")

"""Export jobs: their status and their file."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from agent.server.api.auth import Caller, authenticate, context, is_object_id
from agent.server.api.models import AUTH_ERRORS
from agent.server.api.params import AppId, ObjectId
from agent.server.db.models import Job
from agent.server.errors import Forbidden, NotFound
from agent.server.scopes import accepted
from agent.server.service.exports import export_path

router = APIRouter(tags=["jobs"], responses=AUTH_ERRORS)
BASE = "/applications/{applicationId}/jobs/{jobId}"
_SCOPE = {"devices": ("devices", "export"), "wasm": ("embeddedDeployments", "export")}


def _job(request: Request, caller: Caller, job_id: str) -> Job:
    ctx = context(request)
    with ctx.db.transaction() as s:
        job = s.get(Job, job_id) if is_object_id(job_id) else None
        if job is None or job.application_id != caller.app.id:
            raise NotFound("Job was not found")
    resource, action = _SCOPE[job.kind]
    if not caller.scopes & accepted(resource, action, read=True):
        raise Forbidden(f"This token may not read {resource}.{action} jobs")
    return job


def _caller(request: Request, applicationId: str) -> Caller:
    # Any token of the application gets this far: the job's own scope is checked in _job.
    return authenticate(request, applicationId)


@router.get(BASE, summary="An export job: queued, done (with its URL) or failed")
def get_job(request: Request, applicationId: AppId, jobId: ObjectId) -> dict[str, Any]:
    job = _job(request, _caller(request, applicationId), jobId)
    return {"jobId": job.id, "kind": job.kind, "status": job.status, **(job.result or {})}


@router.get(
    BASE + "/download",
    summary="The file an export job made",
    response_class=FileResponse,
    responses={
        200: {
            "description": "devices.json (a devices export) or wasm.zip (a WASM export)",
            "content": {
                "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
def download(request: Request, applicationId: AppId, jobId: ObjectId) -> FileResponse:
    job = _job(request, _caller(request, applicationId), jobId)
    path = export_path(context(request), job.id)
    if job.status != "done" or not path.is_file():
        raise NotFound("The export is not ready")
    name, media = (
        ("devices.json", "application/json")
        if job.kind == "devices"
        else ("wasm.zip", "application/zip")
    )
    return FileResponse(path, media_type=media, filename=f"{job.id}-{name}")

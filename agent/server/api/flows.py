"""Flow versions (upload, list) and the artifact downloads devices make."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from agent.server.api.auth import Caller, context, require
from agent.server.artifact_store import verify
from agent.server.db import applications as apps_repo
from agent.server.db import flow_versions as repo
from agent.server.errors import NotFound, Validation
from agent.server.service import flow_versions as service

router = APIRouter(tags=["flows"])
BASE = "/applications/{applicationId}/flows/{flowId}/versions"


@router.post(BASE, status_code=201, summary="Upload a version of a flow (multipart)")
def post_version(
    request: Request,
    flowId: str,
    caller: Annotated[Caller, Depends(require("flows", "post", read=False))],
    version: Annotated[str, Form(max_length=128)],
    kind: Annotated[str, Form()] = "wasm",
    artifact: Annotated[UploadFile | None, File()] = None,
    artifacts: Annotated[list[UploadFile] | None, File()] = None,
    deviceTypes: Annotated[str | None, Form()] = None,
    manifest: Annotated[str | None, Form()] = None,
    notes: Annotated[str, Form(max_length=4096)] = "",
) -> dict[str, Any]:
    if (artifact is None) == (not artifacts):
        raise Validation("give artifact (one file) or artifacts (one per device type)")
    files = [artifact.file] if artifact is not None else [a.file for a in artifacts or ()]
    fv = service.create(
        context(request),
        caller.app,
        flowId,
        version=version,
        kind=kind,
        files=files,
        device_types=deviceTypes,
        manifest=manifest,
        notes=notes,
        per_type=artifact is None,
    )
    return service.view(fv)


@router.get(BASE, summary="The versions of a flow")
def get_versions(
    request: Request,
    flowId: str,
    caller: Annotated[Caller, Depends(require("flows", "get", read=True))],
) -> dict[str, Any]:
    ctx = context(request)
    with ctx.db.transaction() as s:
        rows = repo.list_for_flow(s, caller.app.id, flowId)
        items = [service.view(v) for v in rows]
    return {"items": items, "count": len(items), "flowId": flowId, "applicationId": caller.app.id}


@router.get("/artifacts/{applicationId}/{sha256}", summary="An artifact (signed URL, Range)")
def get_artifact(
    request: Request,
    applicationId: str,
    sha256: str,
    sig: Annotated[str, Query(max_length=64)],
    expires: Annotated[int | None, Query(ge=0, le=2**40)] = None,
) -> FileResponse:
    ctx = context(request)
    if len(applicationId) != 24 or len(sha256) != 64:
        raise NotFound("Artifact was not found")
    with ctx.db.transaction() as s:
        app = apps_repo.get_application(s, applicationId)
        key = app.url_key if app is not None else None
    if key is None or not verify(key, applicationId, sha256, sig, expires):
        raise NotFound("Artifact was not found")
    path = ctx.store.path(sha256)
    if not path.is_file():
        raise NotFound("Artifact was not found")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={
            "x-checksum-sha256": sha256,
            "cache-control": "private, max-age=31536000, immutable",
        },
    )

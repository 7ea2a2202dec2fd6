"""Flow versions (upload, list) and the artifact downloads devices make."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import formatdate, parsedate_to_datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.datastructures import FormData, UploadFile
from starlette.responses import MalformedRangeHeader

from agent.server.api.auth import Caller, context, is_object_id, require
from agent.server.api.forms import text_field as _field
from agent.server.api.models import AUTH_ERRORS, errors
from agent.server.api.params import AppId, IdPath, Sha256Path
from agent.server.artifact_store import artifact_url, is_digest, verify
from agent.server.db import flow_versions as repo
from agent.server.errors import NotFound, Validation
from agent.server.service import flow_versions as service
from agent.server.text import text_problem

router = APIRouter(tags=["flows"])
BASE = "/applications/{applicationId}/flows/{flowId}/versions"


#: The upload's fields (multipart/form-data), as the OpenAPI document shows them.
UPLOAD_FIELDS = ("version", "kind", "artifact", "artifacts", "deviceTypes", "manifest", "notes")
_UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["version"],
                "additionalProperties": False,
                "properties": {
                    "version": {"type": "string", "minLength": 1, "maxLength": 128},
                    "kind": {"type": "string", "enum": list(service.KINDS), "default": "wasm"},
                    "artifact": {"type": "string", "format": "binary"},
                    "artifacts": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                    },
                    "deviceTypes": {
                        "type": "string",
                        "description": "JSON: a list of device types (with artifact), or "
                        "one list per file (with artifacts)",
                    },
                    "manifest": {
                        "type": "string",
                        "description": "JSON: " + ", ".join(service.MANIFEST_KEYS),
                    },
                    "notes": {"type": "string", "maxLength": 4096},
                },
            }
        }
    },
}


def _files(form: FormData, name: str) -> list[UploadFile]:
    values = form.getlist(name)
    if not all(isinstance(v, UploadFile) for v in values):
        raise Validation(f"{name}: a file (a part with a filename), not a text field")
    return [v for v in values if isinstance(v, UploadFile)]


@router.post(
    BASE,
    status_code=201,
    responses={**AUTH_ERRORS, **errors(409, 413)},
    summary="Upload a version of a flow (multipart)",
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def post_version(
    request: Request,
    flowId: IdPath,
    caller: Annotated[Caller, Depends(require("flows", "post", read=False))],
) -> dict[str, Any]:
    # The form is read here, after the token and its scope were checked: a caller
    # without them never gets the server to read, let alone spool, an upload.
    async with request.form(max_files=64, max_fields=len(UPLOAD_FIELDS) + 8) as form:
        unknown = sorted(set(form.keys()) - set(UPLOAD_FIELDS))
        if unknown:
            raise Validation(
                f"unknown field {unknown[0][:64]!r}; accepted: {', '.join(UPLOAD_FIELDS)}"
            )
        version = _field(form, "version", max_length=128)
        if version is None:
            raise Validation("version: a field of 1 to 128 characters is required")
        artifact = _files(form, "artifact")
        artifacts = _files(form, "artifacts")
        if len(artifact) > 1:
            raise Validation("artifact: one file (use artifacts for one per device type)")
        if bool(artifact) == bool(artifacts):
            raise Validation("give artifact (one file) or artifacts (one per device type)")
        fv = await run_in_threadpool(
            service.create,
            context(request),
            caller.app,
            flowId,
            version=version,
            kind=_field(form, "kind", max_length=16) or "wasm",
            files=[f.file for f in artifact or artifacts],
            device_types=_field(form, "deviceTypes", max_length=service.MAX_JSON_FIELD),
            manifest=_field(form, "manifest", max_length=service.MAX_JSON_FIELD),
            notes=_field(form, "notes", max_length=4096) or "",
            per_type=not artifact,
        )
    return service.view(fv)


@router.get(BASE, responses=AUTH_ERRORS, summary="The versions of a flow")
def get_versions(
    request: Request,
    flowId: IdPath,
    caller: Annotated[Caller, Depends(require("flows", "get", read=True))],
) -> dict[str, Any]:
    service.check_flow_id(flowId)
    ctx = context(request)
    with ctx.db.transaction() as s:
        rows = repo.list_for_flow(s, caller.app.id, flowId)
        items = [service.view(v) for v in rows]
    return {"items": items, "count": len(items), "flowId": flowId, "applicationId": caller.app.id}


#: How long a download link given to a person stays valid, by default and at most.
LINK_DEFAULT_S = 3600
LINK_MAX_S = 7 * 86400


@router.get(
    BASE + "/{version}/link",
    responses=AUTH_ERRORS,
    summary="A time-limited download link for each artifact of a version",
)
def get_link(
    request: Request,
    flowId: IdPath,
    version: Annotated[str, Path(max_length=128)],
    caller: Annotated[Caller, Depends(require("flows", "get", read=True))],
    expiresIn: Annotated[int, Query(ge=1, le=LINK_MAX_S)] = LINK_DEFAULT_S,
) -> dict[str, Any]:
    """``{"items": [{"sha256", "deviceTypes"?, "uri"}], "expire"}``: each URI is signed
    for this application and stops working at ``expire`` (ISO-8601, UTC)."""
    service.check_flow_id(flowId)
    if text_problem(version):
        raise NotFound(f"No such version of flow {flowId}")
    ctx = context(request)
    with ctx.db.transaction() as s:
        fv = repo.get(s, caller.app.id, flowId, version)
        if fv is None:
            raise NotFound(f"Version {version} of flow {flowId} was not found")
        items = list(fv.artifacts)
    expires = int(time.time()) + expiresIn
    key = caller.app.url_key
    return {
        "items": [
            {
                **{k: v for k, v in item.items() if k in ("sha256", "size", "deviceTypes")},
                "uri": artifact_url(ctx.cfg.base_url, key, caller.app.id, item["sha256"], expires),
            }
            for item in items
        ],
        "expire": datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z"),
    }


_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


class ArtifactResponse(FileResponse):
    """A file with Range support, where a Range header that does not parse is
    ignored (the whole file, 200), as RFC 9110 allows, rather than Starlette's
    plain-text 400: a device resuming a download then starts over instead of failing.
    A Range past the end stays a 416 (with ``Content-Range: bytes */SIZE``)."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []


@router.get(
    "/artifacts/{applicationId}/{sha256}",
    summary="An artifact (signed URL, Range)",
    response_class=ArtifactResponse,
    responses={
        200: {"description": "The artifact's bytes", "content": _BINARY},
        206: {"description": "The bytes of the Range asked for", "content": _BINARY},
        304: {"description": "Not modified since the If-Modified-Since date"},
        412: {"description": "Modified since the If-Unmodified-Since date"},
        416: {
            "description": "A Range that starts past the artifact's end",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **errors(400, 404),
    },
)
def get_artifact(
    request: Request,
    applicationId: AppId,
    sha256: Sha256Path,
    sig: Annotated[str, Query(max_length=64)],
    expires: Annotated[int | None, Query(ge=0, le=2**40)] = None,
) -> Response:
    ctx = context(request)
    if not is_object_id(applicationId) or not is_digest(sha256):
        raise NotFound("Artifact was not found")
    key = ctx.url_key(applicationId)
    if key is None or not verify(key, applicationId, sha256, sig, expires):
        raise NotFound("Artifact was not found")
    path = ctx.store.path(sha256)
    try:
        modified = int(path.stat().st_mtime)
    except OSError:
        raise NotFound("Artifact was not found") from None
    headers = {
        "x-checksum-sha256": sha256,
        "cache-control": "private, max-age=31536000, immutable",
        "last-modified": formatdate(modified, usegmt=True),
    }
    unmodified_since = _http_date(request.headers.get("if-unmodified-since"))
    if unmodified_since is not None and modified > unmodified_since:
        return Response(status_code=412, headers=headers)
    modified_since = _http_date(request.headers.get("if-modified-since"))
    if modified_since is not None and modified <= modified_since:
        return Response(status_code=304, headers=headers)
    return ArtifactResponse(path, media_type="application/octet-stream", headers=headers)


def _http_date(value: str | None) -> int | None:
    """An HTTP date as a Unix time; None when absent or malformed (then ignored, as
    RFC 9110 says)."""
    if not value or len(value) > 64:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    try:
        return int(when.timestamp())
    except (OverflowError, OSError, ValueError):
        return None

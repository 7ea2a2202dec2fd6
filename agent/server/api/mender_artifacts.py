"""Mender's API: the artifact repository (``/api/management/v1/deployments/artifacts``),
releases and the storage limit. The same artifacts as the flow versions of Losant's
API (:mod:`agent.server.service.artifacts`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, WithJsonSchema
from starlette.datastructures import FormData, UploadFile

from agent.server.api.auth import Caller, context
from agent.server.api.forms import text_field as _field
from agent.server.api.mender_auth import mender_require
from agent.server.api.models import MENDER_AUTH_ERRORS, Json, _Body, mender_errors
from agent.server.api.params import NO_NUL, text_schema
from agent.server.api.query import text_param
from agent.server.errors import Validation
from agent.server.service import artifacts as service

router = APIRouter(tags=["mender"])
BASE = "/api/management/v1/deployments"
ARTIFACTS = BASE + "/artifacts"

Reader = Annotated[Caller, Depends(mender_require("artifacts", "get", read=True))]
Poster = Annotated[Caller, Depends(mender_require("artifacts", "post", read=False))]
Putter = Annotated[Caller, Depends(mender_require("artifacts", "put", read=False))]
NameParam = Annotated[str | None, Query(), WithJsonSchema(text_schema(256))]
Deleter = Annotated[Caller, Depends(mender_require("artifacts", "delete", read=False))]
#: An artifact id: a UUID (anything else is an unknown artifact, 404).
ArtifactId = Annotated[
    str,
    Path(
        description="Artifact identifier (a UUID)",
        json_schema_extra={"pattern": "^[0-9a-f-]{36}$"},
    ),
]


# ---------------------------------------------------------------- documents


class UpdateFile(BaseModel):
    name: str
    checksum: str
    size: int
    date: str = Field(json_schema_extra={"format": "date-time"})


class TypeInfo(BaseModel):
    type: str | None


class Update(BaseModel):
    type_info: TypeInfo
    files: list[UpdateFile]
    #: The payload's meta-data (an object), left out when it has none (mender-cli
    #: 1.9 takes it for a list, and reads the artifacts only without it).
    meta_data: dict[str, Json] | None = None


class ArtifactInfo(BaseModel):
    format: str
    version: int


class ArtifactDepends(BaseModel):
    device_type: list[str]


class MenderArtifact(BaseModel):
    """Mender's Artifact, with its ``artifact_provides`` and ``artifact_depends``."""

    id: str
    name: str
    description: str
    device_types_compatible: list[str]
    signed: bool
    modified: str = Field(json_schema_extra={"format": "date-time"})
    size: int
    info: ArtifactInfo
    updates: list[Update]
    artifact_provides: dict[str, str]
    artifact_depends: ArtifactDepends


class ArtifactUpdate(_Body):
    description: str = Field(
        "", max_length=service.MAX_DESCRIPTION, json_schema_extra={"pattern": NO_NUL}
    )


class ArtifactLink(BaseModel):
    uri: str
    expire: str = Field(json_schema_extra={"format": "date-time"})


class Release(BaseModel):
    name: str
    artifacts: list[MenderArtifact]


class StorageLimit(BaseModel):
    limit: int
    usage: int


# ---------------------------------------------------------------- multipart forms

_TEXT = {"type": "string", "pattern": NO_NUL}
_CREATED: dict[int | str, dict[str, Any]] = {
    201: {
        "description": "Stored; the new artifact is at the Location",
        "headers": {
            "Location": {
                "description": "The artifact's path (``…/deployments/artifacts/{id}``)",
                "schema": {"type": "string"},
                "required": True,
            }
        },
    }
}
UPLOAD_FIELDS = ("size", "description", "artifact")
_UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["artifact"],
                "additionalProperties": False,
                "properties": {
                    "size": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "DEPRECATED: the artifact's size in bytes; when "
                        "given it must be the file's",
                    },
                    "description": {**_TEXT, "maxLength": service.MAX_DESCRIPTION},
                    "artifact": {
                        "type": "string",
                        "format": "binary",
                        "description": "A Mender artifact (format 3) with one payload of type "
                        + ", ".join(service.TYPE_KINDS),
                    },
                },
            }
        }
    },
}
GENERATE_FIELDS = ("name", "type", "device_types_compatible", "description", "args", "file")
_GENERATE_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name", "type", "device_types_compatible", "file"],
                "additionalProperties": False,
                "properties": {
                    "name": {**_TEXT, "minLength": 1, "maxLength": 256},
                    "type": {"type": "string", "enum": list(service.TYPE_KINDS)},
                    "device_types_compatible": {
                        "type": "array",
                        "minItems": 1,
                        "items": {**_TEXT, "minLength": 1, "maxLength": 64},
                        "description": "Compatible device types (comma-separated, or the "
                        "field repeated)",
                    },
                    "description": {**_TEXT, "maxLength": service.MAX_DESCRIPTION},
                    "args": {
                        **_TEXT,
                        "description": 'JSON: {"software_name", "software_version"} (the '
                        "flow id and version the payload becomes)",
                    },
                    "file": {"type": "string", "format": "binary"},
                },
            }
        }
    },
}


def _file(form: FormData, name: str) -> UploadFile:
    values = form.getlist(name)
    if len(values) != 1 or not isinstance(values[0], UploadFile):
        raise Validation(f"{name}: one file (a part with a filename) is required")
    return values[0]


def _known(form: FormData, fields: tuple[str, ...]) -> None:
    unknown = sorted(set(form.keys()) - set(fields))
    if unknown:
        raise Validation(f"unknown field {unknown[0][:64]!r}; accepted: {', '.join(fields)}")


def _created(artifact_id: str) -> Response:
    return Response(status_code=201, headers={"Location": service.LOCATION.format(id=artifact_id)})


# ---------------------------------------------------------------- routes


@router.post(
    ARTIFACTS,
    status_code=201,
    response_class=Response,
    responses={**_CREATED, **MENDER_AUTH_ERRORS, **mender_errors(409, 413)},
    summary="Upload a Mender artifact (multipart: size, description, artifact last)",
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload(request: Request, caller: Poster) -> Response:
    # The form is read after the credential and its scope were checked.
    async with request.form(max_files=2, max_fields=len(UPLOAD_FIELDS) + 4) as form:
        _known(form, UPLOAD_FIELDS)
        artifact = _file(form, "artifact")
        artifact_id = await run_in_threadpool(
            service.upload,
            context(request),
            caller.app,
            artifact.file,
            description=_field(form, "description", max_length=service.MAX_DESCRIPTION) or "",
            size=_field(form, "size", max_length=32),
        )
    return _created(artifact_id)


@router.post(
    ARTIFACTS + "/generate",
    status_code=201,
    response_class=Response,
    responses={**_CREATED, **MENDER_AUTH_ERRORS, **mender_errors(409, 413)},
    summary="Generate a Mender artifact from a raw file (multipart, file last)",
    openapi_extra={"requestBody": _GENERATE_BODY},
)
async def generate(request: Request, caller: Poster) -> Response:
    async with request.form(max_files=2, max_fields=len(GENERATE_FIELDS) + 70) as form:
        _known(form, GENERATE_FIELDS)
        file = _file(form, "file")
        types: list[str] = []
        for value in form.getlist("device_types_compatible"):
            if not isinstance(value, str) or len(value) > 4096:
                raise Validation("device_types_compatible: text of at most 4096 characters")
            types += [t.strip() for t in value.split(",") if t.strip()]
        artifact_id = await run_in_threadpool(
            service.generate,
            context(request),
            caller.app,
            file.file,
            file_name=file.filename,
            name=_field(form, "name", max_length=256) or "",
            type_=_field(form, "type", max_length=64) or "",
            device_types=types,
            description=_field(form, "description", max_length=service.MAX_DESCRIPTION) or "",
            args=_field(form, "args", max_length=4096),
        )
    return _created(artifact_id)


@router.get(
    ARTIFACTS,
    response_model=list[MenderArtifact],
    response_model_exclude_none=True,
    responses=MENDER_AUTH_ERRORS,
    summary="The artifacts (all, or those of one name)",
)
def list_artifacts(
    request: Request,
    caller: Reader,
    # (read by the query parser; listed for the OpenAPI document)
    name: NameParam = None,
) -> list[dict[str, Any]]:
    return service.list_all(context(request), caller.app, _name(request))


def _name(request: Request) -> str | None:
    """The ``name`` filter: once at most, storable text of at most 256 characters."""
    return text_param(request.query_params.multi_items(), "name", max_length=256)


@router.get(
    ARTIFACTS + "/{id}",
    response_model=MenderArtifact,
    response_model_exclude_none=True,
    responses=MENDER_AUTH_ERRORS,
    summary="An artifact",
)
def get_artifact(request: Request, id: ArtifactId, caller: Reader) -> dict[str, Any]:
    return service.get(context(request), caller.app, id)


@router.put(
    ARTIFACTS + "/{id}",
    status_code=204,
    response_class=Response,
    responses={**MENDER_AUTH_ERRORS, **mender_errors(422)},
    summary="Edit an artifact's description (422 once a deployment used it)",
)
def put_artifact(
    request: Request, id: ArtifactId, body: ArtifactUpdate, caller: Putter
) -> Response:
    service.set_description(context(request), caller.app, id, body.description)
    return Response(status_code=204)


@router.delete(
    ARTIFACTS + "/{id}",
    status_code=204,
    response_class=Response,
    responses={**MENDER_AUTH_ERRORS, **mender_errors(409)},
    summary="Delete an artifact (409 while an active deployment uses it)",
)
def delete_artifact(request: Request, id: ArtifactId, caller: Deleter) -> Response:
    service.delete(context(request), caller.app, id)
    return Response(status_code=204)


@router.get(
    ARTIFACTS + "/{id}/download",
    response_model=ArtifactLink,
    responses=MENDER_AUTH_ERRORS,
    summary="A time-limited download link of the artifact's file",
)
def download(request: Request, id: ArtifactId, caller: Reader) -> dict[str, str]:
    return service.download_link(context(request), caller.app, id)


@router.get(
    BASE + "/deployments/releases",
    response_model=list[Release],
    response_model_exclude_none=True,
    responses=MENDER_AUTH_ERRORS,
    summary="Releases: the artifacts grouped by name",
)
def releases(
    request: Request,
    caller: Reader,
    # (read by the query parser; listed for the OpenAPI document)
    name: NameParam = None,
) -> list[dict[str, Any]]:
    return service.releases(context(request), caller.app, _name(request))


@router.get(
    BASE + "/limits/storage",
    response_model=StorageLimit,
    responses=MENDER_AUTH_ERRORS,
    summary="The storage limit (0: none) and the bytes the artifacts take",
)
def storage(request: Request, caller: Reader) -> dict[str, int]:
    return service.storage(context(request), caller.app)

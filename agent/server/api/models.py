"""Request and response bodies, in Losant's shapes (shared with the OpenAPI document).

Request bodies forbid unknown fields and bound every string and list, and refuse what
a database cannot store anywhere in them (NUL, lone surrogates, NaN, nesting over 32
levels: :mod:`agent.server.text`), so a malformed or hostile body is a 400 before any
work, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from agent.server.api.params import CALLBACK_URL_SCHEMA, ID_SCHEMA, JSON_VALUE_MARK, NO_NUL
from agent.server.api.query import Paging, Sort
from agent.server.text import tree_problem
from agent.wire.protocol import is_valid_id


def _id(value: str) -> str:
    if not is_valid_id(value):
        raise ValueError("an id is 1 to 64 of [A-Za-z0-9._-], not dots alone")
    return value


def _no_nul() -> Any:
    """(For the OpenAPI document: the body checks refuse a NUL in any string.)"""
    return Field(json_schema_extra={"pattern": NO_NUL})


Id = Annotated[str, AfterValidator(_id), WithJsonSchema(ID_SCHEMA)]
Version = Annotated[str, StringConstraints(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$")]
Text = Annotated[str, StringConstraints(max_length=1024), _no_nul()]
Name = Annotated[str, StringConstraints(min_length=1, max_length=255), _no_nul()]
Description = Annotated[str, StringConstraints(max_length=32_767), _no_nul()]
#: Any JSON (documented as :data:`agent.server.api.params.JSON_VALUE_SCHEMA`).
Json = Annotated[Any, WithJsonSchema(JSON_VALUE_MARK)]


def _storable(data: Any) -> Any:
    problem = tree_problem(data)
    if problem is not None:
        raise ValueError(problem)
    return data


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _check_storable(cls, data: Any) -> Any:
        return _storable(data)


class Success(BaseModel):
    success: bool = True


class JobEnqueued(BaseModel):
    jobQueued: bool = True
    jobId: str
    success: bool = True


class ErrorBody(BaseModel):
    """Losant's error: ``{"type": "NotFound", "message": "Application was not found"}``."""

    type: str
    message: str


_ERROR_TEXT = {
    400: "A malformed request: bad JSON, a field out of bounds or unknown, a bad parameter",
    401: "No valid API token (missing, unknown or revoked)",
    403: "The token does not have a scope this endpoint accepts",
    404: "An unknown application (or one the token is not of), device, deployment or job",
    409: "A conflict: the device or version exists already",
    413: "A body over the server's limit",
    503: "The MQTT broker is unavailable",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route, for the OpenAPI document."""
    return {code: {"model": ErrorBody, "description": _ERROR_TEXT[code]} for code in codes}


#: Every route that takes a token answers these.
AUTH_ERRORS = errors(400, 401, 403, 404)


class MenderError(BaseModel):
    """Mender's error (every route under ``/api/management/``): ``{"error",
    "request_id"}``, the request id also in the ``X-MEN-RequestID`` header."""

    error: str
    request_id: str


_MENDER_ERROR_TEXT = {
    400: "Invalid request: a malformed body, field or parameter",
    401: "No valid credential (an API token or a login token)",
    403: "The token does not have a scope this endpoint accepts",
    404: "Not found (or not of the caller's application)",
    409: "A conflict with what exists",
    412: "A precondition of the request failed",
    413: "Over a size or storage limit",
    422: "The request is well formed but cannot be carried out",
}


def mender_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route of Mender's API, for the OpenAPI document."""
    return {code: {"model": MenderError, "description": _MENDER_ERROR_TEXT[code]} for code in codes}


#: Every route of Mender's API that takes a credential answers these.
MENDER_AUTH_ERRORS = mender_errors(400, 401, 403, 404)


class DeploymentRelease(_Body):
    flowId: Id
    version: Version | None = None
    deviceIds: list[Id] = Field(min_length=1, max_length=10_000)


class DeploymentRemove(_Body):
    """Losant's three forms: flowId, deviceId or both (not neither)."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["flowId"], "properties": {"flowId": {"type": "string"}}},
                {"required": ["deviceId"], "properties": {"deviceId": {"type": "string"}}},
            ]
        }
    )
    flowId: Id | None = None
    deviceId: Id | None = None


class DeploymentReplace(_Body):
    flowId: Id
    oldVersion: Version | None = None
    newVersion: Version | None = None


class DeploymentExport(_Body):
    email: Text | None = None
    deviceId: Id
    callbackUrl: Annotated[str, WithJsonSchema(CALLBACK_URL_SCHEMA)] | None = None


class Tag(_Body):
    key: Annotated[str, StringConstraints(pattern=r"^[0-9a-zA-Z_-]{1,255}$")]
    # (Strict numbers: in lax mode pydantic would take true as 1, which the
    # document, like Losant's, does not allow.)
    value: Name | StrictInt | StrictFloat


class Attribute(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "additionalProperties": JSON_VALUE_MARK,
            "propertyNames": {"pattern": NO_NUL},
        },
    )

    @model_validator(mode="before")
    @classmethod
    def _check_storable(cls, data: Any) -> Any:
        return _storable(data)

    name: Annotated[str, StringConstraints(pattern=r"^[0-9a-zA-Z_-]{1,255}$")]
    dataType: Literal["number", "string", "boolean", "gps", "blob"]


DeviceClass = Literal["standalone", "gateway", "peripheral", "floating", "edgeCompute", "embedded"]


class DevicePost(_Body):
    name: Name
    description: Description = ""
    tags: list[Tag] = Field(default_factory=list, max_length=100)
    attributes: list[Attribute] = Field(default_factory=list, max_length=256)
    deviceClass: DeviceClass = "edgeCompute"
    #: This project's: the agent's device id (default: a new 24-hex id) and type.
    deviceId: Id | None = None
    deviceType: Annotated[str, StringConstraints(min_length=1, max_length=64), _no_nul()] | None = (
        None
    )
    # Losant fields accepted and ignored (this server has no parent/peripheral links).
    parentId: Id | None = None
    gatewayId: Id | None = None


TimeValue = Annotated[
    Annotated[str, StringConstraints(max_length=64)]
    | StrictInt
    | StrictFloat
    | dict[str, Any]
    | None,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": 64, "pattern": NO_NUL},
                {"type": "number"},
                {
                    "type": "object",
                    "additionalProperties": JSON_VALUE_MARK,
                    "propertyNames": {"pattern": NO_NUL},
                },
                {"type": "null"},
            ]
        }
    ),
]


class DeviceCommand(_Body):
    name: Name
    payload: Json = None
    time: TimeValue = None


class MultiDeviceCommand(DeviceCommand):
    """To the devices listed, or to those with one of the tags (one way, not both)."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["deviceIds"],
                    "properties": {"deviceIds": {"type": "array", "minItems": 1}},
                },
                {
                    "required": ["deviceTags"],
                    "properties": {"deviceTags": {"type": "array", "minItems": 1}},
                },
            ]
        }
    )
    deviceIds: list[Id] | None = Field(default=None, max_length=10_000)
    deviceTags: list[Tag] | None = Field(default=None, max_length=100)


class DevicePatch(_Body):
    name: Name | None = None
    description: Description | None = None
    tags: list[Tag] | None = Field(default=None, max_length=100)
    deviceClass: DeviceClass | None = None


def collection(
    items: list[dict[str, Any]],
    total: int,
    paging: Paging,
    sort: Sort,
    app_id: str,
    **filters: str | None,
) -> dict[str, Any]:
    """A page of a collection in Losant's envelope, with the filters that were given."""
    return {
        "items": items,
        "count": len(items),
        "totalCount": total,
        "perPage": paging.per_page,
        "page": paging.page,
        "sortField": sort.field,
        "sortDirection": sort.direction,
        "applicationId": app_id,
        **{k: v for k, v in filters.items() if v},
    }

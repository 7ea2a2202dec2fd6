"""Mender's deployments (seed 003, ``/api/management/v1/deployments/deployments…``),
run by this server as rollouts; the list also under ``/api/management/v2/…``, where
``pymenderio`` reads it.

In the OpenAPI document with the seed's shapes (``NewDeployment`` with this project's
``edge``, ``Deployment``, ``Device``, ``DeploymentStatistics``) and status codes.
Query parameters are declared as text and parsed by :mod:`agent.server.api.query`
(the document says what that parser takes); a path id of the wrong shape is an
unknown deployment (404), as in Mender. The answers are built by
:mod:`agent.server.service.rollout_views` and sent as they are; the response models
document them (and the tests validate real answers against them)."""

# No ``from __future__ import annotations``: FastAPI reads the annotations.

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from agent.server.api import query as q
from agent.server.api.auth import Caller, context
from agent.server.api.mender_auth import mender_require
from agent.server.api.models import MENDER_AUTH_ERRORS, Json, mender_errors
from agent.server.api.params import ID_SCHEMA, enum_schema, text_schema
from agent.server.db import rollouts as repo
from agent.server.errors import NotFound, Validation
from agent.server.service import inventory_filter
from agent.server.service import rollout_views as views
from agent.server.service import rollouts as service
from agent.server.service.phases import MAX_PHASES, STATUSES, PhaseSpec
from agent.server.text import tree_problem
from agent.wire.protocol import is_valid_id

router = APIRouter(tags=["mender"])

V1 = "/api/management/v1/deployments/deployments"
V2 = "/api/management/v2/deployments/deployments"
ROLLOUT_STATUSES = ("scheduled", "pending", "inprogress", "finished")
MAX_PER_PAGE = 500
MAX_EVENTS = 1000
#: The last second ``created_after``/``created_before`` may name (9999-12-31, UTC).
MAX_UNIX = 253402300799
#: Phase start times this server stores: the years 1970 to 9998 (in UTC).
FIRST_YEAR, LAST_YEAR = 1970, 9998
#: ``edge.device_timeout``: at most a week, in seconds.
MAX_DEVICE_TIMEOUT = 7 * 86400

Reader = Annotated[Caller, Depends(mender_require("rollouts", "get", read=True))]
Poster = Annotated[Caller, Depends(mender_require("rollouts", "post", read=False))]
Aborter = Annotated[Caller, Depends(mender_require("rollouts", "abort", read=False))]
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")
]
DeviceId = Annotated[str, StringConstraints(min_length=1, max_length=64), WithJsonSchema(ID_SCHEMA)]
#: A deployment's id: a UUID (anything else is an unknown deployment, 404).
RolloutId = Annotated[
    str,
    Path(
        description="Deployment identifier (a UUID)",
        json_schema_extra={"pattern": "^[0-9a-f-]{36}$"},
    ),
]
DevicePath = Annotated[str, Path(description="Device identifier"), WithJsonSchema(ID_SCHEMA)]


def _int_schema(minimum: int, maximum: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


# Query parameters (read by agent.server.api.query; declared for the document).
PageParam = Annotated[str | None, Query(), WithJsonSchema(_int_schema(1, q.MAX_PAGE))]
PerPageParam = Annotated[str | None, Query(), WithJsonSchema(_int_schema(1, MAX_PER_PAGE))]
SecondsParam = Annotated[
    str | None,
    Query(description="Unix seconds (UTC), inclusive"),
    WithJsonSchema(_int_schema(0, MAX_UNIX)),
]
RolloutStatusParam = Annotated[str | None, Query(), WithJsonSchema(enum_schema(ROLLOUT_STATUSES))]
DeviceStatusParam = Annotated[str | None, Query(), WithJsonSchema(enum_schema(STATUSES))]
SearchParam = Annotated[
    str | None, Query(description="A part of the name"), WithJsonSchema(text_schema())
]
TypeParam = Annotated[
    str | None, Query(description="pymenderio's; ignored"), WithJsonSchema(text_schema())
]
#: Event ids are a 32-bit INTEGER column (PostgreSQL refuses a larger bound value).
MAX_EVENT_ID = 2**31 - 1
AfterParam = Annotated[
    str | None, Query(description="An event id"), WithJsonSchema(_int_schema(0, MAX_EVENT_ID))
]
LimitParam = Annotated[str | None, Query(), WithJsonSchema(_int_schema(1, MAX_EVENTS))]


# ---------------------------------------------------------------- request bodies


def _start_ts(value: datetime) -> datetime:
    """A phase's start in UTC; a time this server cannot store (or convert to UTC:
    ``9999-12-31T23:59:59-01:00``) is refused."""
    try:
        utc = value.astimezone(UTC)
    except (OverflowError, ValueError):
        utc = None
    if utc is None or not FIRST_YEAR <= utc.year <= LAST_YEAR:
        raise ValueError(f"a time from the year {FIRST_YEAR} to {LAST_YEAR} (in UTC)")
    return utc


def _date_text(value: Any) -> Any:
    """Only text that starts as a date-time does (pydantic would take a number, or
    digits, as Unix seconds)."""
    if not isinstance(value, str) or DATE_TIME.match(value) is None:
        raise ValueError("an RFC 3339 date-time with a zone (2026-01-01T00:00:00Z)")
    return value


DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}")
StartTs = Annotated[AwareDatetime, BeforeValidator(_date_text), AfterValidator(_start_ts)]


class PhaseIn(BaseModel):
    """The seed's ``NewDeploymentPhase``."""

    model_config = ConfigDict(extra="ignore")

    #: Percent of the devices not yet assigned to an earlier phase (rounded down);
    #: optional for the last phase, which takes the rest.
    batch_size: Annotated[StrictInt, Field(ge=1, le=100)] | None = None
    #: When the phase starts (RFC 3339 with a zone); only the first may leave it out.
    start_ts: StartTs | None = None


FilterText = Annotated[str, StringConstraints(max_length=inventory_filter.MAX_TEXT)]
FilterValue = Annotated[
    FilterText
    | StrictInt
    | StrictFloat
    | StrictBool
    | Annotated[
        list[FilterText] | list[StrictInt | StrictFloat],
        Field(max_length=inventory_filter.MAX_VALUES),
    ],
    Field(union_mode="left_to_right"),
]


class FilterPredicateIn(BaseModel):
    """The seed's ``FilterPredicate``: what each operator takes is checked after
    (``$exists`` a boolean, ``$in``/``$nin`` an array, ``$gt``… a number or a string;
    scopes ``inventory``/``identity`` name ``id``, ``name``, ``device_type``,
    ``agent_version``, ``online``)."""

    model_config = ConfigDict(extra="ignore")

    scope: Literal["inventory", "identity", "tags"]
    attribute: Annotated[str, StringConstraints(min_length=1, max_length=inventory_filter.MAX_TEXT)]
    type: Literal["$eq", "$ne", "$in", "$nin", "$exists", "$gt", "$gte", "$lt", "$lte"]
    value: FilterValue


class FilterIn(BaseModel):
    """The seed's ``Filter``, inline (a saved filter's ``id`` alone is not supported)."""

    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, StringConstraints(max_length=256)] | None = None
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    terms: Annotated[list[FilterPredicateIn], Field(min_length=1, max_length=32)]


class EdgeOptions(BaseModel):
    """This project's extension of ``NewDeployment`` (Mender's clients leave it out)."""

    model_config = ConfigDict(extra="forbid")

    #: Percent of the devices that finished installing whose failure stops the rollout.
    failure_threshold: Annotated[StrictInt | StrictFloat, Field(ge=0, le=100)] | None = None
    #: Whether a version that fails its health window, or an aborted one, is reverted.
    revert: StrictBool = True
    #: Seconds of the health window written into the devices' entries.
    health_window: Annotated[StrictInt, Field(ge=0, le=86400)] | None = None
    #: Seconds a started device has to reach a final status, else it is ``failure``.
    device_timeout: Annotated[StrictInt, Field(ge=1, le=MAX_DEVICE_TIMEOUT)] | None = None


class NewDeployment(BaseModel):
    """The seed's ``NewDeployment``, plus ``filter``/``dynamic``/``max_devices`` (as
    Mender's v2 has them), ``all_devices`` and this project's ``edge``. Other fields
    Mender's clients send (``force_installation``, …) are ignored. Exactly one of
    ``devices``, ``filter`` and ``all_devices`` is given."""

    model_config = ConfigDict(extra="ignore")

    name: Name
    artifact_name: Name
    devices: Annotated[list[DeviceId], Field(max_length=service.MAX_DEVICES)] | None = None
    all_devices: StrictBool = False
    filter: FilterIn | None = None
    dynamic: StrictBool = False
    max_devices: Annotated[StrictInt, Field(ge=1, le=service.MAX_DEVICES)] | None = None
    retries: Annotated[StrictInt, Field(ge=0, le=100)] = 0
    phases: Annotated[list[PhaseIn], Field(max_length=MAX_PHASES)] | None = None
    edge: EdgeOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        problem = tree_problem(data)
        if problem is not None:
            raise ValueError(problem)
        return data


class StatusUpdate(BaseModel):
    """The only status a deployment can be set to."""

    status: Literal["aborted"]


# ---------------------------------------------------------------- response bodies


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


DateTime = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
NullableDateTime = Annotated[
    str | None,
    WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}),
]


class FilterPredicate(_Out):
    scope: str
    attribute: str
    type: str
    value: Json


class Filter(_Out):
    """As given at creation, with an empty ``id`` and ``name`` (not a saved filter)."""

    id: str
    name: str
    terms: list[FilterPredicate]


class DeploymentPhase(_Out):
    id: str
    batch_size: int | None
    start_ts: NullableDateTime
    #: Devices of the phase whose update was sent (Mender: "which already requested
    #: an update").
    device_count: int


class EdgePhase(_Out):
    number: int
    #: Devices assigned to the phase.
    devices: int
    started: NullableDateTime


class EdgeInfo(_Out):
    """This project's: the extension fields, how it ended, its phases."""

    failure_threshold: int | float | None
    revert: bool
    health_window: int | None
    device_timeout: int | None
    aborted: bool
    #: Why the failure threshold stopped it, or null.
    stopped: str | None
    phases: list[EdgePhase]


class Deployment(_Out):
    """The seed's ``Deployment`` (``filter``, ``max_devices``,
    ``initial_device_count`` for a filter or dynamic one, ``phases`` for a phased
    one), and ``edge``."""

    id: str
    name: str
    artifact_name: str
    created: DateTime
    finished: NullableDateTime
    status: Literal["scheduled", "pending", "inprogress", "finished"]
    device_count: int
    retries: int
    dynamic: bool
    artifacts: list[str]
    filter: Filter | None = None
    max_devices: int | None = None
    initial_device_count: int | None = None
    phases: list[DeploymentPhase] | None = None
    edge: EdgeInfo


DeviceStatus = Annotated[str, WithJsonSchema(enum_schema(STATUSES))]


class Device(_Out):
    """The seed's ``Device``: ``state`` is what the agent reports for the deployment's
    attempt now (its own status word)."""

    id: str
    status: DeviceStatus
    created: DateTime
    finished: NullableDateTime
    device_type: str | None
    log: bool
    state: str | None
    substate: str | None


class DeploymentStatistics(_Out):
    """The seed's ``DeploymentStatistics``, plus ``decommissioned``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    success: int
    pending: int
    downloading: int
    installing: int
    rebooting: int
    failure: int
    noartifact: int
    already_installed: int = Field(alias="already-installed")
    aborted: int
    decommissioned: int


class Event(_Out):
    """This project's: one transition of a deployment."""

    id: int
    time: DateTime
    kind: str
    device_id: str | None
    detail: dict[str, Json]


_PAGED_HEADERS = {
    "Link": {
        "description": 'first, prev and next pages (``<url>; rel="next"``)',
        "schema": {"type": "string"},
        "required": True,
    },
    "X-Total-Count": {
        "description": "How many match in all",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
        "required": True,
    },
}
_CREATED: dict[int | str, dict[str, Any]] = {
    201: {
        "description": "New deployment created; it is at the Location (no body)",
        "headers": {
            "Location": {
                "description": "The deployment's path (``…/deployments/deployments/{id}``)",
                "schema": {"type": "string"},
                "required": True,
            }
        },
    }
}
_NO_CONTENT: dict[int | str, dict[str, Any]] = {204: {"description": "Done (no body)"}}


# ---------------------------------------------------------------- routes


def _new(body: NewDeployment) -> service.NewRollout:
    for device_id in body.devices or []:
        if not is_valid_id(device_id):
            raise Validation(f"devices: {device_id[:80]!r} is not a device id")
    edge = body.edge or EdgeOptions()
    return service.NewRollout(
        name=body.name,
        artifact_name=body.artifact_name,
        devices=body.devices,
        all_devices=body.all_devices,
        filter=body.filter.model_dump(exclude_none=True) if body.filter is not None else None,
        dynamic=body.dynamic,
        max_devices=body.max_devices,
        retries=body.retries,
        phases=[PhaseSpec(p.batch_size, p.start_ts) for p in body.phases or []],
        options=edge.model_dump(),
    )


@router.post(
    V1,
    status_code=201,
    response_class=Response,
    responses={**_CREATED, **MENDER_AUTH_ERRORS, **mender_errors(409, 413, 422)},
    summary="Create a deployment (409: a listed device is in another unfinished "
    "deployment of the same flow; 422: no artifact of that name)",
)
def create(request: Request, caller: Poster, body: Annotated[NewDeployment, Body()]) -> Response:
    rollout_id = service.create(context(request), caller.app, _new(body))
    return Response(status_code=201, headers={"Location": f"{V1}/{rollout_id}"})


def _paging(pairs: q.QueryPairs) -> tuple[int, int]:
    page = q.single_value(pairs, "page")
    per_page = q.single_value(pairs, "per_page")
    return (
        1 if page is None else q.parse_int("page", page, minimum=1, maximum=q.MAX_PAGE),
        20
        if per_page is None
        else q.parse_int("per_page", per_page, minimum=1, maximum=MAX_PER_PAGE),
    )


def _links(request: Request, page: int, per_page: int, more: bool) -> str:
    def url(n: int) -> str:
        return str(request.url.include_query_params(page=n, per_page=per_page))

    links = [f'<{url(1)}>; rel="first"']
    if page > 1:
        links.append(f'<{url(page - 1)}>; rel="prev"')
    if more:
        links.append(f'<{url(page + 1)}>; rel="next"')
    return ", ".join(links)


def _seconds(pairs: q.QueryPairs, name: str) -> datetime | None:
    value = q.single_value(pairs, name)
    if value is None:
        return None
    return service.created_bound(q.parse_int(name, value, minimum=0, maximum=MAX_UNIX))


def _list(request: Request, caller: Caller) -> Response:
    pairs = request.query_params.multi_items()
    status = q.single_value(pairs, "status")
    if status is not None and status not in ROLLOUT_STATUSES:
        raise Validation(f"status: one of {', '.join(ROLLOUT_STATUSES)}")
    search = q.text_param(pairs, "search")
    q.text_param(pairs, "type")
    page, per_page = _paging(pairs)
    query = repo.RolloutQuery(
        status=status,
        name_like=(f"%{_escape(search)}%", q.LIKE_ESCAPE) if search else None,
        created_after=_seconds(pairs, "created_after"),
        created_before=_seconds(pairs, "created_before"),
    )
    with context(request).db.transaction() as s:
        rows, total = repo.search(
            s, caller.app.id, query, offset=(page - 1) * per_page, limit=per_page
        )
        ids = [r.id for r in rows]
        phases = repo.phases_of(s, ids)
        counts = repo.status_counts(s, ids)
        items = [views.deployment(s, r, phases[r.id], counts[r.id]) for r in rows]
    more = (page - 1) * per_page + len(rows) < total
    return _json(items, Link=_links(request, page, per_page, more), **{"X-Total-Count": str(total)})


def _escape(text: str) -> str:
    return "".join(q.LIKE_ESCAPE + c if c in ("%", "_", q.LIKE_ESCAPE) else c for c in text)


def _json(data: Any, **headers: str) -> Response:
    return JSONResponse(data, headers=headers)


_LIST_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"headers": _PAGED_HEADERS},
    **MENDER_AUTH_ERRORS,
}


@router.get(
    V1,
    response_model=list[Deployment],
    responses=_LIST_RESPONSES,
    summary="Deployments, newest first (paged; Link, X-Total-Count)",
)
def list_v1(
    request: Request,
    caller: Reader,
    # (read by the query parser; listed for the OpenAPI document)
    status: RolloutStatusParam = None,
    search: SearchParam = None,
    created_after: SecondsParam = None,
    created_before: SecondsParam = None,
    page: PageParam = None,
    per_page: PerPageParam = None,
) -> Response:
    return _list(request, caller)


@router.get(
    V2,
    response_model=list[Deployment],
    responses=_LIST_RESPONSES,
    summary="Deployments (as v1; where pymenderio lists them)",
)
def list_v2(
    request: Request,
    caller: Reader,
    status: RolloutStatusParam = None,
    search: SearchParam = None,
    created_after: SecondsParam = None,
    created_before: SecondsParam = None,
    page: PageParam = None,
    per_page: PerPageParam = None,
    type: TypeParam = None,
) -> Response:
    return _list(request, caller)


@router.get(
    V1 + "/{rollout_id}",
    response_model=Deployment,
    responses=MENDER_AUTH_ERRORS,
    summary="A deployment",
)
def get_one(request: Request, rollout_id: RolloutId, caller: Reader) -> Response:
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        counts = repo.status_counts(s, [r.id])[r.id]
        return _json(views.deployment(s, r, repo.phases(s, r.id), counts))


def _device_status(pairs: q.QueryPairs) -> str | None:
    status = q.single_value(pairs, "status")
    if status is not None and status not in STATUSES:
        raise Validation(f"status: one of {', '.join(STATUSES)}")
    return status


@router.get(
    V1 + "/{rollout_id}/devices",
    response_model=list[Device],
    responses=MENDER_AUTH_ERRORS,
    summary="The devices of a deployment, with their statuses",
)
def devices(
    request: Request,
    rollout_id: RolloutId,
    caller: Reader,
    status: DeviceStatusParam = None,
) -> Response:
    status = _device_status(request.query_params.multi_items())
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        return _json(views.devices(s, caller.app.id, repo.devices(s, r.id, status=status)))


@router.get(
    V1 + "/{rollout_id}/devices/list",
    response_model=list[Device],
    responses={200: {"headers": _PAGED_HEADERS}, **MENDER_AUTH_ERRORS},
    summary="The devices of a deployment, paged (Link, X-Total-Count)",
)
def devices_page(
    request: Request,
    rollout_id: RolloutId,
    caller: Reader,
    status: DeviceStatusParam = None,
    page: PageParam = None,
    per_page: PerPageParam = None,
) -> Response:
    pairs = request.query_params.multi_items()
    status = _device_status(pairs)
    page_n, per_page_n = _paging(pairs)
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        rows = repo.devices(
            s, r.id, status=status, offset=(page_n - 1) * per_page_n, limit=per_page_n
        )
        total = repo.count_devices(s, r.id, status)
        items = views.devices(s, caller.app.id, rows)
    more = (page_n - 1) * per_page_n + len(rows) < total
    return _json(
        items, Link=_links(request, page_n, per_page_n, more), **{"X-Total-Count": str(total)}
    )


@router.get(
    V1 + "/{rollout_id}/device_list",
    response_model=list[str],
    responses=MENDER_AUTH_ERRORS,
    summary="The ids of a deployment's devices",
)
def device_list(request: Request, rollout_id: RolloutId, caller: Reader) -> Response:
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        return _json(repo.device_ids(s, r.id))


@router.get(
    V1 + "/{rollout_id}/devices/{device_id}/log",
    response_class=Response,
    responses={
        200: {
            "description": "The log, one ``time level message`` line per message",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **MENDER_AUTH_ERRORS,
    },
    summary="A device's deployment log, as text (404 when it stored none)",
)
def device_log(
    request: Request, rollout_id: RolloutId, device_id: DevicePath, caller: Reader
) -> Response:
    if not is_valid_id(device_id):
        raise NotFound("Deployment log was not found")
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        text = views.log_text(s, caller.app.id, r.id, device_id)
    return PlainTextResponse(text)


@router.get(
    V1 + "/{rollout_id}/statistics",
    response_model=DeploymentStatistics,
    responses=MENDER_AUTH_ERRORS,
    summary="How many devices of a deployment are in each status",
)
def statistics(request: Request, rollout_id: RolloutId, caller: Reader) -> Response:
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        return _json(views.statistics(repo.status_counts(s, [r.id])[r.id]))


@router.get(
    V1 + "/{rollout_id}/events",
    response_model=list[Event],
    responses=MENDER_AUTH_ERRORS,
    summary="This project's: a deployment's transitions, oldest first",
)
def events(
    request: Request,
    rollout_id: RolloutId,
    caller: Reader,
    after: AfterParam = None,
    limit: LimitParam = None,
) -> Response:
    """``after``: an event id; ``limit``: at most 1000."""
    pairs = request.query_params.multi_items()
    after_s = q.single_value(pairs, "after")
    limit_s = q.single_value(pairs, "limit")
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        rows = repo.events(
            s,
            r.id,
            after=0
            if after_s is None
            else q.parse_int("after", after_s, minimum=0, maximum=MAX_EVENT_ID),
            limit=MAX_EVENTS
            if limit_s is None
            else q.parse_int("limit", limit_s, minimum=1, maximum=MAX_EVENTS),
        )
        return _json(views.events(rows))


@router.put(
    V1 + "/{rollout_id}/status",
    status_code=204,
    response_class=Response,
    responses={**_NO_CONTENT, **MENDER_AUTH_ERRORS, **mender_errors(413, 422)},
    summary='Abort a deployment ({"status": "aborted"}; 422 once finished)',
)
def set_status(
    request: Request, rollout_id: RolloutId, caller: Aborter, body: StatusUpdate
) -> Response:
    service.abort(context(request), caller.app, rollout_id)
    return Response(status_code=204)


@router.delete(
    V1 + "/devices/{device_id}",
    status_code=204,
    response_class=Response,
    responses={**_NO_CONTENT, **MENDER_AUTH_ERRORS},
    summary="Take a device out of every deployment it has not finished",
)
def decommission(request: Request, device_id: DevicePath, caller: Aborter) -> Response:
    if not is_valid_id(device_id):
        raise NotFound("Device was not found")
    service.decommission(context(request), caller.app, device_id)
    return Response(status_code=204)

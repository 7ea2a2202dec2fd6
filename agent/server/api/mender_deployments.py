"""Mender's deployments (seed 003, ``/api/management/v1/deployments/deployments…``),
run by this server as rollouts; the list also under ``/api/management/v2/…``, where
``pymenderio`` reads it. Not in ``/openapi.json``: the seed is its document."""

# No ``from __future__ import annotations``: FastAPI reads the annotations.

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    model_validator,
)

from agent.server.api import query as q
from agent.server.api.auth import Caller, context
from agent.server.api.mender_auth import mender_require
from agent.server.db import rollouts as repo
from agent.server.errors import NotFound, Validation
from agent.server.service import rollout_views as views
from agent.server.service import rollouts as service
from agent.server.service.phases import MAX_PHASES, STATUSES, PhaseSpec
from agent.server.text import tree_problem
from agent.wire.protocol import is_valid_id

router = APIRouter(tags=["mender"], include_in_schema=False)

V1 = "/api/management/v1/deployments/deployments"
V2 = "/api/management/v2/deployments/deployments"
ROLLOUT_STATUSES = ("scheduled", "pending", "inprogress", "finished")
MAX_PER_PAGE = 500
MAX_EVENTS = 1000

Reader = Annotated[Caller, Depends(mender_require("rollouts", "get", read=True))]
Poster = Annotated[Caller, Depends(mender_require("rollouts", "post", read=False))]
Aborter = Annotated[Caller, Depends(mender_require("rollouts", "abort", read=False))]
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")
]
DeviceId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class PhaseIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    batch_size: StrictInt | None = None
    start_ts: AwareDatetime | None = None


class EdgeOptions(BaseModel):
    """This project's extension of ``NewDeployment`` (Mender's clients leave it out)."""

    model_config = ConfigDict(extra="forbid")

    #: Percent of the devices that finished installing whose failure stops the rollout.
    failure_threshold: Annotated[StrictInt | StrictFloat, Field(ge=0, le=100)] | None = None
    #: Whether a version that fails its health window, or an aborted one, is reverted.
    revert: StrictBool = True
    #: Seconds of the health window written into the devices' entries.
    health_window: Annotated[StrictInt, Field(ge=0, le=86400)] | None = None


class NewDeployment(BaseModel):
    """The seed's ``NewDeployment``, plus ``filter``/``dynamic``/``max_devices`` (as
    Mender's v2 has them), ``all_devices`` and this project's ``edge``. Other fields
    Mender's clients send (``force_installation``, …) are ignored."""

    model_config = ConfigDict(extra="ignore")

    name: Name
    artifact_name: Name
    devices: Annotated[list[DeviceId], Field(max_length=service.MAX_DEVICES)] | None = None
    all_devices: StrictBool = False
    filter: dict[str, Any] | None = None
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
        filter=body.filter,
        dynamic=body.dynamic,
        max_devices=body.max_devices,
        retries=body.retries,
        phases=[PhaseSpec(p.batch_size, p.start_ts) for p in body.phases or []],
        options=edge.model_dump(),
    )


@router.post(V1, status_code=201)
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
    return service.created_bound(q.parse_int(name, value, minimum=0, maximum=253402300799))


def _list(request: Request, caller: Caller) -> Response:
    pairs = request.query_params.multi_items()
    status = q.single_value(pairs, "status")
    if status is not None and status not in ROLLOUT_STATUSES:
        raise Validation(f"status: one of {', '.join(ROLLOUT_STATUSES)}")
    search = q.text_param(pairs, "search")
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
    from fastapi.responses import JSONResponse

    return JSONResponse(data, headers=headers)


@router.get(V1)
def list_v1(request: Request, caller: Reader) -> Response:
    return _list(request, caller)


@router.get(V2)
def list_v2(request: Request, caller: Reader) -> Response:
    return _list(request, caller)


@router.get(V1 + "/{rollout_id}")
def get_one(request: Request, rollout_id: str, caller: Reader) -> dict[str, Any]:
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        counts = repo.status_counts(s, [r.id])[r.id]
        return views.deployment(s, r, repo.phases(s, r.id), counts)


def _device_status(pairs: q.QueryPairs) -> str | None:
    status = q.single_value(pairs, "status")
    if status is not None and status not in STATUSES:
        raise Validation(f"status: one of {', '.join(STATUSES)}")
    return status


@router.get(V1 + "/{rollout_id}/devices")
def devices(request: Request, rollout_id: str, caller: Reader) -> list[dict[str, Any]]:
    status = _device_status(request.query_params.multi_items())
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        return views.devices(s, caller.app.id, repo.devices(s, r.id, status=status))


@router.get(V1 + "/{rollout_id}/devices/list")
def devices_page(request: Request, rollout_id: str, caller: Reader) -> Response:
    pairs = request.query_params.multi_items()
    status = _device_status(pairs)
    page, per_page = _paging(pairs)
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        rows = repo.devices(s, r.id, status=status, offset=(page - 1) * per_page, limit=per_page)
        total = repo.count_devices(s, r.id, status)
        items = views.devices(s, caller.app.id, rows)
    more = (page - 1) * per_page + len(rows) < total
    return _json(items, Link=_links(request, page, per_page, more), **{"X-Total-Count": str(total)})


@router.get(V1 + "/{rollout_id}/device_list")
def device_list(request: Request, rollout_id: str, caller: Reader) -> list[str]:
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        return repo.device_ids(s, r.id)


@router.get(V1 + "/{rollout_id}/devices/{device_id}/log")
def device_log(request: Request, rollout_id: str, device_id: str, caller: Reader) -> Response:
    if not is_valid_id(device_id):
        raise NotFound("Deployment log was not found")
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        text = views.log_text(s, caller.app.id, r.id, device_id)
    return PlainTextResponse(text)


@router.get(V1 + "/{rollout_id}/statistics")
def statistics(request: Request, rollout_id: str, caller: Reader) -> dict[str, int]:
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        return views.statistics(repo.status_counts(s, [r.id])[r.id])


@router.get(V1 + "/{rollout_id}/events")
def events(request: Request, rollout_id: str, caller: Reader) -> list[dict[str, Any]]:
    """This project's: the rollout's transitions, oldest first (``after``: an event id;
    ``limit``: at most 1000)."""
    pairs = request.query_params.multi_items()
    after = q.single_value(pairs, "after")
    limit = q.single_value(pairs, "limit")
    with context(request).db.transaction() as s:
        r = service.get(s, caller.app.id, rollout_id)
        rows = repo.events(
            s,
            r.id,
            after=0 if after is None else q.parse_int("after", after, minimum=0, maximum=2**62),
            limit=MAX_EVENTS
            if limit is None
            else q.parse_int("limit", limit, minimum=1, maximum=MAX_EVENTS),
        )
        return views.events(rows)


@router.put(V1 + "/{rollout_id}/status", status_code=204)
def set_status(
    request: Request, rollout_id: str, caller: Aborter, body: Annotated[Any, Body()] = None
) -> Response:
    if not isinstance(body, dict) or body.get("status") != "aborted":
        raise Validation('body: {"status": "aborted"} (the only status that can be set)')
    service.abort(context(request), caller.app, rollout_id)
    return Response(status_code=204)


@router.delete(V1 + "/devices/{device_id}", status_code=204)
def decommission(request: Request, device_id: str, caller: Aborter) -> Response:
    if not is_valid_id(device_id):
        raise NotFound("Device was not found")
    service.decommission(context(request), caller.app, device_id)
    return Response(status_code=204)

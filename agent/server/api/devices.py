"""Losant's Devices API (seed 004), and a device's own resource (get, patch, delete =
decommission, command)."""

from __future__ import annotations

from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Query, Request
from pydantic import WithJsonSchema
from sqlalchemy.exc import IntegrityError

from agent.server.api import query as q
from agent.server.api.auth import Caller, context, require
from agent.server.api.models import (
    AUTH_ERRORS,
    DeviceClass,
    DeviceCommand,
    DevicePatch,
    DevicePost,
    MultiDeviceCommand,
    Success,
    collection,
    errors,
)
from agent.server.api.params import (
    CALLBACK_URL_SCHEMA,
    DirectionParam,
    FlagParam,
    IdPath,
    PageParam,
    PerPageParam,
    TextParam,
    enum_schema,
    text_schema,
)
from agent.server.db import devices as repo
from agent.server.errors import Conflict, NotFound, Validation
from agent.server.service import devices as service
from agent.server.service import exports
from agent.wire.protocol import is_valid_id

router = APIRouter(tags=["devices"], responses=AUTH_ERRORS)
BASE = "/applications/{applicationId}/devices"
DEVICE_CLASSES = get_args(DeviceClass)


def known_device_id(device_id: str) -> str:
    """``device_id`` if it can name a device (an agent's id), else a 404 that does
    not quote it back (it may be anything: NUL, 10,000 characters)."""
    if not is_valid_id(device_id):
        raise NotFound("Device was not found")
    return device_id


@router.get(BASE, summary="Get: the devices of an application")
def get_devices(
    request: Request,
    caller: Annotated[Caller, Depends(require("devices", "get", read=True))],
    # (read by the query parser; listed for the OpenAPI document)
    sortField: Annotated[
        str | None, Query(), WithJsonSchema(enum_schema(list(repo.SORT_COLUMNS)))
    ] = None,
    sortDirection: DirectionParam = None,
    page: PageParam = None,
    perPage: PerPageParam = None,
    filterField: Annotated[str | None, Query(), WithJsonSchema(enum_schema(["name", ""]))] = None,
    filter: TextParam = None,
    deviceClass: Annotated[
        str | None, Query(), WithJsonSchema(enum_schema([*DEVICE_CLASSES, ""]))
    ] = None,
    excludeConnectionInfo: FlagParam = None,
) -> dict[str, Any]:
    pairs = request.query_params.multi_items()
    paging = q.parse_paging(pairs)
    sort = q.parse_sort(
        pairs, allowed=list(repo.SORT_COLUMNS), default_field="name", default_direction="asc"
    )
    field = q.single_value(pairs, "filterField") or "name"
    if field != "name":
        raise q.QueryError("filterField", "accepted values are: name")
    pattern = q.single_value(pairs, "filter")
    klass = q.single_value(pairs, "deviceClass") or None
    if klass is not None and klass not in DEVICE_CLASSES:
        raise q.QueryError("deviceClass", f"accepted values are: {', '.join(DEVICE_CLASSES)}")
    tags = [(t.key, t.value) for t in q.parse_tag_filter(pairs)]
    query = repo.DeviceQuery(
        name_like=q.glob_to_like(pattern) if pattern else None, device_class=klass, tags=tags
    )
    no_conn = q.parse_bool_param(pairs, "excludeConnectionInfo", default=False)
    ctx = context(request)
    with ctx.db.transaction() as s:
        rows, total = repo.search(
            s,
            caller.app.id,
            query,
            sort=sort.field,
            descending=sort.descending,
            page=paging.page,
            per_page=paging.per_page,
        )
        items = [exports.device_view(d) for d in rows]
    if no_conn:
        for item in items:
            item.pop("connectionInfo")
    return collection(
        items,
        total,
        paging,
        sort,
        caller.app.id,
        filterField=field if pattern else None,
        filter=pattern,
        deviceClass=klass,
    )


@router.post(BASE, status_code=201, responses=errors(409, 413), summary="Post: create a device")
def post_device(
    request: Request,
    body: DevicePost,
    caller: Annotated[Caller, Depends(require("devices", "post", read=False))],
) -> dict[str, Any]:
    ctx = context(request)
    try:
        with ctx.db.transaction() as s:
            dev = repo.create(
                s,
                caller.app.id,
                device_id=body.deviceId,
                name=body.name,
                description=body.description,
                tags=[{"key": t.key, "value": str(t.value)} for t in body.tags],
                attributes=[a.model_dump() for a in body.attributes],
                device_class=body.deviceClass,
                device_type=body.deviceType,
            )
            return exports.device_view(dev)
    except IntegrityError:
        # Two creates of one deviceId at once: the second one's insert loses the race.
        raise Conflict(f"device {body.deviceId} exists already") from None


@router.post(BASE + "/export", status_code=200, summary="Export: all device metadata (a job)")
def export_devices(
    request: Request,
    caller: Annotated[Caller, Depends(require("devices", "export", read=True))],
    email: Annotated[str | None, Query(), WithJsonSchema(text_schema(exports.MAX_EMAIL))] = None,
    callbackUrl: Annotated[str | None, Query(), WithJsonSchema(CALLBACK_URL_SCHEMA)] = None,
) -> dict[str, Any]:
    pairs = request.query_params.multi_items()
    email = q.text_param(pairs, "email", max_length=exports.MAX_EMAIL)
    callback = q.text_param(pairs, "callbackUrl", max_length=exports.MAX_CALLBACK_URL)
    job_id = exports.start_device_export(context(request), caller.app, email, callback)
    return {"success": True, "jobQueued": True, "jobId": job_id}


def _targets(request: Request, caller: Caller, body: MultiDeviceCommand) -> list[str]:
    if bool(body.deviceIds) == bool(body.deviceTags):
        raise Validation("give deviceIds or deviceTags (one of them)")
    ctx = context(request)
    with ctx.db.transaction() as s:
        if body.deviceIds:
            found = repo.get_many(s, caller.app.id, body.deviceIds)
            for device_id in body.deviceIds:
                dev = found.get(device_id)
                if dev is None or dev.decommissioned:
                    raise NotFound(f"Device {device_id} was not found")
            return list(dict.fromkeys(body.deviceIds))
        tags = [(t.key, str(t.value)) for t in body.deviceTags or ()]
        return repo.ids_with_tags(s, caller.app.id, tags)


@router.post(
    BASE + "/command",
    response_model=Success,
    responses=errors(413, 503),
    summary="Send Command to devices",
)
def command_devices(
    request: Request,
    body: MultiDeviceCommand,
    caller: Annotated[Caller, Depends(require("devices", "sendCommand", read=False))],
) -> Success:
    targets = _targets(request, caller, body)
    service.send_command(context(request), caller.app, targets, body.name, body.payload, body.time)
    return Success()


def _device(request: Request, caller: Caller, device_id: str) -> dict[str, Any]:
    ctx = context(request)
    with ctx.db.transaction() as s:
        dev = repo.get(s, caller.app.id, known_device_id(device_id))
        if dev is None:
            raise NotFound(f"Device {device_id} was not found")
        view = exports.device_view(dev)
        view["desired"] = dev.desired
        view["state"] = dev.state
        return view


@router.get(BASE + "/{deviceId}", summary="One device, with its desired and reported state")
def get_device(
    request: Request,
    deviceId: IdPath,
    caller: Annotated[Caller, Depends(require("device", "get", read=True))],
) -> dict[str, Any]:
    return _device(request, caller, deviceId)


@router.patch(
    BASE + "/{deviceId}", responses=errors(413), summary="Rename, describe or tag a device"
)
def patch_device(
    request: Request,
    deviceId: IdPath,
    body: DevicePatch,
    caller: Annotated[Caller, Depends(require("device", "patch", read=False))],
) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if body.name is not None:
        changes["name"] = body.name
    if body.description is not None:
        changes["description"] = body.description
    if body.tags is not None:
        changes["tags"] = [{"key": t.key, "value": str(t.value)} for t in body.tags]
    if body.deviceClass is not None:
        changes["device_class"] = body.deviceClass
    service.update(context(request), caller.app, known_device_id(deviceId), changes)
    return _device(request, caller, deviceId)


@router.delete(BASE + "/{deviceId}", summary="Decommission: remove its flows, stop targeting it")
def delete_device(
    request: Request,
    deviceId: IdPath,
    caller: Annotated[Caller, Depends(require("device", "delete", read=False))],
) -> Success:
    service.decommission(context(request), caller.app, known_device_id(deviceId))
    return Success()


@router.post(
    BASE + "/{deviceId}/command",
    response_model=Success,
    responses=errors(413, 503),
    summary="Send Command",
)
def command_device(
    request: Request,
    deviceId: IdPath,
    body: DeviceCommand,
    caller: Annotated[Caller, Depends(require("device", "sendCommand", read=False))],
) -> Success:
    _device(request, caller, deviceId)  # 404 for an unknown device
    service.send_command(
        context(request), caller.app, [deviceId], body.name, body.payload, body.time
    )
    return Success()

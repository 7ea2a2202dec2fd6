"""Losant's Edge Deployments (seeds 000/001) and Embedded Deployments (seed 002)."""

# No ``from __future__ import annotations`` here: the route annotations name the
# dependencies of their kind (local variables), so they are evaluated at definition.

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import WithJsonSchema

from agent.server.api import query as q
from agent.server.api.auth import Caller, context, is_object_id, require
from agent.server.api.models import (
    AUTH_ERRORS,
    DeploymentExport,
    DeploymentRelease,
    DeploymentRemove,
    DeploymentReplace,
    JobEnqueued,
    Success,
    collection,
    errors,
)
from agent.server.api.params import (
    DirectionParam,
    FlagParam,
    ObjectId,
    PageParam,
    PerPageParam,
    TextParam,
    enum_schema,
)
from agent.server.db import deployments as repo
from agent.server.errors import NotFound
from agent.server.service import deployments as service
from agent.server.service import exports

router = APIRouter(tags=["deployments"], responses=AUTH_ERRORS)
SORT_FIELDS = list(repo.SORT_COLUMNS)
EMBEDDED_SORT_FIELDS = ["id", "creationDate", "lastUpdated"]


def _list(request: Request, caller: Caller, kind: str) -> dict[str, Any]:
    pairs = request.query_params.multi_items()
    paging = q.parse_paging(pairs)
    sort = q.parse_sort(
        pairs,
        allowed=SORT_FIELDS if kind == "edge" else EMBEDDED_SORT_FIELDS,
        default_field="lastUpdated",
        default_direction="asc" if kind == "edge" else "desc",
    )
    filters = repo.DeploymentQuery(
        kind=kind,
        device_id=q.text_param(pairs, "deviceId") or None,
        flow_id=q.text_param(pairs, "flowId") or None,
        version=q.text_param(pairs, "version") or None,
        filter_empty=q.parse_bool_param(pairs, "filterEmpty", default=False),
    )
    ctx = context(request)
    with ctx.db.transaction() as s:
        rows, total = repo.search(
            s,
            caller.app.id,
            filters,
            sort=sort.field,
            descending=sort.descending,
            page=paging.page,
            per_page=paging.per_page,
        )
        items = [service.view(d, kind) for d in rows]
    return collection(
        items,
        total,
        paging,
        sort,
        caller.app.id,
        deviceId=filters.device_id,
        flowId=filters.flow_id,
        version=filters.version,
    )


def _one(request: Request, caller: Caller, kind: str, deployment_id: str) -> dict[str, Any]:
    ctx = context(request)
    with ctx.db.transaction() as s:
        dep = repo.get(s, caller.app.id, deployment_id) if is_object_id(deployment_id) else None
        if dep is None or dep.kind != kind:
            raise NotFound("Deployment was not found")
        return service.view(dep, kind, repo.attempts(s, dep.id))


def _routes(kind: str) -> None:
    resource = f"{kind}Deployments"
    fields = SORT_FIELDS if kind == "edge" else EMBEDDED_SORT_FIELDS
    base = f"/applications/{{applicationId}}/{kind}/deployments"

    @router.get(base, summary=f"Get: the {kind} deployments of an application")
    def get_all(
        request: Request,
        caller: Annotated[Caller, Depends(require(resource, "get", read=True))],
        # (read by the query parser; listed for the OpenAPI document)
        sortField: Annotated[str | None, Query(), WithJsonSchema(enum_schema(fields))] = None,
        sortDirection: DirectionParam = None,
        page: PageParam = None,
        perPage: PerPageParam = None,
        deviceId: TextParam = None,
        version: TextParam = None,
        filterEmpty: FlagParam = None,
        flowId: TextParam = None,
    ) -> dict[str, Any]:
        return _list(request, caller, kind)

    @router.get(base + "/{deploymentId}", summary=f"One {kind} deployment, with its attempts")
    def get_one(
        request: Request,
        deploymentId: ObjectId,
        caller: Annotated[Caller, Depends(require(resource[:-1], "get", read=True))],
    ) -> dict[str, Any]:
        return _one(request, caller, kind, deploymentId)

    @router.post(
        base + "/release",
        status_code=201,
        response_model=Success,
        responses=errors(413),
        summary="Release: a flow version to devices (blank version removes)",
    )
    def release(
        request: Request,
        body: DeploymentRelease,
        caller: Annotated[Caller, Depends(require(resource, "release", read=False))],
    ) -> Success:
        service.release(
            context(request), caller.app, kind, body.flowId, body.version, body.deviceIds
        )
        return Success()

    @router.post(
        base + "/remove",
        status_code=201,
        response_model=Success,
        responses=errors(413),
        summary="Remove: a flow from a device, from every device, or every flow",
    )
    def remove(
        request: Request,
        body: DeploymentRemove,
        caller: Annotated[Caller, Depends(require(resource, "remove", read=False))],
    ) -> Success:
        service.remove(context(request), caller.app, kind, body.flowId, body.deviceId)
        return Success()

    @router.post(
        base + "/replace",
        status_code=201,
        response_model=Success,
        responses=errors(413),
        summary="Replace: one version of a flow by another wherever it is desired",
    )
    def replace(
        request: Request,
        body: DeploymentReplace,
        caller: Annotated[Caller, Depends(require(resource, "replace", read=False))],
    ) -> Success:
        service.replace(
            context(request), caller.app, kind, body.flowId, body.oldVersion, body.newVersion
        )
        return Success()

    if kind == "embedded":

        @router.post(
            base + "/export",
            status_code=202,
            response_model=JobEnqueued,
            responses=errors(413),
            summary="Export: the compiled WASM a device currently runs (a job)",
        )
        async def export(
            request: Request,
            body: DeploymentExport,
            caller: Annotated[Caller, Depends(require(resource, "export", read=True))],
        ) -> JobEnqueued:
            ctx = context(request)
            job_id = await run_in_threadpool(
                exports.start_wasm_export, ctx, caller.app, body.deviceId, body.callbackUrl
            )
            return JobEnqueued(jobId=job_id)


_routes("edge")
_routes("embedded")

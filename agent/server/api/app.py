"""The FastAPI application: routers, Losant-shaped errors, body limits.

Every error is ``{"type", "message"}`` with Losant's status codes: 400 for a
malformed request (bad JSON, a field out of bounds, a bad query parameter), 401
without a valid token, 403 without the scope, 404 for an unknown application,
device, deployment or route, 409 for a conflict, 413 for a body over the limit.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.server.api import (
    deployments,
    devices,
    flows,
    jobs,
    mender_artifacts,
    mender_deployments,
    useradm,
)
from agent.server.api.params import JSON_VALUE_SCHEMA, with_json_values
from agent.server.api.query import QueryError
from agent.server.console import mount as mount_console
from agent.server.console import render as console
from agent.server.context import ServerContext
from agent.server.errors import ApiError, TooLarge

log = structlog.get_logger("agent.server.api")

#: Largest JSON body (a release to 10,000 devices is ~300 KiB).
MAX_JSON_BODY = 2 << 20
_HTTP_TYPES = {
    400: "Validation",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "RequestTooLarge",
    415: "UnsupportedMediaType",
}


#: Paths that take no Bearer token: signed downloads, and the login (basic auth).
PUBLIC_PATHS = ("/artifacts/", "/downloads/", "/api/management/v1/useradm/auth/")
#: A request id a client may choose (``X-MEN-RequestID``); anything else gets a new one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Mender's API lives under this path; its errors take Mender's shape.
MENDER_PATHS = "/api/management/"
#: The web console: its errors are pages.
CONSOLE_PATHS = ("/console/", "/console")


def error(status: int, type_: str, message: str) -> JSONResponse:
    return JSONResponse({"type": type_, "message": message}, status_code=status)


def mender_error(status: int, message: str, request_id: str | None = None) -> JSONResponse:
    """Mender's error body, ``{"error", "request_id"}``, with its ``X-MEN-RequestID``."""
    ok = request_id is not None and _REQUEST_ID.fullmatch(request_id) is not None
    rid = request_id if ok and request_id else uuid.uuid4().hex
    return JSONResponse(
        {"error": message, "request_id": rid},
        status_code=status,
        headers={"X-MEN-RequestID": rid},
    )


def api_error(request: Request | None, status: int, type_: str, message: str) -> Response:
    """An error in the shape of the API the request was made to (a page, for the
    web console's)."""
    if request is not None and request.url.path.startswith(CONSOLE_PATHS):
        return console.error_page(request, status, message)
    if request is not None and request.url.path.startswith(MENDER_PATHS):
        return mender_error(status, message, request.headers.get("x-men-requestid"))
    return error(status, type_, message)


class BodyLimit:
    """Counts a request's body as it is received and stops it past the limit (a
    missing or lying Content-Length included): uploads get the server's upload limit,
    everything else :data:`MAX_JSON_BODY`.

    A body that goes over the limit while it is read (chunked, or longer than its
    Content-Length said) is answered 413 here, whatever the route made of the
    interrupted read (FastAPI turns any error reading a body into a 400)."""

    def __init__(self, app: ASGIApp, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/")
        limit = self.upload_limit + (1 << 20) if multipart else MAX_JSON_BODY
        declared = headers.get(b"content-length", b"")
        too_large = (
            mender_error(413, f"body over {limit} bytes")
            if str(scope.get("path", "")).startswith(MENDER_PATHS)
            else error(413, "RequestTooLarge", f"body over {limit} bytes")
        )
        if declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)
            return
        seen = 0
        over = False
        started = False

        async def limited() -> Message:
            nonlocal seen, over
            if over:
                raise TooLarge(f"body over {limit} bytes")
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise TooLarge(f"body over {limit} bytes")
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:
                return  # the route's answer to a read cut short: 413 is sent instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except TooLarge:
            if not over:
                raise
        if over and not started:
            await too_large(scope, receive, send)


def validation_message(exc: RequestValidationError) -> str:
    """The first problem of a request that did not validate, on one bounded line."""
    err: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    return (f"{where}: {msg}" if where else msg)[:500]


class ServerApp(FastAPI):
    """FastAPI with the OpenAPI document this server really follows: errors are 400
    (FastAPI documents 422, which it never sends here) and every route but the
    signed artifact downloads takes a Bearer token."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            tidy_openapi(super().openapi())
        return self.openapi_schema or {}


def tidy_openapi(doc: dict[str, Any]) -> None:
    doc.update(with_json_values(doc))
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["JsonValue"] = JSON_VALUE_SCHEMA
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token of the application (Authorization: Bearer eat_…)",
        }
    }
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if "HTTPValidationError" in str(responses.get("422", "")):
                responses.pop("422")  # (FastAPI's default: this server answers 400)
            if not path.startswith(PUBLIC_PATHS):
                operation["security"] = [{"bearer": []}]


def create_app(ctx: ServerContext) -> FastAPI:
    app = ServerApp(
        title="edge-agent server",
        version=__version__,
        description="Losant's Edge/Embedded Deployments and Devices APIs for a "
        "self-hosted fleet of edge-agent devices.",
    )
    app.state.ctx = ctx
    for module in (
        deployments,
        devices,
        flows,
        jobs,
        mender_artifacts,
        mender_deployments,
        useradm,
    ):
        app.include_router(module.router)

    @app.exception_handler(ApiError)
    async def _api_error(r: Request, exc: ApiError) -> Response:
        return api_error(r, exc.status, exc.type, exc.message)

    @app.exception_handler(QueryError)
    async def _query_error(r: Request, exc: QueryError) -> Response:
        return api_error(r, 400, "Validation", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(r: Request, exc: RequestValidationError) -> Response:
        return api_error(r, 400, "Validation", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(r: Request, exc: StarletteHTTPException) -> Response:
        response = api_error(
            r, exc.status_code, _HTTP_TYPES.get(exc.status_code, "Error"), str(exc.detail)
        )
        response.headers.update(exc.headers or {})  # (a 405's Allow, a 416's Content-Range)
        return response

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.error("internal error", path=request.url.path, error=repr(exc), exc_info=exc)
        return api_error(request, 500, "InternalError", "internal server error (logged)")

    app.add_middleware(BodyLimit, upload_limit=ctx.cfg.max_upload)
    mount_console(app)  # (after: its headers are on BodyLimit's 413 too)
    return app

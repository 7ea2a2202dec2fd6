"""The FastAPI application: routers, Losant-shaped errors, body limits.

Every error is ``{"type", "message"}`` with Losant's status codes: 400 for a
malformed request (bad JSON, a field out of bounds, a bad query parameter), 401
without a valid token, 403 without the scope, 404 for an unknown application,
device, deployment or route, 409 for a conflict, 413 for a body over the limit.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.server.api import deployments, devices, flows, jobs
from agent.server.api.query import QueryError
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


def error(status: int, type_: str, message: str) -> JSONResponse:
    return JSONResponse({"type": type_, "message": message}, status_code=status)


class BodyLimit:
    """Counts a request's body as it is received and stops it past the limit (a
    missing or lying Content-Length included): uploads get the server's upload limit,
    everything else :data:`MAX_JSON_BODY`."""

    def __init__(self, app: ASGIApp, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/")
        limit = self.upload_limit + (1 << 20) if multipart else MAX_JSON_BODY
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await error(413, "RequestTooLarge", f"body over {limit} bytes")(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(f"body over {limit} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(
        title="edge-agent server",
        version=__version__,
        description="Losant's Edge/Embedded Deployments and Devices APIs for a "
        "self-hosted fleet of edge-agent devices.",
    )
    app.state.ctx = ctx
    for module in (deployments, devices, flows, jobs):
        app.include_router(module.router)

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.type, exc.message)

    @app.exception_handler(QueryError)
    async def _query_error(_r: Request, exc: QueryError) -> JSONResponse:
        return error(400, "Validation", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_r: Request, exc: RequestValidationError) -> JSONResponse:
        err: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        return error(400, "Validation", f"{where}: {err.get('msg', 'invalid request')}"[:500])

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, _HTTP_TYPES.get(exc.status_code, "Error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", path=request.url.path, error=repr(exc), exc_info=exc)
        return error(500, "InternalError", "internal server error (logged)")

    app.add_middleware(BodyLimit, upload_limit=ctx.cfg.max_upload)
    return app

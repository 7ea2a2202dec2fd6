"""Mender's API: useradm's login, so that ``mender-cli login`` works.

``POST /api/management/v1/useradm/auth/login`` with ``Authorization: Basic
base64(email:password)`` answers a login token (a JWT) as ``text/plain``; the token
is then a ``Bearer`` credential of Mender's API (:mod:`agent.server.api.mender_auth`).
Users are made with ``edge-agent server admin create-user``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse

from agent.server.api.auth import context
from agent.server.api.mender_auth import mender_caller
from agent.server.api.models import MenderError
from agent.server.service import users

router = APIRouter(tags=["mender"])
BASE = "/api/management/v1/useradm/auth"


#: Mender's error body in the OpenAPI document: the component the ``model`` of the
#: logout's errors makes (the login's answer is text, so FastAPI would put a model of
#: its errors under text/plain: they are JSON, named explicitly).
_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/MenderError"}}}


def _errors(*codes: int, json_ref: bool = False) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Bad request",
        401: "Wrong or missing credentials",
        404: "Not found",
        429: "Too many failed logins from this address lately: retry after Retry-After",
        503: "Too many logins at once: retry after Retry-After",
    }
    retry = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
    body: dict[str, Any] = {"content": _ERROR_JSON} if json_ref else {"model": MenderError}
    return {
        code: {"description": text[code], **body}
        | ({"headers": retry} if code in (429, 503) else {})
        for code in codes
    }


@router.post(
    f"{BASE}/login",
    response_class=PlainTextResponse,
    summary="Log in: a login token for Mender's API",
    description="Basic authentication (email:password of a user made with `edge-agent "
    "server admin create-user`). The answer is the token itself, as text (a JWT, valid "
    "for the server's `login_ttl_s`).",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **_errors(400, 401, 404, 429, 503, json_ref=True),
    },
)
async def login(request: Request) -> PlainTextResponse:
    # Bounded (users.guarded_login): the hash runs in a worker thread, at most a few
    # at once; a login waiting for its turn holds no thread.
    header = request.headers.get("authorization", "")
    address = request.client.host if request.client is not None else ""
    try:
        token = await users.guarded_login(context(request), header, address)
    except users.LoginBusy as exc:
        raise HTTPException(
            exc.status, exc.message, headers={"Retry-After": str(exc.retry_after)}
        ) from None
    return PlainTextResponse(token)


@router.post(
    f"{BASE}/logout",
    status_code=204,
    response_class=Response,
    summary="Log out (the token is not revoked)",
    description="Login tokens are stateless: logging out does not revoke one; it stays "
    "valid until it expires or its user is deleted.",
    responses=_errors(400, 401, 404),
    openapi_extra={"security": [{"bearer": []}]},
)
def logout(request: Request) -> Response:
    mender_caller(request)
    return Response(status_code=204)

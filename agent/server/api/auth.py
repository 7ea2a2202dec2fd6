"""Who is calling: the Bearer token, its application and its scopes.

``require(resource, action, read=…)`` is a route dependency: 401 without a valid
token, 404 for an application the token does not belong to (another application's
existence is not disclosed), 403 without one of the scopes the endpoint accepts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from agent.server.api.params import AppId
from agent.server.context import ServerContext
from agent.server.db import applications as apps_repo
from agent.server.db.models import Application
from agent.server.errors import Forbidden, NotFound, Unauthorized
from agent.server.scopes import accepted

#: The ids this server hands out (applications, deployments, jobs): 24 hex digits,
#: like Losant's. Anything else in their place is unknown without a database query
#: (which, for text PostgreSQL cannot hold such as a NUL, would fail).
OBJECT_ID = re.compile(r"[0-9a-f]{24}")


def is_object_id(value: str) -> bool:
    return OBJECT_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Caller:
    app: Application
    token_id: str
    scopes: frozenset[str]


def context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


def require(resource: str, action: str, *, read: bool) -> Callable[[Request, str], Caller]:
    allowed = accepted(resource, action, read=read)

    def dependency(request: Request, applicationId: AppId) -> Caller:
        caller = authenticate(request, applicationId)
        if not caller.scopes & allowed:
            raise Forbidden(
                f"This token may not call {resource}.{action}: it needs one of "
                + ", ".join(sorted(allowed))
            )
        return caller

    return dependency


def authenticate(request: Request, applicationId: str) -> Caller:
    """The caller of a request to ``applicationId``, whatever its scopes."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("Authorization: Bearer <token> is required")
    ctx = context(request)
    with ctx.db.transaction() as s:
        token = apps_repo.token_for_secret(s, secret.strip())
        if token is None:
            raise Unauthorized("Invalid or revoked token")
        app = apps_repo.get_application(s, applicationId) if is_object_id(applicationId) else None
        if app is None or token.application_id != app.id:
            raise NotFound("Application was not found")
        scopes = frozenset(token.scopes)
        token_id = token.id
    return Caller(app, token_id, scopes)

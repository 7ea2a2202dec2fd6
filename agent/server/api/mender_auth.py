"""Who is calling Mender's API: there is no application in its paths, so the
credential names it.

Two credentials are accepted as ``Authorization: Bearer …``:

- an API token of the application (``eat_…``), with this project's scopes for the
  Mender resources (``artifacts.*``, ``rollouts.*``, or ``all.Application`` and its
  ``.read`` form for reads; see :mod:`agent.server.scopes`);
- a login token (a JWT from ``POST /api/management/v1/useradm/auth/login``): a user
  of the application, who may do everything in it.

401 without a valid credential, 403 without the scope.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from agent.server.api.auth import Caller, context
from agent.server.db import applications as apps_repo
from agent.server.errors import Forbidden, Unauthorized
from agent.server.scopes import accepted

#: The scopes a logged-in user holds (the whole application).
USER_SCOPES = frozenset({"all.Application"})


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("Authorization: Bearer <token> is required")
    return secret.strip()


def mender_caller(request: Request) -> Caller:
    """The caller of a Mender API request, whatever its scopes."""
    secret = bearer(request)
    ctx = context(request)
    if secret.startswith(apps_repo.TOKEN_PREFIX):
        with ctx.db.transaction() as s:
            token = apps_repo.token_for_secret(s, secret)
            if token is None:
                raise Unauthorized("Invalid or revoked token")
            app = apps_repo.get_application(s, token.application_id)
            if app is None:
                raise Unauthorized("Invalid or revoked token")
            return Caller(app, token.id, frozenset(token.scopes))
    return login_caller(request, secret)


def login_caller(request: Request, secret: str) -> Caller:
    """The caller a login token (JWT) names; 401 if it is not one this server signed,
    has expired, or names a user that is gone."""
    from agent.server.service import users

    return users.caller_for_token(context(request), secret, USER_SCOPES)


def mender_require(resource: str, action: str, *, read: bool) -> Callable[[Request], Caller]:
    """A route dependency: the caller, if one of its scopes allows ``resource.action``."""
    allowed = accepted(resource, action, read=read)

    def dependency(request: Request) -> Caller:
        caller = mender_caller(request)
        if not caller.scopes & allowed:
            raise Forbidden(
                f"This token may not call {resource}.{action}: it needs one of "
                + ", ".join(sorted(allowed))
            )
        return caller

    return dependency

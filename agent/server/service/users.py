"""Users and their login tokens (Mender's ``useradm``). Not written yet: every login
token is refused."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.server.errors import Unauthorized

if TYPE_CHECKING:
    from agent.server.api.auth import Caller
    from agent.server.context import ServerContext


def caller_for_token(ctx: ServerContext, token: str, scopes: frozenset[str]) -> Caller:
    raise Unauthorized("Invalid or expired token")

"""What every console route needs: its context, its session, and a checked form."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.datastructures import FormData

from agent.server.context import ServerContext
from agent.server.errors import NotFound
from agent.wire.protocol import is_valid_id

from . import csrf, render, sessions
from .sessions import SignedIn

#: Fields and files a console form may have.
MAX_FIELDS, MAX_FILES = 64, 2


def context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


def signed_in(request: Request) -> SignedIn:
    return sessions.resolve(context(request), request)


Session = Annotated[SignedIn, Depends(signed_in)]


async def checked_form(request: Request, session: SignedIn, *, write: bool = True) -> FormData:
    """The POSTed form, once its CSRF token is the session's (403 otherwise), and,
    for a change, once the session may change things."""
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
    try:
        csrf.check(session.csrf, form.get(csrf.FIELD))
        if write:
            session.require_write()
    except Exception:
        await form.close()  # a refused upload leaves no spooled temporary file open
        raise
    return form


def known(value: str, what: str) -> str:
    """``value`` when it can be an id (a device's, a deployment's, a token's...),
    else a 404 that does not repeat it (it may hold a NUL, or be 10,000 characters)."""
    if not is_valid_id(value):
        raise NotFound(f"{what} was not found")
    return value


def text(form: FormData, name: str, limit: int = 1024) -> str:
    value = form.get(name)
    return value[:limit] if isinstance(value, str) else ""


def page(name: str, session: SignedIn, status: int = 200, **data: Any) -> HTMLResponse:
    return render.html(name, status, session=session, **data)


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)

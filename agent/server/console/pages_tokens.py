"""The application's API tokens: the list, a new one (its secret shown once), and
revoking one."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from agent.server.db import applications as repo
from agent.server.errors import NotFound, Validation
from agent.server.scopes import known_scopes

from .sessions import SignedIn
from .web import Session, checked_form, context, page, see_other, text

router = APIRouter(prefix="/console")


def _page(request: Request, session: SignedIn, new_secret: str | None = None) -> Response:
    with context(request).db.transaction() as s:
        rows = repo.tokens(s, session.app.id)
    return page("tokens.html", session, tokens=rows, scopes=known_scopes(), new_secret=new_secret)


@router.get("/tokens", response_class=HTMLResponse)
def tokens(request: Request, session: Session) -> Response:
    return _page(request, session)


@router.post("/tokens", response_class=HTMLResponse)
async def create(request: Request, session: Session) -> Response:
    form = await checked_form(request, session)
    name = text(form, "name", 256).strip()
    scopes = [v for v in form.getlist("scope") if isinstance(v, str)][:64]
    if not name:
        raise Validation("name: a name for the token is required")
    with context(request).db.transaction() as s:
        _, secret = repo.create_token(s, session.app.id, scopes, name)
    # The secret is in this answer only (never stored, never logged).
    return _page(request, session, new_secret=secret)


@router.post("/tokens/{token_id}/revoke")
async def revoke(request: Request, token_id: str, session: Session) -> Response:
    await checked_form(request, session)
    with context(request).db.transaction() as s:
        if not repo.revoke_token(s, session.app.id, token_id):
            raise NotFound("Token was not found")
    return see_other("/console/tokens")

"""The application's API tokens: the list, a new one (its secret shown once), and
revoking one.

Only a session signed in as a user manages tokens. A session signed in with a token
sees the list: were it allowed to make tokens, a leaked token could mint another
before it is revoked, and outlive its own revocation."""

from __future__ import annotations

import anyio.to_thread
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from agent.server.db import applications as repo
from agent.server.errors import Forbidden, NotFound, Validation
from agent.server.scopes import known_scopes
from agent.server.text import text_problem

from .sessions import SignedIn
from .web import Session, checked_form, context, known, page, see_other, text

log = structlog.get_logger("agent.server.console")
router = APIRouter(prefix="/console")
#: A token's name, as its column holds it.
MAX_NAME = 255


def _page(request: Request, session: SignedIn, new_secret: str | None = None) -> Response:
    with context(request).db.transaction() as s:
        rows = repo.tokens(s, session.app.id)
    manage = not session.read_only and session.by_user
    return page(
        "tokens.html",
        session,
        tokens=rows,
        scopes=known_scopes(),
        new_secret=new_secret,
        manage=manage,
    )


def _require_user(session: SignedIn) -> None:
    session.require_write()
    if not session.by_user:
        raise Forbidden("tokens are managed by a user: sign in with an email and a password")


@router.get("/tokens", response_class=HTMLResponse)
def tokens(request: Request, session: Session) -> Response:
    return _page(request, session)


def _create(request: Request, session: SignedIn, name: str, scopes: list[str]) -> str:
    _require_user(session)
    with context(request).db.transaction() as s:
        row, secret = repo.create_token(s, session.app.id, scopes, name)
        token_id = row.id
    log.info("console token created", application=session.app.id, by=session.who, token=token_id)
    return secret


@router.post("/tokens", response_class=HTMLResponse)
async def create(request: Request, session: Session) -> Response:
    form = await checked_form(request, session)
    name = text(form, "name", MAX_NAME + 1).strip()
    scopes = [v for v in form.getlist("scope") if isinstance(v, str)][:64]
    if not name:
        raise Validation("name: a name for the token is required")
    if len(name) > MAX_NAME:
        raise Validation(f"name: at most {MAX_NAME} characters")
    if (problem := text_problem(name)) is not None:
        raise Validation(f"name: {problem}")
    secret = await anyio.to_thread.run_sync(_create, request, session, name, scopes)
    # The secret is in this answer only (never stored, never logged). The answer is
    # not a redirect, so reloading it would post the form again (the browser asks).
    return await anyio.to_thread.run_sync(_page, request, session, secret)


def _revoke(request: Request, session: SignedIn, token_id: str) -> None:
    _require_user(session)
    with context(request).db.transaction() as s:
        if not repo.revoke_token(s, session.app.id, token_id):
            raise NotFound("Token was not found")
    log.info("console token revoked", application=session.app.id, by=session.who, token=token_id)


@router.post("/tokens/{token_id}/revoke")
async def revoke(request: Request, token_id: str, session: Session) -> Response:
    known(token_id, "Token")
    await checked_form(request, session)
    await anyio.to_thread.run_sync(_revoke, request, session, token_id)
    return see_other("/console/tokens")

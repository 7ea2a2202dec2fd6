"""Sign-in and sign-out."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response

from agent.server.errors import ApiError
from agent.server.service import users

from . import csrf, render, sessions
from .web import Session, checked_form, context, see_other, text

router = APIRouter(prefix="/console")
#: The sign-in form's own token lives this long (seconds).
LOGIN_FORM_S = 3600


def _login_page(request: Request, error: str | None = None, status: int = 200) -> Response:
    token = request.cookies.get(csrf.LOGIN_COOKIE) or ""
    if not token or len(token) > 128:
        token = csrf.new_token()
    response = render.html("login.html", status, session=None, csrf=token, error=error)
    sessions.set_cookie(context(request), response, csrf.LOGIN_COOKIE, token, LOGIN_FORM_S)
    return response


@router.get("/login")
def login_form(request: Request) -> Response:
    return _login_page(request)


@router.post("/login")
async def login(request: Request) -> Response:
    ctx = context(request)
    form = await request.form(max_files=0, max_fields=8)
    csrf.check(request.cookies.get(csrf.LOGIN_COOKIE), form.get(csrf.FIELD))
    token, email, password = text(form, "token", 256), text(form, "email", 256), ""
    raw = form.get("password")
    password = raw if isinstance(raw, str) else ""
    try:
        if token.strip():
            secret = await anyio.to_thread.run_sync(sessions.with_token, ctx, token)
        elif email.strip():
            address = request.client.host if request.client else "unknown"
            user_id, app_id = await users.guarded_verify(ctx, email, password, address)
            who = users.normalize_email(email)
            secret = await anyio.to_thread.run_sync(
                lambda: sessions.start(ctx, app_id, who, user_id=user_id)
            )
        else:
            return _login_page(request, "Give an API token, or an email and a password.", 400)
    except ApiError as exc:
        return _login_page(request, exc.message, exc.status)
    response = see_other("/console/")
    sessions.set_cookie(ctx, response, sessions.COOKIE, secret, sessions.MAX_S)
    response.delete_cookie(csrf.LOGIN_COOKIE, path=sessions.PATH)
    return response


@router.post("/logout")
async def logout(request: Request, session: Session) -> Response:
    await checked_form(request, session, write=False)
    await anyio.to_thread.run_sync(sessions.end, context(request), session)
    response = see_other("/console/login")
    response.delete_cookie(sessions.COOKIE, path=sessions.PATH)
    return response

"""Templates (Jinja2, autoescaped: data is never marked safe) and the console's
error pages."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from . import security

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def when(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def csrf_input(token: str) -> Markup:
    """The hidden field every POST form carries (the token escaped like any data)."""
    return Markup('<input type="hidden" name="csrf" value="{}">').format(token)


env.filters["when"] = when
env.globals["csrf_input"] = csrf_input


def html(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(env.get_template(name).render(**context), status_code=status)


def fragment(name: str, **context: Any) -> str:
    return env.get_template(name).render(**context)


def error_page(request: Request, status: int, message: str) -> Response:
    """A console error: to the sign-in for a request without a session (a GET; for
    htmx's requests, which would swap the sign-in page into a fragment, an
    ``HX-Redirect`` that takes the whole page there), else a page that says what went
    wrong. It carries the console's headers itself: a 500 is sent from outside every
    middleware."""
    response: Response
    if status == 401 and request.headers.get("hx-request") == "true":
        response = Response(status_code=401, headers={"HX-Redirect": "/console/login"})
    elif status == 401 and request.method in ("GET", "HEAD"):
        response = RedirectResponse("/console/login", status_code=303)
    else:
        response = html("error.html", status, code=status, message=message, session=None)
    security.apply(response.headers)
    return response

"""The web console: server-rendered pages under ``/console`` (docs/console.md).

Every page is signed in (:mod:`.sessions`) and reads the signed-in application's
data only, through the server's services; every POST form carries the session's
CSRF token (:mod:`.csrf`); every response has a strict Content-Security-Policy
(:mod:`.security`). Not part of the OpenAPI document."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .render import STATIC
from .security import ConsoleHeaders


def mount(app: FastAPI) -> None:
    from . import pages_artifacts, pages_auth, pages_deployments, pages_devices, pages_tokens

    for module in (pages_auth, pages_devices, pages_deployments, pages_artifacts, pages_tokens):
        app.include_router(module.router, include_in_schema=False)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
    app.add_middleware(ConsoleHeaders)

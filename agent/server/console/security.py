"""The console's response headers: a strict Content-Security-Policy (no inline
script or style: everything comes from ``/console/static``), no sniffing, no
referrer leaving the site, no framing, and pages never cached."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/console"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


def apply(headers: MutableHeaders) -> None:
    """The headers above, and ``no-store``, on a response made outside the middleware."""
    for name, value in HEADERS:
        headers[name.decode()] = value.decode()
    headers["cache-control"] = "no-store"


class ConsoleHeaders:
    """ASGI middleware: the headers above on every response under ``/console``, and
    ``Cache-Control: no-store`` on all but the static assets."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        static = path.startswith(PREFIX + "/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in {h for h, _ in HEADERS} and k.lower() != b"cache-control"
                ]
                headers.extend(HEADERS)
                headers.append(
                    (b"cache-control", b"public, max-age=3600" if static else b"no-store")
                )
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)

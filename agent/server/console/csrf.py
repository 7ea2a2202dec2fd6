"""CSRF protection of the console's forms.

A signed-in session has its own random token (``console_sessions.csrf``): every POST
form carries it as ``csrf`` and a POST without it, or with another, is refused 403.
The sign-in form has no session yet: it is protected by a double-submit cookie
(``edge_console_login``, a random value set by ``GET /console/login``, ``HttpOnly``
and ``SameSite=Strict``, which the form repeats); another site can neither read
that cookie nor have the browser send it along a cross-site POST."""

from __future__ import annotations

import hmac
import secrets

from agent.server.errors import Forbidden

FIELD = "csrf"
LOGIN_COOKIE = "edge_console_login"


class CsrfRefused(Forbidden):
    pass


def new_token() -> str:
    return secrets.token_urlsafe(32)


def check(expected: str | None, given: object) -> None:
    """403 unless ``given`` is ``expected`` (compared in constant time)."""
    if (
        not expected
        or not isinstance(given, str)
        or not given
        or len(given) > 128
        or not hmac.compare_digest(expected.encode(), given.encode())
    ):
        raise CsrfRefused("CSRF token missing or wrong: reload the page and try again")

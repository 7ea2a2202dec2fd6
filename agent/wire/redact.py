"""Secrets out of everything the agent says: the one place URLs are redacted.

An artifact URL may carry credentials (``https://user:token@host/…``) or a signed
query string (``?X-Amz-Signature=…``). The agent needs them to download, and never
repeats them: before a URL reaches a log line, an event, a state report or a
deployment log it is cut down to scheme, host and path (user-info dropped, a query
or fragment shown as ``?…``). Two choke points apply :func:`redact_text`:

- the structlog processor :func:`log_processor` (every log line, and so every line
  a deployment log captures), and
- :func:`agent.wire.protocol.dump` (every wire message the agent publishes: state,
  events, status, deployment logs).

Both are tested on all four outputs (tests/test_hostile.py).
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

#: A URL inside free text: scheme://, then up to white space or a quote.
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{0,15}://[^\s\"'<>`]*")
#: The longest URL shown (a long path is cut, marked with an ellipsis).
MAX_SHOWN = 400


def redact_url(url: str) -> str:
    """``url`` without user-info, query string or fragment (never raises)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url[:MAX_SHOWN]
    query_at = min((i for i in (rest.find("?"), rest.find("#")) if i != -1), default=len(rest))
    # Whatever stands before the last "@" (ahead of any query) may be user-info, even
    # with an unescaped "/" in a password: drop it (a path holding "@" is shown short).
    rest = rest[rest.rfind("@", 0, query_at) + 1 :]
    end = len(rest)
    for mark in "/?#":
        at = rest.find(mark)
        if at != -1:
            end = min(end, at)
    authority = rest[:end]
    tail = rest[end:]
    cut = min((i for i in (tail.find("?"), tail.find("#")) if i != -1), default=-1)
    path = tail if cut == -1 else tail[:cut]
    shown = f"{scheme}://{authority}{path}"
    if len(shown) > MAX_SHOWN:
        shown = shown[: MAX_SHOWN - 1] + "…"
    return f"{shown}?…" if cut != -1 else shown


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted by :func:`redact_url`."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_value(value: Any) -> Any:
    """A JSON-like value with every string in it (keys too) passed through
    :func:`redact_text`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_text(str(k)): redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def exception_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor after ``format_exc_info``: redact the traceback text (the
    other values were redacted by :func:`log_processor` already)."""
    text = event_dict.get("exception")
    if isinstance(text, str) and "://" in text:
        event_dict["exception"] = redact_text(text)
    return event_dict


def log_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redact every value of a log line that holds a URL."""
    for key, value in event_dict.items():
        if isinstance(value, str | int | float | bool) or value is None:
            if isinstance(value, str) and "://" in value:
                event_dict[key] = redact_text(value)
        elif key != "exc_info":
            text = str(value)
            if "://" in text:
                event_dict[key] = redact_text(text)
    return event_dict

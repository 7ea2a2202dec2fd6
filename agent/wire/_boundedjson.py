"""JSON from the wire, parsed once under explicit bounds.

Every JSON payload the agent takes from the broker (desired documents, commands) goes
through :func:`load`, which either returns a value that the rest of the agent can
hold, persist and serialise again, or raises :class:`~agent.errors.ProtocolError`
with a one-line reason. The bounds (documented in docs/protocol.md):

- size: the caller's ``max_bytes``;
- encoding: UTF-8 only (a leading BOM is tolerated); UTF-16/32 are refused;
- nesting: at most ``max_depth`` levels of arrays and objects;
- numbers: integers of at most :data:`MAX_INT_DIGITS` digits, finite floats with
  literals of at most :data:`MAX_NUMBER_CHARS` characters; ``NaN``, ``Infinity``
  and ``-Infinity`` (which Python's json accepts) are refused;
- strings (values and keys): well-formed Unicode text, so no lone UTF-16 surrogates
  (``"\\udfff"`` is valid JSON but cannot be written out again as UTF-8).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from agent.errors import ProtocolError

#: The deepest nesting of arrays and objects accepted, by default.
MAX_DEPTH = 32
#: Digits of the largest integer accepted (covers unsigned 64-bit integers).
MAX_INT_DIGITS = 20
#: Characters of the longest number literal accepted.
MAX_NUMBER_CHARS = 64

_SURROGATE = re.compile("[\ud800-\udfff]")


class _Refused(ValueError):
    """Raised from inside the json hooks; becomes a ProtocolError."""


def _refuse(reason: str) -> NoReturn:
    raise _Refused(reason)


def _parse_int(literal: str) -> int:
    digits = len(literal) - (literal[0] == "-")
    if digits > MAX_INT_DIGITS:
        _refuse(f"integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(literal)


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        _refuse(f"number literal of {len(literal)} characters (at most {MAX_NUMBER_CHARS})")
    value = float(literal)
    if not math.isfinite(value):
        _refuse(f"number {literal[:20]} is out of range")
    return value


def _parse_constant(name: str) -> NoReturn:
    _refuse(f"{name} is not JSON")


def _check_tree(value: Any, max_depth: int) -> None:
    """Depth and string content, iteratively (no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                _refuse("string holds a lone UTF-16 surrogate (not Unicode text)")
        elif isinstance(node, dict | list):
            if depth > max_depth:
                _refuse(f"nested deeper than {max_depth} levels")
            if isinstance(node, dict):
                for key, item in node.items():
                    if _SURROGATE.search(key):
                        _refuse("object key holds a lone UTF-16 surrogate (not Unicode text)")
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in node)


def load(payload: bytes, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``payload`` as bounded JSON; :class:`ProtocolError` names ``what`` was wrong."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what} is {len(payload)} bytes, over the {max_bytes} limit")
    try:
        text = payload.decode("utf-8-sig")  # a leading BOM is tolerated (RFC 8259)
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except _Refused as exc:
        raise ProtocolError(f"{what} refused: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"{what} refused: nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    try:
        _check_tree(value, max_depth)
    except _Refused as exc:
        raise ProtocolError(f"{what} refused: {exc}") from None
    return value

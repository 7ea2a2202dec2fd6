"""Client text that the server will not take: what its databases cannot store.

PostgreSQL refuses a NUL character in any text (even in a ``WHERE`` clause), both
drivers refuse a lone surrogate (``"\\ud800"`` is valid JSON, not valid UTF-8), and
PostgreSQL's ``json`` type refuses ``NaN`` and ``Infinity`` (which Python's JSON
parser accepts). Such input is a 400 up front rather than a 500 from the driver, on
SQLite and PostgreSQL alike, so the API behaves the same on both.
"""

from __future__ import annotations

import math
from typing import Any, Final

#: How deep a JSON value may nest (Losant's documents are a few levels deep; the
#: bound keeps every later ``json.dumps`` well inside Python's recursion limit).
MAX_DEPTH: Final = 32


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored, or None when it can."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (a lone surrogate)"
    return None


def tree_problem(value: Any, *, max_depth: int = MAX_DEPTH) -> str | None:
    """The first reason a parsed JSON value cannot be stored, as ``"where: why"``
    (a NUL or a lone surrogate in a string or key, a non-finite number, nesting
    deeper than ``max_depth``), or None. Iterative: any depth is safe to check."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > max_depth:
            return f"{where or 'body'}: nested deeper than {max_depth} levels"
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return f"{where or 'value'}: {problem}"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{where or 'value'}: not a finite number"
        elif isinstance(item, dict):
            for key, sub in item.items():
                name = str(key)
                problem = text_problem(name)
                if problem:
                    return f"{where or 'body'}: a key {problem}"
                stack.append((sub, f"{where}.{name}" if where else name, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend(
                (sub, f"{where}.{i}" if where else str(i), depth + 1) for i, sub in enumerate(item)
            )
    return None

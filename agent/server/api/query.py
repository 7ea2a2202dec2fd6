"""Losant-style query strings turned into typed values, or a one-line ``QueryError``.

Every function here is pure: it takes the query as a sequence of ``(key, value)``
string pairs, exactly what ``starlette.datastructures.QueryParams.multi_items()``
gives (repeated keys stay separate pairs), and returns typed values. Anything it
cannot accept raises :class:`QueryError` (a ``ValueError``) whose message is one
line naming the parameter; the API answers it with ``400 {"type": "Validation",
"message": str(error)}``.

What a client sends, for instance ``losant_rest``'s ``devices.get(applicationId=…,
sortField="name", sortDirection="desc", perPage=10, filterField="name",
filter="gw-*", excludeConnectionInfo=True, tagFilter=[{"key": "Floor", "value":
"2"}, {"key": "Serial"}])`` (shown decoded, one parameter a line)::

    GET /applications/APP/devices?_actions=false&_links=true&_embedded=true
        &sortField=name&sortDirection=desc&perPage=10
        &filterField=name&filter=gw-*
        &tagFilter[0][key]=Floor&tagFilter[0][value]=2&tagFilter[1][key]=Serial
        &excludeConnectionInfo=True

and what a route makes of it::

    pairs = request.query_params.multi_items()
    paging = parse_paging(pairs)                      # Paging(page=0, per_page=10)
    sort = parse_sort(pairs, allowed=("name", "id", "creationDate", "lastUpdated"),
                      default_field="name", default_direction="asc")
    tags = parse_tag_filter(pairs)                    # [TagFilter("Floor", "2"),
                                                      #  TagFilter("Serial", None)]
    like, esc = glob_to_like(single_value(pairs, "filter") or "*")
    slim = parse_bool_param(pairs, "excludeConnectionInfo", default=False)

Conventions:

* Booleans: ``true``/``1``/``yes`` and ``false``/``0``/``no``/empty, any case. The
  official Python client sends Python's ``True`` as the string ``True``.
* Integers: ASCII decimal digits only (no sign, no spaces, at most 20 of them),
  then range-checked.
* A parameter given twice (``page=1&page=2``) is an error, as in Losant, whose
  query parser turns it into an array that then fails validation.
* ``_actions``, ``_links`` and ``_embedded``, which ``losant_rest`` puts on every
  request, are accepted and ignored.
* Unknown parameters are ignored by default: each parser reads only its own keys.
  A route that wants to reject typos calls :func:`known_params`.
* Nested lists use the bracket form ``tagFilter[N][key]`` / ``tagFilter[N][value]``
  (see :func:`parse_tag_filter`).
* Text that a database cannot store (NUL, lone surrogates) is rejected up front
  rather than failing later in the driver.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

__all__ = [
    "CLIENT_PARAMS",
    "LIKE_ESCAPE",
    "MAX_PAGE",
    "MAX_TAG_FILTERS",
    "MAX_TEXT_LENGTH",
    "Paging",
    "QueryError",
    "QueryPairs",
    "Sort",
    "TagFilter",
    "glob_to_like",
    "known_params",
    "parse_bool",
    "parse_bool_param",
    "parse_int",
    "parse_paging",
    "parse_sort",
    "parse_tag_filter",
    "single_value",
    "text_param",
]

QueryPairs: TypeAlias = Sequence[tuple[str, str]]
"""A query as ``(key, value)`` pairs, in order, repeated keys kept apart."""

CLIENT_PARAMS: Final = frozenset({"_actions", "_links", "_embedded"})
"""Sent by ``losant_rest`` on every request (``_actions=false&_links=true&_embedded=true``)."""

MAX_PAGE: Final = 10**6
MAX_TAG_FILTERS: Final = 100
MAX_TEXT_LENGTH: Final = 255
LIKE_ESCAPE: Final = "\\"

_MAX_DIGITS: Final = 20
_SHOWN: Final = 40  # characters of a rejected value quoted back in a message
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no", ""})
_DIGITS: Final = re.compile(rf"[0-9]{{1,{_MAX_DIGITS}}}")
_TAG_PARAM: Final = re.compile(r"tagFilter\[([0-9]{1,6})\]\[(key|value)\]")
# Losant's Device Tag Filter schema: "key" matches ^[0-9a-zA-Z_-]{1,255}$, "value"
# is a string of 1 to 255 characters, and either may be left out.
_TAG_KEY: Final = re.compile(r"[0-9a-zA-Z_-]{1,255}")


class QueryError(ValueError):
    """A query parameter that cannot be accepted; ``str()`` is one line naming it."""

    def __init__(self, param: str, detail: str) -> None:
        self.param = param
        self.detail = detail
        super().__init__(f"{param}: {detail}")


def _shown(text: str) -> str:
    """``text`` quoted for a message: one line (``repr`` escapes controls), bounded."""
    if len(text) <= _SHOWN:
        return repr(text)
    return repr(text[:_SHOWN]) + "…"


def _param_name(key: str) -> str:
    """A client-supplied parameter name made safe to use as ``QueryError.param``."""
    if key.isprintable() and len(key) <= _SHOWN:
        return key
    return _shown(key)


def _check_text(name: str, value: str, *, max_length: int = MAX_TEXT_LENGTH) -> None:
    if len(value) > max_length:
        raise QueryError(name, f"longer than {max_length} characters")
    if "\x00" in value:
        raise QueryError(name, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise QueryError(name, "is not valid Unicode text") from None


# ------------------------------------------------------------------ scalars
def parse_bool(name: str, value: str) -> bool:
    """``true``/``1``/``yes`` → True; ``false``/``0``/``no``/empty → False; any case."""
    if len(value) <= 5 and value.isascii():
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise QueryError(name, f"expected true or false, got {_shown(value)}")


def parse_int(name: str, value: str, *, minimum: int, maximum: int) -> int:
    """ASCII decimal digits (at most 20, no sign or spaces) within ``[minimum, maximum]``."""
    if _DIGITS.fullmatch(value) is not None:
        number = int(value)
        if minimum <= number <= maximum:
            return number
    raise QueryError(name, f"expected an integer from {minimum} to {maximum}, got {_shown(value)}")


def single_value(pairs: QueryPairs, name: str) -> str | None:
    """The value of ``name``, None when absent; QueryError when given more than once."""
    found: str | None = None
    for key, value in pairs:
        if key == name:
            if found is not None:
                raise QueryError(name, "given more than once")
            found = value
    return found


def text_param(pairs: QueryPairs, name: str, *, max_length: int = MAX_TEXT_LENGTH) -> str | None:
    """The text parameter ``name`` (None when absent), one that a database can store:
    at most ``max_length`` characters, no NUL, valid Unicode."""
    value = single_value(pairs, name)
    if value is not None:
        _check_text(name, value, max_length=max_length)
    return value


def parse_bool_param(pairs: QueryPairs, name: str, *, default: bool) -> bool:
    """The boolean parameter ``name`` (see :func:`parse_bool`), ``default`` when absent."""
    value = single_value(pairs, name)
    return default if value is None else parse_bool(name, value)


# ------------------------------------------------------------------ paging
@dataclass(frozen=True, slots=True)
class Paging:
    """Losant's ``page`` (0-based) and ``perPage``."""

    page: int
    per_page: int

    @property
    def offset(self) -> int:
        return self.page * self.per_page


def parse_paging(
    pairs: QueryPairs, *, default_per_page: int = 1000, max_per_page: int = 10000
) -> Paging:
    """``page`` (default 0, at most 10**6) and ``perPage`` (default 1000, 1 to ``max_per_page``)."""
    if not 1 <= default_per_page <= max_per_page:
        raise ValueError(f"default_per_page {default_per_page} is not in 1..{max_per_page}")
    page = single_value(pairs, "page")
    per_page = single_value(pairs, "perPage")
    return Paging(
        page=0 if page is None else parse_int("page", page, minimum=0, maximum=MAX_PAGE),
        per_page=default_per_page
        if per_page is None
        else parse_int("perPage", per_page, minimum=1, maximum=max_per_page),
    )


# ------------------------------------------------------------------ sorting
@dataclass(frozen=True, slots=True)
class Sort:
    """Losant's ``sortField`` and ``sortDirection``."""

    field: str
    descending: bool

    @property
    def direction(self) -> Literal["asc", "desc"]:
        """As Losant echoes it in a collection's ``sortDirection``."""
        return "desc" if self.descending else "asc"


def parse_sort(
    pairs: QueryPairs,
    *,
    allowed: Sequence[str],
    default_field: str,
    default_direction: Literal["asc", "desc"],
) -> Sort:
    """``sortField`` (one of ``allowed``, exact case) and ``sortDirection`` (asc/desc, any case)."""
    if default_field not in allowed:
        raise ValueError(f"default sort field {default_field!r} is not in {list(allowed)}")
    if default_direction not in ("asc", "desc"):
        raise ValueError(f"default sort direction {default_direction!r} is not asc or desc")
    field = single_value(pairs, "sortField")
    if field is None:
        field = default_field
    elif field not in allowed:
        raise QueryError(
            "sortField", f"got {_shown(field)}; accepted values are: {', '.join(allowed)}"
        )
    direction = single_value(pairs, "sortDirection")
    if direction is None:
        direction = default_direction
    elif direction.lower() not in ("asc", "desc"):
        raise QueryError("sortDirection", f"expected asc or desc, got {_shown(direction)}")
    return Sort(field=field, descending=direction.lower() == "desc")


# ------------------------------------------------------------------ tag filters
@dataclass(frozen=True, slots=True)
class TagFilter:
    """One tag pair to match; a missing key or value matches any (never both missing)."""

    key: str | None
    value: str | None


def parse_tag_filter(pairs: QueryPairs) -> list[TagFilter]:
    """``tagFilter[N][key]`` / ``tagFilter[N][value]`` pairs as filters, in order of N.

    N is a non-negative integer (gaps allowed, at most 100 distinct N). Following
    Losant's Device Tag Filter schema, a key matches ``[0-9a-zA-Z_-]{1,255}`` and a
    value has 1 to 255 characters; each is optional but not both. A bare
    ``tagFilter=…`` is rejected: neither ``losant_rest`` (whose ``flatten_params``
    always produces the bracket form) nor Losant's documentation (whose example is
    ``tagFilter[0][key]=Floor&tagFilter[0][value]=2&tagFilter[1][key]=Serial``; JSON
    is used only by the separate ``query`` parameter) sends tag filters as JSON, so
    that form is not accepted. Any other key starting ``tagFilter[`` is an error too.
    """
    slots: dict[int, dict[str, str]] = {}
    for raw_key, value in pairs:
        if raw_key != "tagFilter" and not raw_key.startswith("tagFilter["):
            continue
        match = _TAG_PARAM.fullmatch(raw_key)
        if match is None:
            raise QueryError(
                _param_name(raw_key),
                "expected tagFilter[N][key]=…&tagFilter[N][value]=… with N a non-negative integer",
            )
        index, part = int(match.group(1)), match.group(2)
        name = f"tagFilter[{index}][{part}]"
        slot = slots.get(index)
        if slot is None:
            if len(slots) >= MAX_TAG_FILTERS:
                raise QueryError("tagFilter", f"more than {MAX_TAG_FILTERS} tag filters")
            slot = slots[index] = {}
        if part in slot:
            raise QueryError(name, "given more than once")
        if part == "key":
            if _TAG_KEY.fullmatch(value) is None:
                raise QueryError(
                    name,
                    f"expected 1 to {MAX_TEXT_LENGTH} of the characters 0-9 a-z A-Z _ -, "
                    f"got {_shown(value)}",
                )
        else:
            if value == "":
                raise QueryError(name, "is empty (leave it out to match any value)")
            _check_text(name, value)
        slot[part] = value
    return [
        TagFilter(key=slots[index].get("key"), value=slots[index].get("value"))
        for index in sorted(slots)
    ]


# ------------------------------------------------------------------ globbing
def glob_to_like(
    pattern: str, *, name: str = "filter", max_length: int = MAX_TEXT_LENGTH
) -> tuple[str, str]:
    """A Losant ``filter`` glob as ``(like_pattern, escape_char)`` for SQL ``LIKE``.

    Losant documents ``filter`` only as "Supports globbing", with the example
    ``filter=my * device``; it says nothing about ``?`` or ``[...]``. So only ``*``
    is a wildcard (any run of characters, possibly empty); every other character,
    ``?`` and ``[`` included, matches itself. ``%``, ``_`` and the escape character
    (a backslash) are escaped, so ``column.like(like, escape=esc)`` in SQLAlchemy
    (``LIKE :like ESCAPE :esc`` in SQL) matches exactly the strings the glob does,
    as a whole (there is no implicit leading or trailing ``*``).

    Case: the pattern is as case-sensitive as the operator the caller uses (SQLite's
    ``LIKE`` folds ASCII case by default, PostgreSQL's does not; ``ilike`` folds).
    An empty glob matches only the empty string: Losant treats a blank ``filter`` as
    "no filtering", and that decision belongs to the caller.
    """
    _check_text(name, pattern, max_length=max_length)
    out: list[str] = []
    for char in pattern:
        if char == "*":
            if not out or out[-1] != "%":  # "**" means what "*" means
                out.append("%")
        elif char in ("%", "_", LIKE_ESCAPE):
            out.append(LIKE_ESCAPE + char)
        else:
            out.append(char)
    return "".join(out), LIKE_ESCAPE


# ------------------------------------------------------------------ strictness
def known_params(pairs: Iterable[tuple[str, str]], allowed: AbstractSet[str]) -> None:
    """Reject a parameter outside ``allowed``: an opt-in, since parsers ignore unknown keys.

    Always accepted: ``_actions``, ``_links`` and ``_embedded`` (sent by
    ``losant_rest`` on every call), and, when ``"tagFilter"`` is allowed, any key
    starting ``tagFilter[`` (their shape is :func:`parse_tag_filter`'s to check).
    """
    tags = "tagFilter" in allowed
    for key, _ in pairs:
        if key in allowed or key in CLIENT_PARAMS or (tags and key.startswith("tagFilter[")):
            continue
        accepted = ", ".join(sorted(allowed)) or "none"
        raise QueryError(
            _param_name(key), f"unknown query parameter; accepted parameters are: {accepted}"
        )

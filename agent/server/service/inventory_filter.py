"""Mender's inventory filter (``{"terms": [{"scope", "attribute", "type", "value"}]}``)
over this server's devices: parsed once (a malformed filter is a 400), then matched
against a device's attributes. Pure: no I/O.

What a term can name:

=========================  ==================================================
scope                      attributes
=========================  ==================================================
``inventory``/``identity`` ``id``, ``name``, ``device_type``, ``agent_version``,
                           ``online`` (a boolean)
``tags``                   any tag key of the device (its value, a string)
=========================  ==================================================

Operators (a device matches when every term matches): ``$eq``, ``$ne`` (a scalar),
``$in``, ``$nin`` (an array of strings or of numbers, not mixed), ``$exists`` (a
boolean), ``$gt``, ``$gte``, ``$lt``, ``$lte`` (a number or a string, compared only
with an attribute of the same kind). As in MongoDB, whose operators these are, a
missing attribute matches ``$ne`` and ``$nin`` and nothing else but ``$exists:
false``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

SCOPES = ("inventory", "identity", "tags")
ATTRIBUTES = ("id", "name", "device_type", "agent_version", "online")
OPERATORS = ("$eq", "$ne", "$in", "$nin", "$exists", "$gt", "$gte", "$lt", "$lte")
MAX_TERMS = 32
MAX_VALUES = 1000
MAX_TEXT = 1024

Attributes = Mapping[tuple[str, str], Any]


class FilterError(ValueError):
    """A filter that cannot be used (a 400)."""


@dataclass(frozen=True)
class Term:
    scope: str
    attribute: str
    op: str
    value: Any


def parse(data: Any) -> list[Term]:
    """The terms of an inline filter; raises :class:`FilterError` naming the problem."""
    if not isinstance(data, dict):
        raise FilterError("filter: an object with terms")
    terms = data.get("terms")
    if not isinstance(terms, list) or not terms:
        raise FilterError("filter.terms: at least one term (saved filters are not supported)")
    if len(terms) > MAX_TERMS:
        raise FilterError(f"filter.terms: at most {MAX_TERMS}")
    return [_term(i, t) for i, t in enumerate(terms)]


def _term(i: int, t: Any) -> Term:
    where = f"filter.terms[{i}]"
    if not isinstance(t, dict):
        raise FilterError(f"{where}: an object with scope, attribute, type and value")
    scope, attribute, op = t.get("scope"), t.get("attribute"), t.get("type")
    if scope not in SCOPES:
        raise FilterError(f"{where}.scope: one of {', '.join(SCOPES)}")
    if not isinstance(attribute, str) or not 0 < len(attribute) <= MAX_TEXT:
        raise FilterError(f"{where}.attribute: a name")
    if scope != "tags" and attribute not in ATTRIBUTES:
        raise FilterError(f"{where}.attribute: one of {', '.join(ATTRIBUTES)} in scope {scope}")
    if op not in OPERATORS:
        raise FilterError(f"{where}.type: one of {', '.join(OPERATORS)}")
    if "value" not in t:
        raise FilterError(f"{where}.value: required")
    return Term(scope, attribute, op, _value(where, op, t["value"]))


def _scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_TEXT
    return isinstance(value, bool | int | float)


def _value(where: str, op: str, value: Any) -> Any:
    if op == "$exists":
        if not isinstance(value, bool):
            raise FilterError(f"{where}.value: true or false for $exists")
        return value
    if op in ("$in", "$nin"):
        if not isinstance(value, list) or len(value) > MAX_VALUES:
            raise FilterError(f"{where}.value: an array (at most {MAX_VALUES}) for {op}")
        kinds = {_kind(v) for v in value}
        if None in kinds or len(kinds) > 1 or not all(_scalar(v) for v in value):
            raise FilterError(f"{where}.value: strings or numbers, not mixed")
        return tuple(value)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if _kind(value) is None or not _scalar(value):
            raise FilterError(f"{where}.value: a number or a string for {op}")
        return value
    if not _scalar(value):
        raise FilterError(f"{where}.value: a string, a number or a boolean for {op}")
    return value


def _kind(value: Any) -> str | None:
    """ "str" or "num" (booleans are neither: they only compare equal)."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "num"
    return None


class DeviceLike(Protocol):
    """What the filter reads of a device: its row, or a row of just these columns."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def device_type(self) -> str | None: ...
    @property
    def agent_version(self) -> str | None: ...
    @property
    def online(self) -> bool: ...
    @property
    def tags(self) -> list[Any]: ...


def attributes(dev: DeviceLike) -> dict[tuple[str, str], Any]:
    """A device's attributes as the filter names them (None values left out)."""
    inv = {
        "id": dev.id,
        "name": dev.name,
        "device_type": dev.device_type,
        "agent_version": dev.agent_version,
        "online": bool(dev.online),
    }
    out: dict[tuple[str, str], Any] = {}
    for name, value in inv.items():
        if value is not None:
            out[("inventory", name)] = value
            out[("identity", name)] = value
    for tag in dev.tags or []:
        if isinstance(tag, dict) and isinstance(tag.get("key"), str):
            out[("tags", tag["key"])] = str(tag.get("value", ""))
    return out


def matches(terms: list[Term], attrs: Attributes) -> bool:
    return all(_matches(t, attrs) for t in terms)


def _matches(t: Term, attrs: Attributes) -> bool:
    key = (t.scope, t.attribute)
    present = key in attrs
    if t.op == "$exists":
        return present is t.value
    if not present:
        return t.op in ("$ne", "$nin")
    have = attrs[key]
    if t.op == "$eq":
        return _equal(have, t.value)
    if t.op == "$ne":
        return not _equal(have, t.value)
    if t.op == "$in":
        return any(_equal(have, v) for v in t.value)
    if t.op == "$nin":
        return not any(_equal(have, v) for v in t.value)
    if _kind(have) is None or _kind(have) != _kind(t.value):
        return False
    if t.op == "$gt":
        return bool(have > t.value)
    if t.op == "$gte":
        return bool(have >= t.value)
    if t.op == "$lt":
        return bool(have < t.value)
    return bool(have <= t.value)


def _equal(a: Any, b: Any) -> bool:
    """Equal and of the same kind (``True`` is not ``1``)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b

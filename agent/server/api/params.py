"""How the OpenAPI document describes ids, query parameters and free JSON, exactly as
the server accepts them (so that a client, or a fuzzer, generating from the document
sends what the server takes, and what the document rules out is what it refuses).

Query parameters are declared as text and parsed by :mod:`agent.server.api.query`
(Losant's forms: ``True``/``1``/``yes``, any-case sort direction, a parameter given
twice is an error); these annotations only tell the document what that parser takes.
Path ids are documented with their shape but not validated by FastAPI: an id of the
wrong shape is unknown (404), as in Losant, not malformed (400).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final

from fastapi import Path, Query
from pydantic import WithJsonSchema

from agent.server.api.query import MAX_PAGE, MAX_TEXT_LENGTH

#: No NUL: what PostgreSQL cannot store (lone surrogates cannot be written in
#: well-formed UTF-8 JSON or URLs, so the document need not exclude them).
NO_NUL: Final = r"^[^\x00]*$"
#: An agent's device or flow id: ``[A-Za-z0-9._-]{1,64}``, not dots alone.
ID_PATTERN: Final = r"^[A-Za-z0-9._-]*[A-Za-z0-9_-][A-Za-z0-9._-]*$"
ID_SCHEMA: Final[dict[str, Any]] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "pattern": ID_PATTERN,
}
OBJECT_ID_SCHEMA: Final[dict[str, Any]] = {"type": "string", "pattern": "^[0-9a-f]{24}$"}
JSON_VALUE_REF: Final[dict[str, Any]] = {"$ref": "#/components/schemas/JsonValue"}
#: Where a model's schema says "any JSON": pydantic cannot hold a reference to a
#: schema it did not make, so the models carry this marker and
#: :func:`with_json_values` puts the reference in place in the finished document.
JSON_VALUE_MARK: Final[dict[str, Any]] = {"x-json-value": True}
#: Any JSON without NUL in its strings or keys (the body checks of
#: :mod:`agent.server.text` also bound its depth to 32 levels).
JSON_VALUE_SCHEMA: Final[dict[str, Any]] = {
    "description": "Any JSON value without NUL characters, nested at most 32 levels",
    "anyOf": [
        {"type": "string", "pattern": NO_NUL},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": JSON_VALUE_REF},
        {
            "type": "object",
            "propertyNames": {"pattern": NO_NUL},
            "additionalProperties": JSON_VALUE_REF,
        },
    ],
}


#: An export's callbackUrl, as documented (the server parses it with httpx: http or
#: https, a host, printable, at most 2048 characters; this is a plain subset).
CALLBACK_URL_SCHEMA: Final[dict[str, Any]] = {
    "type": "string",
    "maxLength": 2048,
    "pattern": r"^https?://[a-z0-9]+(\.[a-z0-9]+)*(:[1-9][0-9]{0,3})?(/[A-Za-z0-9._~/-]*)?$",
}


def with_json_values(node: Any) -> Any:
    """``node`` (an OpenAPI document, or part of one) with every
    :data:`JSON_VALUE_MARK` replaced by :data:`JSON_VALUE_REF`."""
    if isinstance(node, dict) and node.get("x-json-value") is True:
        # (pydantic may have added a title beside the mark: it stays.)
        return {**{k: v for k, v in node.items() if k != "x-json-value"}, **JSON_VALUE_REF}
    if isinstance(node, dict):
        return {key: with_json_values(value) for key, value in node.items()}
    if isinstance(node, list):
        return [with_json_values(value) for value in node]
    return node


def any_case(*words: str) -> str:
    """A pattern matching exactly ``words``, in any letter case."""
    alternatives = (
        "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in word)
        for word in words
    )
    return "^(" + "|".join(alternatives) + ")$"


def text_schema(max_length: int = MAX_TEXT_LENGTH) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length, "pattern": NO_NUL}


def enum_schema(values: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


# Path ids.
AppId = Annotated[str, Path(), WithJsonSchema(OBJECT_ID_SCHEMA)]
ObjectId = Annotated[str, Path(), WithJsonSchema(OBJECT_ID_SCHEMA)]
IdPath = Annotated[str, Path(), WithJsonSchema(ID_SCHEMA)]
Sha256Path = Annotated[str, Path(), WithJsonSchema({"type": "string", "pattern": "^[0-9a-f]{64}$"})]

# Query parameters (parsed by agent.server.api.query).
PageParam = Annotated[
    str | None, Query(), WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_PAGE})
]
PerPageParam = Annotated[
    str | None, Query(), WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 10_000})
]
DirectionParam = Annotated[
    str | None, Query(), WithJsonSchema({"type": "string", "pattern": any_case("asc", "desc")})
]
FlagParam = Annotated[
    str | None,
    Query(),
    WithJsonSchema(
        {"type": "string", "pattern": any_case("true", "false", "yes", "no", "1", "0", "")}
    ),
]
TextParam = Annotated[str | None, Query(), WithJsonSchema(text_schema())]

"""Schemathesis against the server's own OpenAPI document, shared by the fuzz of
Losant's routes (test_server_openapi.py) and of Mender's (test_mender_openapi.py).

Every operation gets requests generated from the document, valid ones and invalid
ones, with a valid ``all.Application`` token and real ids put in place of the
generated ones (a random id would only ever meet a 404). The server must never
answer 5xx, must answer with a status, content type, headers and body the document
declares, must accept what the document says is valid (a 2xx, or 401/403/404/409/422
for a well-formed request about something unknown, taken or in use) and refuse what
it says is invalid (4xx).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    positive_data_acceptance,
]
EMPTY_MODULE = b"\0asm\x01\0\0\0"
Statuses = dict[str, dict[int, int]]


def fuzz(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    checks: list[Callable[..., Any]],
    statuses: dict[int, int],
) -> None:
    """Up to ``examples`` requests of ``mode`` to ``operation``, each checked."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Any) -> None:
        response = case.call(timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=checks, headers=dict(case.headers))

    call()


#: Real ids for path parameters: by name, or ``(path prefix, name)`` for a name that
#: means different things under different paths (the longest prefix wins).
Ids = dict[str | tuple[str, str], str]


def _real_id(ids: Ids, path: str, name: str) -> str | None:
    best: tuple[int, str] | None = None
    for key, value in ids.items():
        prefix, wanted = key if isinstance(key, tuple) else ("", key)
        if wanted == name and path.startswith(prefix) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), value)
    return best[1] if best else None


@contextmanager
def real_ids(token: str, ids: Ids) -> Iterator[None]:
    """Every case is sent with a valid token, the path parameters named in ``ids``
    set to those real ids, and without a callbackUrl. (In a ``before_call`` hook, so
    that Schemathesis sees the edit: a negative case whose only fault was its id or
    its missing token is then a positive one.)"""

    def before_call(_context: Any, case: Any, _kwargs: dict[str, Any]) -> None:
        for name in list(case.path_parameters or {}):
            value = _real_id(ids, case.operation.path, name)
            if value is not None:
                case.path_parameters[name] = value
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        # An export's callback would be POSTed to whatever host was generated.
        if isinstance(case.query, dict):
            case.query.pop("callbackUrl", None)
        if isinstance(case.body, dict):
            case.body.pop("callbackUrl", None)

    schemathesis.hook(before_call)
    try:
        yield
    finally:
        schemathesis.hooks.unregister(before_call)


def run(
    doc: dict[str, Any],
    base_url: str,
    token: str,
    *,
    ids: Ids,
    select: Callable[[str], bool],
    examples: dict[GenerationMode, int],
    not_always_accepted: frozenset[str] = frozenset(),
) -> Statuses:
    """Fuzz the operations whose label ``select`` takes; returns the statuses seen
    per operation (none of them 5xx, or this fails first)."""
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.update(base_url=base_url)
    # Unknown query parameters are ignored on purpose (losant-rest adds _actions,
    # _links and _embedded to every call): not a fault to look for.
    schema.config.generation.update(allow_extra_parameters=False)
    seen: Statuses = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        if not select(operation.label):
            continue
        checks = CHECKS
        if operation.label in not_always_accepted:
            checks = [c for c in CHECKS if c is not positive_data_acceptance]
        statuses = seen.setdefault(operation.label, {})
        for mode, count in examples.items():
            with real_ids(token, ids):
                fuzz(operation, mode, count, checks, statuses)
    assert all(not any(s >= 500 for s in counts) for counts in seen.values()), seen
    return seen

"""Reading multipart forms (uploads): one text field, bounded, given once."""

from __future__ import annotations

from starlette.datastructures import FormData

from agent.server.errors import Validation


def text_field(form: FormData, name: str, *, max_length: int) -> str | None:
    """The text field ``name`` (None if absent); a repeated field, a file in its
    place or a value over ``max_length`` characters is a 400."""
    values = form.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise Validation(f"{name}: given more than once")
    value = values[0]
    if not isinstance(value, str):
        raise Validation(f"{name}: a text field, not a file")
    if len(value) > max_length:
        raise Validation(f"{name}: longer than {max_length} characters")
    return value

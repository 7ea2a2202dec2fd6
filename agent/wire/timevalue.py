"""When a command was issued, from the time values operators' tools send.

Accepted (both profiles): ISO-8601 text (UTC unless it says otherwise), epoch
milliseconds (a number, or a string of digits), and Losant's extended JSON
``{"$date": <either of those>}``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any


def issued_at(value: Any) -> float:
    """Seconds since the epoch; ``ValueError`` for anything else."""
    if isinstance(value, dict):
        if set(value) != {"$date"}:
            raise ValueError('an object time must be {"$date": ...}')
        value = value["$date"]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError('expected ISO-8601, epoch ms or {"$date": ...}')  # noqa: TRY004
    if isinstance(value, int | float) or value.strip().isdigit():
        seconds = float(value) / 1000
    else:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp()
    if not math.isfinite(seconds):
        raise ValueError("time out of range")
    return seconds

"""When an install may happen: the maintenance window and flows' defer requests.

:class:`UpdatePolicy` turns both into the planner's ``hold`` (see
:data:`agent.device.deploy.planner.HoldFn`): an install that may not start now is held
back until the window opens, or until the running version's defer request ends.
Both are bounded: a daily window opens within a day, and defer requests hold one
deployment back for at most ``max_defer_s`` in total (counted from the first hold).
Removals are never held.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.device.deploy.planner import Hold, HoldFn
from agent.device.deploy.state import FlowRecord

#: The reason a defer request holds an install back (the state's ``error``).
DEFER_REASON = "the running version asked to defer updates"
_HHMM = r"([01]\d|2[0-3]):([0-5]\d)"
MAINTENANCE_WINDOW_PATTERN = rf"^{_HHMM}-{_HHMM}$"
_WINDOW_RE = re.compile(MAINTENANCE_WINDOW_PATTERN)


def zone_error(name: str) -> None:
    """Raise ValueError for a time zone name this machine does not know."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name, e.g. Europe/Berlin)") from None


@dataclass(frozen=True)
class MaintenanceWindow:
    """A daily window, ``start`` to ``end`` in ``zone`` (it may wrap midnight)."""

    start: time
    end: time
    zone: str = "UTC"

    @classmethod
    def parse(cls, text: str, zone: str = "UTC") -> MaintenanceWindow:
        m = _WINDOW_RE.match(text)
        if m is None:
            raise ValueError(f'maintenance window {text!r} is not "HH:MM-HH:MM"')
        start = time(int(m[1]), int(m[2]))
        end = time(int(m[3]), int(m[4]))
        if start == end:
            raise ValueError("maintenance window starts and ends at the same time")
        zone_error(zone)
        return cls(start, end, zone)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.zone}"

    def is_open(self, now: float) -> bool:
        t = datetime.fromtimestamp(now, ZoneInfo(self.zone)).time()
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def next_open(self, now: float) -> float:
        """When the window next opens (epoch seconds, > now unless open now). Local
        times that a clock change skips or repeats are taken as the zone resolves
        them; the result is never in the past."""
        if self.is_open(now):
            return now
        zone = ZoneInfo(self.zone)
        day = datetime.fromtimestamp(now, zone).date()
        for offset in range(3):
            candidate = datetime.combine(day + timedelta(days=offset), self.start, zone)
            for fold in (0, 1):  # a repeated hour (fall back) has two of each time
                when = candidate.replace(fold=fold).timestamp()
                if when > now:
                    return when
        return now + 86_400.0  # (unreachable: a day always holds the start time)


@dataclass(frozen=True)
class UpdatePolicy:
    """``[updates]``: the maintenance window and the bound on defer requests."""

    window: MaintenanceWindow | None = None
    max_defer_s: float = 3600.0

    def hold_fn(self, defer_until: Callable[[str], float | None]) -> HoldFn:
        """The planner's hold; ``defer_until(flow_id)`` is what the running version of
        the flow asked for (``edge.defer_update``), if anything."""

        def hold(flow_id: str, rec: FlowRecord | None, now: float) -> Hold | None:
            if self.window is not None and not self.window.is_open(now):
                return Hold(
                    self.window.next_open(now),
                    f"waiting for the maintenance window ({self.window})",
                )
            until = defer_until(flow_id)
            if until is None or until <= now:
                return None
            # Counted from the first defer hold (a wait for the window does not count).
            # Counted from the first defer hold of this target; a wait for the window
            # does not start it (nor, once started, stop it).
            since = rec.deferred_since if rec is not None and rec.deferred_since else now
            limit = since + self.max_defer_s
            if now >= limit:
                return None  # deferred long enough: the install goes ahead
            return Hold(min(until, limit), DEFER_REASON)

        return hold

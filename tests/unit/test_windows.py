"""The maintenance window and flows' defer requests, as the planner's hold (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.device.deploy.state import FlowRecord
from agent.device.deploy.windows import DEFER_REASON, MaintenanceWindow, UpdatePolicy


def at(text: str, zone: str = "UTC") -> float:
    from zoneinfo import ZoneInfo

    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


@pytest.mark.parametrize(
    ("window", "now", "is_open", "next_open"),
    [
        ("02:00-04:00", "2026-11-29T03:00", True, "2026-11-29T03:00"),
        ("02:00-04:00", "2026-11-29T04:00", False, "2026-11-30T02:00"),  # end excluded
        ("02:00-04:00", "2026-11-29T01:59", False, "2026-11-29T02:00"),
        ("22:00-02:00", "2026-11-29T23:30", True, "2026-11-29T23:30"),  # wraps midnight
        ("22:00-02:00", "2026-11-30T01:00", True, "2026-11-30T01:00"),
        ("22:00-02:00", "2026-11-29T12:00", False, "2026-11-29T22:00"),
    ],
)
def test_window_open_and_next_opening(window: str, now: str, is_open: bool, next_open: str) -> None:
    w = MaintenanceWindow.parse(window)
    assert w.is_open(at(now)) is is_open
    assert w.next_open(at(now)) == at(next_open)


def test_window_in_a_time_zone_with_daylight_saving() -> None:
    w = MaintenanceWindow.parse("02:30-03:30", "Europe/Berlin")
    # Local time, not UTC: in summer Berlin is UTC+2.
    assert w.is_open(at("2026-07-01T03:00", "Europe/Berlin"))
    assert not w.is_open(at("2026-07-01T03:00", "UTC"))  # 05:00 in Berlin
    assert w.next_open(at("2026-07-01T12:00", "Europe/Berlin")) == at(
        "2026-07-02T02:30", "Europe/Berlin"
    )


@pytest.mark.parametrize(
    ("text", "zone", "error"),
    [
        ("2:00-4:00", "UTC", "HH:MM-HH:MM"),
        ("24:00-01:00", "UTC", "HH:MM-HH:MM"),
        ("02:00-02:00", "UTC", "same time"),
        ("02:00-04:00", "Mars/Olympus", "unknown time zone"),
        ("02:00-04:00", "../../etc/passwd", "unknown time zone"),
    ],
)
def test_bad_windows_are_refused(text: str, zone: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        MaintenanceWindow.parse(text, zone)


@given(
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 23),
    st.integers(0, 59),
    st.floats(1.7e9, 1.9e9),
)
def test_next_open_is_within_a_day_and_open(h1: int, m1: int, h2: int, m2: int, now: float) -> None:
    if (h1, m1) == (h2, m2):
        return
    w = MaintenanceWindow.parse(f"{h1:02}:{m1:02}-{h2:02}:{m2:02}")
    opens = w.next_open(now)
    assert now <= opens <= now + 86_400
    assert w.is_open(opens)


NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC).timestamp()


def test_hold_for_a_closed_window_names_it() -> None:
    hold = UpdatePolicy(MaintenanceWindow.parse("02:00-04:00")).hold_fn(lambda _f: None)
    held = hold("f", None, NOW)
    assert held is not None
    assert held.until == at("2026-11-30T02:00")
    assert "maintenance window (02:00-04:00 UTC)" in held.reason
    assert UpdatePolicy(None).hold_fn(lambda _f: None)("f", None, NOW) is None


@pytest.mark.parametrize(
    ("defer_until", "deferred_since", "expected_until"),
    [
        (None, None, None),  # no request
        (NOW - 1, None, None),  # a request that ended
        (NOW + 30, None, NOW + 30),  # held until the request ends
        (NOW + 7200, None, NOW + 3600),  # bounded by max_defer_s from the first hold
        (NOW + 30, NOW - 3590, NOW + 10),  # the bound is counted from the first hold
        (NOW + 30, NOW - 3600, None),  # spent: the install goes ahead
    ],
)
def test_hold_for_a_defer_request_is_bounded(
    defer_until: float | None, deferred_since: float | None, expected_until: float | None
) -> None:
    hold = UpdatePolicy(None, max_defer_s=3600).hold_fn(lambda _f: defer_until)
    rec = FlowRecord(deferred_since=deferred_since, error=DEFER_REASON)
    held = hold("f", rec, NOW)
    assert (held.until if held else None) == expected_until


def test_waiting_for_the_window_does_not_use_up_the_defer_budget() -> None:
    hold = UpdatePolicy(None, max_defer_s=60).hold_fn(lambda _f: NOW + 30)
    # Held for the window for hours: deferred_until set, but no defer budget started.
    waited_for_window = FlowRecord(deferred_until=NOW, error="waiting for the window")
    held = hold("f", waited_for_window, NOW)
    assert held is not None
    assert held.until == NOW + 30


def test_next_open_in_the_repeated_hour_of_a_clock_change_is_not_in_the_past() -> None:
    # 2026-10-25 in Berlin: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
    w = MaintenanceWindow.parse("02:30-04:00", "Europe/Berlin")
    for minutes in range(0, 120, 5):
        now = datetime(2026, 10, 25, 0, 0, tzinfo=UTC).timestamp() + minutes * 60
        opens = w.next_open(now)
        assert opens >= now, minutes
        assert w.is_open(opens), minutes

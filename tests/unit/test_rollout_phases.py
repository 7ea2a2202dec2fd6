"""The pure parts of Mender's deployments here, table-driven: phase sizes (the seed's
rules), the device status a state report means, the failure threshold, and the
inventory filter's predicates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.server.db.models import Device
from agent.server.service import inventory_filter as f
from agent.server.service.phases import (
    Observed,
    PhaseError,
    PhaseSpec,
    assign,
    device_status,
    may_start_next,
    phase_sizes,
    threshold_exceeded,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def specs(*phases: tuple[int | None, int | None]) -> list[PhaseSpec]:
    return [PhaseSpec(b, None if m is None else at(m)) for b, m in phases]


# ------------------------------------------------------------------ phase sizes
@pytest.mark.parametrize(
    ("devices", "phases", "sizes"),
    [
        (10, [], [10]),
        (10, [(None, None)], [10]),
        # The last phase takes the rest; a percentage of the devices not yet assigned.
        (10, [(50, None), (None, 1)], [5, 5]),
        (10, [(50, None), (50, 1), (None, 2)], [5, 2, 3]),
        (100, [(5, None), (15, 1), (None, 2)], [5, 14, 81]),
        # Rounded down.
        (11, [(30, None), (None, 1)], [3, 8]),
        (3, [(34, None), (50, 1), (None, 2)], [1, 1, 1]),
        # The last phase's own batch_size is not used.
        (10, [(20, None), (80, 1)], [2, 8]),
        (10, [(20, None), (5, 1)], [2, 8]),
        # Percentages of what is left: they need not add up to 100 or less (the
        # seed's rule; 60 % of 10, then 60 % of the 4 left, then the rest).
        (10, [(60, None), (60, 1), (None, 2)], [6, 2, 2]),
        (4, [(60, None), (60, 1), (None, 2)], [2, 1, 1]),
        # A dynamic rollout may start with no device and one phase.
        (0, [(None, None)], [0]),
    ],
)
def test_phase_sizes(
    devices: int, phases: list[tuple[int | None, int | None]], sizes: list[int]
) -> None:
    assert phase_sizes(devices, specs(*phases)) == sizes


@pytest.mark.parametrize(
    ("devices", "phases", "message"),
    [
        # The seed's example: 5 percent of 11 devices rounds to zero.
        (11, [(5, None), (15, 1), (None, 2)], "rounds down to no device"),
        (10, [(50, None), (5, 1), (None, 2)], "5% of 5 devices rounds down"),
        # 90 % of 10, then all of the one left: nothing for the last phase.
        (10, [(90, None), (100, 1), (None, 2)], "no device is left"),
        (10, [(100, None), (None, 1)], "no device is left"),
        (10, [(0, None), (None, 1)], "a percentage from 1 to 100"),
        (10, [(101, None)], "a percentage from 1 to 100"),
        (10, [(None, None), (None, 1)], "required for all but the last"),
        (10, [(50, None), (None, None)], "start_ts: required"),
        (10, [(20, 5), (20, 5), (None, 9)], "not after the previous"),
        (10, [(20, 5), (20, 3), (None, 9)], "not after the previous"),
        (10, [(5, m) for m in range(17)], "at most 16"),
    ],
)
def test_phases_that_do_not_add_up(
    devices: int, phases: list[tuple[int | None, int | None]], message: str
) -> None:
    with pytest.raises(PhaseError, match=message):
        phase_sizes(devices, specs(*phases))


def test_assign_in_the_given_order() -> None:
    got = assign(["d", "a", "c", "b", "e"], [1, 2, 2])
    assert got == {"d": 0, "a": 1, "c": 1, "b": 2, "e": 2}


# ------------------------------------------------------------------ device status
A = "0123456789abcdef01234567"


def flow(status: str, **over: Any) -> dict[str, Any]:
    return {"status": status, "deploymentId": A, "error": None, "retryAt": None, **over}


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        (flow("pending"), Observed("pending", None, "pending")),
        (
            flow("pending", deferredUntil="2026-01-01T00:05:00Z"),
            Observed("pending", "deferred until 2026-01-01T00:05:00Z", "pending"),
        ),
        (flow("downloading"), Observed("downloading", None, "downloading")),
        (flow("installing"), Observed("installing", None, "installing")),
        (
            flow("success", health={"state": "probation", "until": "T1"}),
            Observed("rebooting", "health window until T1", "success"),
        ),
        (flow("success", health={"state": "healthy"}), Observed("success", None, "success")),
        (flow("success", health=None), Observed("success", None, "success")),
        (
            flow("failure", error="boom", retryAt="T2"),
            Observed("installing", "retrying at T2: boom", "failure"),
        ),
        (flow("failure", error="boom"), Observed("failure", "boom", "failure")),
        (flow("already-installed"), Observed("already-installed", None, "already-installed")),
        (flow("noartifact", error="no"), Observed("noartifact", "no", "noartifact")),
        (flow("aborted", error="stop"), Observed("aborted", "stop", "aborted")),
        # Nothing about this attempt: another deployment id, no entry, odd statuses.
        (flow("success", deploymentId="other"), None),
        (None, None),
        (flow("removed"), None),
        ({"deploymentId": A}, None),
    ],
)
def test_device_status(report: dict[str, Any] | None, expected: Observed | None) -> None:
    assert device_status(report, A) == expected


def test_a_device_not_started_says_nothing() -> None:
    assert device_status(flow("success"), None) is None


@pytest.mark.parametrize(
    ("counts", "threshold", "stops"),
    [
        ({"failure": 1}, None, False),
        ({}, 0, False),
        ({"pending": 3}, 0, False),
        ({"failure": 1, "success": 9}, 0, True),
        ({"failure": 1, "success": 9}, 10, False),
        ({"failure": 2, "success": 8}, 10, True),
        # noartifact, aborted, decommissioned do not count as finished installs.
        ({"failure": 1, "success": 1, "noartifact": 8}, 40, True),
        ({"failure": 1, "already-installed": 3}, 25, False),
        ({"failure": 5}, 100, False),
    ],
)
def test_threshold(counts: dict[str, int], threshold: float | None, stops: bool) -> None:
    assert threshold_exceeded(counts, threshold) is stops


@pytest.mark.parametrize(
    ("earlier", "threshold", "starts"),
    [
        # Without a threshold a failure holds nothing back (Mender's behaviour)...
        ({"success": 2}, None, True),
        ({"failure": 2}, None, True),
        ({"failure": 1, "noartifact": 1, "aborted": 1, "decommissioned": 1}, None, True),
        # ... but a device not final yet does: a version in its health window
        # (rebooting) is not healthy yet.
        ({"success": 1, "rebooting": 1}, None, False),
        ({"success": 1, "pending": 1}, None, False),
        ({"success": 1, "installing": 1}, 100, False),
        ({"pending": 0, "success": 1}, None, True),
        # With a threshold: only when the earlier phases' failures are within it.
        ({"failure": 1, "success": 1}, 20, False),
        ({"failure": 1, "success": 1}, 50, True),
        ({"failure": 1, "success": 3}, 25, True),
        ({"failure": 2, "success": 3}, 25, False),
        ({"failure": 1, "success": 9}, 0, False),
        ({"success": 4, "noartifact": 4}, 0, True),
    ],
)
def test_a_phase_starts_after_healthy_ones(
    earlier: dict[str, int], threshold: float | None, starts: bool
) -> None:
    assert may_start_next(earlier, threshold) is starts


# ------------------------------------------------------------------ inventory filter
def device(**over: Any) -> Device:
    base: dict[str, Any] = {
        "application_id": "a" * 24,
        "id": "gw-1",
        "name": "gateway one",
        "device_type": "rpi4",
        "agent_version": "1.4.0",
        "online": True,
        "tags": [{"key": "site", "value": "north"}, {"key": "floor", "value": "2"}],
    }
    return Device(**{**base, **over})


def term(scope: str, attribute: str, op: str, value: Any) -> dict[str, Any]:
    return {"scope": scope, "attribute": attribute, "type": op, "value": value}


@pytest.mark.parametrize(
    ("t", "hit"),
    [
        (term("inventory", "device_type", "$eq", "rpi4"), True),
        (term("identity", "device_type", "$eq", "rpi3"), False),
        (term("inventory", "device_type", "$ne", "rpi3"), True),
        (term("inventory", "device_type", "$in", ["rpi3", "rpi4"]), True),
        (term("inventory", "device_type", "$nin", ["rpi3", "rpi4"]), False),
        (term("inventory", "online", "$eq", True), True),
        (term("inventory", "online", "$eq", 1), False),  # a boolean is not a number
        (term("inventory", "id", "$gte", "gw-1"), True),
        (term("inventory", "id", "$gt", "gw-1"), False),
        (term("inventory", "agent_version", "$lt", "1.5"), True),
        (term("inventory", "agent_version", "$lte", "1.3"), False),
        (term("inventory", "agent_version", "$gt", 1), False),  # kinds differ
        (term("inventory", "name", "$exists", True), True),
        (term("tags", "site", "$eq", "north"), True),
        (term("tags", "floor", "$in", ["1", "2"]), True),
        (term("tags", "floor", "$eq", 2), False),  # tag values are strings
        (term("tags", "rack", "$exists", False), True),
        # A missing attribute matches $ne and $nin only (as MongoDB's operators).
        (term("tags", "rack", "$ne", "x"), True),
        (term("tags", "rack", "$nin", ["x"]), True),
        (term("tags", "rack", "$eq", "x"), False),
        (term("tags", "rack", "$in", ["x"]), False),
        (term("tags", "rack", "$lt", "x"), False),
    ],
)
def test_filter_terms(t: dict[str, Any], hit: bool) -> None:
    terms = f.parse({"terms": [t]})
    assert f.matches(terms, f.attributes(device())) is hit


def test_every_term_must_match() -> None:
    both = f.parse(
        {
            "terms": [
                term("inventory", "device_type", "$eq", "rpi4"),
                term("tags", "site", "$eq", "south"),
            ]
        }
    )
    assert not f.matches(both, f.attributes(device()))
    assert f.matches(both, f.attributes(device(tags=[{"key": "site", "value": "south"}])))


def test_a_device_without_a_type_has_no_such_attribute() -> None:
    attrs = f.attributes(device(device_type=None))
    assert ("inventory", "device_type") not in attrs
    assert f.matches(
        f.parse({"terms": [term("inventory", "device_type", "$exists", False)]}), attrs
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "an object with terms"),
        ({}, "at least one term"),
        ({"id": "saved-1"}, "saved filters are not supported"),
        ({"terms": "x"}, "at least one term"),
        ({"terms": ["x"]}, "an object with scope"),
        ({"terms": [term("system", "group", "$eq", "a")]}, "scope: one of"),
        ({"terms": [term("inventory", "mac", "$eq", "a")]}, "attribute: one of"),
        ({"terms": [term("tags", "", "$eq", "a")]}, "attribute: a name"),
        ({"terms": [term("tags", "a", "$regex", "a")]}, "type: one of"),
        ({"terms": [{"scope": "tags", "attribute": "a", "type": "$eq"}]}, "value: required"),
        ({"terms": [term("tags", "a", "$in", "a")]}, "an array"),
        ({"terms": [term("tags", "a", "$in", ["a", 1])]}, "not mixed"),
        ({"terms": [term("tags", "a", "$in", [True])]}, "not mixed"),
        ({"terms": [term("tags", "a", "$exists", "yes")]}, "true or false"),
        ({"terms": [term("tags", "a", "$gt", True)]}, "a number or a string"),
        ({"terms": [term("tags", "a", "$eq", {"x": 1})]}, "a string, a number or a boolean"),
        ({"terms": [term("tags", "a", "$eq", "x")] * 33}, "at most 32"),
    ],
)
def test_malformed_filters(data: Any, message: str) -> None:
    with pytest.raises(f.FilterError, match=message):
        f.parse(data)

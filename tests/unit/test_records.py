"""The one writer of flow records and its table of legal transitions (no I/O)."""

from __future__ import annotations

import pytest

from agent.device.deploy.records import TRANSITIONS, FlowRecords, IllegalTransition
from agent.device.deploy.state import FlowRecord, Installed, PersistedState
from agent.wire.protocol import Status

S = Status


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (None, S.PENDING),
        (None, S.FAILURE),  # an invalid entry
        (None, S.NOARTIFACT),
        (S.PENDING, S.DOWNLOADING),
        (S.DOWNLOADING, S.INSTALLING),
        (S.INSTALLING, S.SUCCESS),
        (S.FAILURE, S.DOWNLOADING),  # a retry
        (S.ABORTED, S.DOWNLOADING),
        (S.NOARTIFACT, S.DOWNLOADING),  # the device type changed
        (S.DOWNLOADING, S.DOWNLOADING),  # resumed
        (S.SUCCESS, S.PENDING),
        (S.SUCCESS, S.FAILURE),  # cannot start from the local store
        (S.SUCCESS, S.REMOVED),
        (S.REMOVED, S.PENDING),
        (S.DOWNLOADING, S.ABORTED),
        (S.FAILURE, S.ALREADY_INSTALLED),
    ],
)
def test_legal(before: Status | None, after: Status) -> None:
    state = PersistedState()
    if before is not None:
        state.flows["f"] = FlowRecord(status=before)
    records = FlowRecords(state)
    seen: list[tuple[str, Status, Status | None]] = []
    records.on_change = lambda f, rec, prev: seen.append((f, rec.status, prev))
    records.transition("f", after, error="why")
    assert state.flows["f"].status == after
    assert state.flows["f"].error == "why"
    assert seen == [("f", after, before)]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (None, S.SUCCESS),
        (None, S.DOWNLOADING),
        (None, S.REMOVED),
        (None, S.ALREADY_INSTALLED),
        (S.PENDING, S.SUCCESS),  # success only through the pipeline
        (S.PENDING, S.INSTALLING),
        (S.DOWNLOADING, S.SUCCESS),
        (S.SUCCESS, S.DOWNLOADING),  # a new target goes pending first
        (S.REMOVED, S.DOWNLOADING),
        (S.FAILURE, S.SUCCESS),  # a retry goes through downloading again
        (S.ABORTED, S.INSTALLING),
    ],
)
def test_illegal(before: Status | None, after: Status) -> None:
    state = PersistedState()
    if before is not None:
        state.flows["f"] = FlowRecord(status=before)
    records = FlowRecords(state)
    with pytest.raises(IllegalTransition, match="is not a legal transition"):
        records.transition("f", after)
    assert ("f" in state.flows) == (before is not None)
    if before is not None:
        assert state.flows["f"].status == before  # nothing changed


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(Status)


def test_activated_keeps_the_previous_version_and_clears_broken() -> None:
    old = Installed(version="v1", sha256="a" * 64)
    state = PersistedState(
        flows={"f": FlowRecord(status=S.INSTALLING, installed=old, broken=True, error="x")}
    )
    records = FlowRecords(state)
    new = Installed(version="v2", sha256="b" * 64)
    rec = records.activated("f", new)
    assert (rec.status, rec.installed, rec.previous, rec.broken, rec.error) == (
        S.SUCCESS,
        new,
        old,
        False,
        None,
    )


def test_lost_and_broken_go_through_the_writer() -> None:
    state = PersistedState(
        flows={"f": FlowRecord(status=S.SUCCESS, installed=Installed(version="v", sha256="a" * 64))}
    )
    records = FlowRecords(state)
    changes: list[Status | None] = []
    touched: list[str] = []
    records.on_change = lambda _f, rec, _p: changes.append(rec.status)
    records.on_touch = touched.append
    assert records.set_broken("f", True) is True
    assert records.set_broken("f", True) is False  # no change, no note
    records.lost("f", "artifact missing")
    rec = state.flows["f"]
    assert (rec.status, rec.installed, rec.target) == (S.FAILURE, None, None)
    assert changes == [S.FAILURE]
    assert touched == ["f"]


def _installed(version: str, sha: str = "a", **kw: object) -> Installed:
    when = "2026-11-29T06:00:00.000Z"  # (fixed: records are compared whole)
    return Installed(version=version, sha256=sha * 64, installed_at=when, **kw)  # type: ignore[arg-type]


def test_previous_is_what_ran_before_and_nothing_after_a_removal() -> None:
    state = PersistedState(flows={"f": FlowRecord(status=S.INSTALLING)})
    records = FlowRecords(state)
    records.activated("f", _installed("v1"))
    assert state.flows["f"].previous is None
    # The same bytes with another config are another version to go back from.
    state.flows["f"].status = S.INSTALLING
    records.activated("f", _installed("v1", config={"rate": 5}))
    assert state.flows["f"].previous == _installed("v1")
    records.removed("f", 3, None)
    assert state.flows["f"].previous == _installed("v1", config={"rate": 5})
    records.transition("f", S.PENDING)
    records.transition("f", S.DOWNLOADING)
    records.transition("f", S.INSTALLING)
    records.activated("f", _installed("v3", "c"))
    assert state.flows["f"].previous is None  # the removed version is never gone back to


def test_a_revert_swaps_installed_and_previous_and_a_failed_one_swaps_back() -> None:
    state = PersistedState(
        flows={
            "f": FlowRecord(
                status=S.SUCCESS,
                installed=_installed("v2", "b"),
                previous=_installed("v1"),
                probation_until=1.0,
            )
        }
    )
    records = FlowRecords(state)
    rec = records.reverted("f", S.FAILURE, "v2 failed; reverted to version v1")
    assert (rec.installed, rec.previous) == (_installed("v1"), _installed("v2", "b"))
    assert (rec.reverted, rec.no_retry, rec.inflight, rec.probation_until) == (
        True,
        True,
        "revert",
        None,
    )
    rec = records.revert_failed("f", S.FAILURE, "v2 failed; going back to version v1 failed")
    assert (rec.installed, rec.previous) == (_installed("v2", "b"), _installed("v1"))
    assert (rec.reverted, rec.no_retry) == (False, True)
    with pytest.raises(IllegalTransition, match="no previous version"):
        FlowRecords(PersistedState(flows={"g": FlowRecord(status=S.SUCCESS)})).reverted(
            "g", S.FAILURE, "x"
        )

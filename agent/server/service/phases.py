"""The pure part of Mender's deployments here: phase sizes, the device statuses read
from a device's state report, the failure threshold. No I/O: table-tested alone.

Phase sizes
    ``batch_size`` is a percentage of the devices **not yet assigned** to an earlier
    phase, rounded down; a phase that rounds to zero devices is refused (the seed's
    "5 percent of 11 devices"); the last phase takes the rest (its ``batch_size``, if
    given, is not used). Each ``batch_size`` is 1 to 100; they need not add up to
    anything (60, 60 and the rest is 60 % of the devices, then 60 % of the other
    40 %, then what is left). Start times must increase from phase to phase; only the
    first phase may leave its start out ("start now").

When a phase starts
    Its start time has come, every device of the earlier phases is final, and, with a
    failure threshold, their failures are within it (:func:`may_start_next`). Without
    a threshold a failure is final like a success and holds nothing back: Mender's
    behaviour (its server starts the next phase at its time whatever happened).

A device's status, from its state report (``flows[flow_id]`` whose ``deploymentId``
is the attempt written for the rollout; another id says nothing about this rollout):

====================================  ============================================
the flow's state                      Mender status (substate)
====================================  ============================================
``pending``                           ``pending`` (``deferred until …`` if held)
``downloading`` / ``installing``      the same
``success``, health ``probation``     ``rebooting`` (``health window until …``:
                                      the version runs, not yet committed)
``success`` (healthy, or no window)   ``success``
``failure`` with ``retryAt``          ``installing`` (``retrying at …``)
``failure`` (final)                   ``failure`` (its error)
``already-installed``                 ``already-installed``
``noartifact`` / ``aborted``          the same
====================================  ============================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: Mender's device statuses that end a device's part in a rollout.
FINAL = frozenset(
    {"success", "failure", "noartifact", "already-installed", "aborted", "decommissioned"}
)
#: Every device status (Mender's enum, in the statistics' order).
STATUSES = (
    "success",
    "pending",
    "downloading",
    "installing",
    "rebooting",
    "failure",
    "noartifact",
    "already-installed",
    "aborted",
    "decommissioned",
)
#: Phases one rollout may have.
MAX_PHASES = 16
#: Substates are cut to this many characters.
MAX_SUBSTATE = 500


class PhaseError(ValueError):
    """Phases that do not add up (a 400)."""


@dataclass(frozen=True)
class PhaseSpec:
    batch_size: int | None
    start_ts: datetime | None


def phase_sizes(devices: int, phases: Sequence[PhaseSpec]) -> list[int]:
    """How many devices each phase gets (see the module docstring); raises
    :class:`PhaseError` for phases that do not add up."""
    if not phases:
        return [devices]
    if len(phases) > MAX_PHASES:
        raise PhaseError(f"phases: at most {MAX_PHASES}")
    for i, p in enumerate(phases):
        if p.batch_size is None and i < len(phases) - 1:
            raise PhaseError(f"phases[{i}].batch_size: required for all but the last phase")
        if p.batch_size is not None and not 1 <= p.batch_size <= 100:
            raise PhaseError(f"phases[{i}].batch_size: a percentage from 1 to 100")
        if p.start_ts is None and i > 0:
            raise PhaseError(f"phases[{i}].start_ts: required for all but the first phase")
    starts = [p.start_ts for p in phases if p.start_ts is not None]
    for i in range(1, len(starts)):
        if starts[i] <= starts[i - 1]:
            raise PhaseError(f"phases[{i}].start_ts: not after the previous phase's start")
    sizes: list[int] = []
    left = devices
    for i, p in enumerate(phases[:-1]):
        assert p.batch_size is not None
        size = math.floor(left * p.batch_size / 100)
        if size == 0:
            raise PhaseError(
                f"phases[{i}]: {p.batch_size}% of {left} devices rounds down to no device"
            )
        sizes.append(size)
        left -= size
    if left == 0 and len(phases) > 1:
        raise PhaseError(f"phases[{len(phases) - 1}]: no device is left for the last phase")
    sizes.append(left)
    return sizes


def assign(device_ids: Sequence[str], sizes: Sequence[int]) -> dict[str, int]:
    """Device id → phase number: the first ``sizes[0]`` devices in phase 0, and so on."""
    out: dict[str, int] = {}
    i = 0
    for number, size in enumerate(sizes):
        for device_id in device_ids[i : i + size]:
            out[device_id] = number
        i += size
    return out


@dataclass(frozen=True)
class Observed:
    """A device's Mender status as its report shows it, and what the agent said."""

    status: str
    substate: str | None
    state: str


def device_status(flow: Mapping[str, Any] | None, attempt_id: str | None) -> Observed | None:
    """The status of a rollout device from its report's entry for the rollout's flow
    (None: the report says nothing about this attempt yet)."""
    if not flow or attempt_id is None or flow.get("deploymentId") != attempt_id:
        return None
    state = flow.get("status")
    if not isinstance(state, str):
        return None
    error = _short(flow.get("error"))
    if state in ("downloading", "installing"):
        return Observed(state, None, state)
    if state == "pending":
        held = flow.get("deferredUntil")
        return Observed("pending", f"deferred until {held}" if held else None, state)
    if state == "success":
        health = flow.get("health")
        if isinstance(health, dict) and health.get("state") == "probation":
            return Observed("rebooting", f"health window until {health.get('until')}", state)
        return Observed("success", None, state)
    if state == "failure":
        retry = flow.get("retryAt")
        if retry:
            return Observed("installing", _short(f"retrying at {retry}: {error}"), state)
        return Observed("failure", error, state)
    if state in ("already-installed", "noartifact", "aborted"):
        return Observed(state, error, state)
    return None  # (removed, or something newer than this server)


def _short(value: Any) -> str | None:
    return value[:MAX_SUBSTATE] if isinstance(value, str) and value else None


def threshold_exceeded(counts: Mapping[str, int], threshold: float | None) -> bool:
    """Whether a rollout stops: the failures are more than ``threshold`` percent of
    the devices that finished installing (``success``, ``failure``,
    ``already-installed``; devices without an artifact, aborted or decommissioned do
    not count), once at least one finished. No threshold: never."""
    if threshold is None:
        return False
    failed = counts.get("failure", 0)
    done = failed + counts.get("success", 0) + counts.get("already-installed", 0)
    return done > 0 and failed * 100 > threshold * done


def may_start_next(earlier: Mapping[str, int], threshold: float | None) -> bool:
    """Whether the next phase may start once its time has come, from the device
    statuses of every earlier phase (status → how many): each of those devices is
    final (``success`` only after its health window: until then it is
    ``rebooting``), and with a failure threshold their failures are within it. No
    threshold: failures hold nothing back (as Mender's server)."""
    if any(n > 0 and status not in FINAL for status, n in earlier.items()):
        return False
    return not threshold_exceeded(earlier, threshold)

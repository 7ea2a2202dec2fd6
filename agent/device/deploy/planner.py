"""The reconciliation planner: a pure function from (desired, current) to steps.

No I/O, no clock (``now`` is an argument), no mutation of its inputs: the executor
(:mod:`agent.device.deploy.reconciler`) owns side effects and has one executor per step kind.

For each flow, in id order, the plan is one of:

- ``SetStatus(failure)`` for an entry that failed validation (the running version
  keeps running);
- for an ``abort`` entry: ``SetStatus(aborted)`` when its deployment has not
  activated here (the running version keeps running), ``Revert`` when it has and
  the entry says ``revert`` (the previous version runs again), nothing otherwise;
- ``Remove`` for a flow that is absent or has a blank/null version and is installed;
  ``SetStatus(removed)`` when nothing is installed; ``Forget`` for a removed flow that
  a later generation no longer mentions;
- ``SetStatus(noartifact)`` when ``deviceTypes`` excludes this device, or no
  artifact of the entry is for its type;
- ``SetStatus(already-installed)`` when the running version already matches;
- nothing, when the status already describes this target, its retries are spent,
  or it failed in a way retrying cannot fix (reverted, failed its health window);
- ``Wait`` while a failed attempt's retry backoff runs;
- ``Defer`` (then ``Wait``) while a :data:`Hold` keeps the install back: the running
  version asked to defer updates, or the maintenance window is closed;
- otherwise ``Download, Verify, Install, Activate``: blue/green, the old version
  runs until ``Activate``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.device.deploy.state import FlowRecord, installed_matches, target_key
from agent.wire.protocol import ArtifactRef, DesiredState, FlowSpec, Status


@dataclass(frozen=True)
class Target:
    """The version a flow should run, as the executor needs it."""

    flow_id: str
    version: str
    artifact: ArtifactRef
    config_json: str
    manifest_json: str
    retries: int
    deployment_id: str | None
    key: str
    generation: int
    #: ``health`` of the entry (None: the agent's default).
    health_window: float | None = None
    health_revert: bool | None = None

    @classmethod
    def from_spec(
        cls, flow_id: str, spec: FlowSpec, artifact: ArtifactRef, generation: int
    ) -> Target:
        assert spec.version
        return cls(
            flow_id=flow_id,
            version=spec.version,
            artifact=artifact,
            config_json=json.dumps(spec.config, sort_keys=True),
            manifest_json=spec.manifest().canonical(),
            retries=spec.retries,
            deployment_id=spec.deployment_id,
            key=target_key(spec, artifact),
            generation=generation,
            health_window=spec.health.window if spec.health else None,
            health_revert=spec.health.revert if spec.health else None,
        )

    @property
    def config(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.config_json)
        return value


@dataclass(frozen=True)
class SetStatus:
    flow_id: str
    status: Status
    target: str
    generation: int
    desired_version: str | None
    deployment_id: str | None
    error: str | None = None


@dataclass(frozen=True)
class Remove:
    flow_id: str
    generation: int
    deployment_id: str | None


@dataclass(frozen=True)
class Forget:
    flow_id: str


@dataclass(frozen=True)
class Wait:
    flow_id: str
    until: float


@dataclass(frozen=True)
class Revert:
    """Put the previous version back (an aborted deployment that had activated)."""

    flow_id: str
    status: Status
    target: str
    generation: int
    deployment_id: str | None
    reason: str


@dataclass(frozen=True)
class Defer:
    """Hold an install back until ``until`` (recorded as ``pending`` with the reason)."""

    target: Target
    until: float
    reason: str


@dataclass(frozen=True)
class Hold:
    """Why an install must wait, and until when at the latest."""

    until: float
    reason: str


#: (flow id, its record, now) -> a Hold while its install must wait. The caller binds
#: what it depends on (the running version's defer request, the maintenance window).
HoldFn = Callable[[str, "FlowRecord | None", float], "Hold | None"]


@dataclass(frozen=True)
class Download:
    target: Target


@dataclass(frozen=True)
class Verify:
    target: Target


@dataclass(frozen=True)
class Install:
    target: Target


@dataclass(frozen=True)
class Activate:
    target: Target


Step = SetStatus | Remove | Forget | Wait | Revert | Defer | Download | Verify | Install | Activate

#: Steps that do work towards a target, in order.
INSTALL_CHAIN = (Download, Verify, Install, Activate)


def flow_id_of(step: Step) -> str:
    if isinstance(step, Defer | Download | Verify | Install | Activate):
        return step.target.flow_id
    return step.flow_id


def _status_is(rec: FlowRecord | None, target: str, *statuses: Status) -> bool:
    return rec is not None and rec.target == target and rec.status in statuses


def plan_flow(
    flow_id: str,
    spec: FlowSpec | None,
    invalid: str | None,
    rec: FlowRecord | None,
    *,
    generation: int,
    device_type: str,
    now: float,
    hold: HoldFn | None = None,
) -> list[Step]:
    """The steps for one flow. ``spec`` None means the flow is absent from desired."""
    if invalid is not None:
        key = f"invalid:{invalid}"
        if _status_is(rec, key, Status.FAILURE):
            return []
        return [
            SetStatus(
                flow_id,
                Status.FAILURE,
                key,
                generation,
                desired_version=rec.desired_version if rec else None,
                deployment_id=rec.deployment_id if rec else None,
                error=invalid,
            )
        ]

    if spec is not None and spec.abort:
        return _plan_abort(flow_id, spec, rec, generation)

    if spec is None or spec.is_removal:
        deployment_id = spec.deployment_id if spec else None
        if rec is None:
            return []
        if rec.installed is not None:
            return [Remove(flow_id, generation, deployment_id)]
        if rec.status == Status.REMOVED:
            if spec is None and (rec.generation is None or rec.generation < generation):
                return [Forget(flow_id)]
            return []
        return [SetStatus(flow_id, Status.REMOVED, "remove", generation, None, deployment_id)]

    artifact = spec.artifact_for(device_type)
    excluded = spec.device_types and device_type not in spec.device_types
    if excluded or artifact is None:
        key = (
            target_key(spec, artifact)
            if artifact is not None
            else f"noartifact:{spec.version}#{spec.deployment_id}"
        )
        if _status_is(rec, key, Status.NOARTIFACT):
            return []
        why = (
            f"device type {device_type!r} is not in deviceTypes {spec.device_types}"
            if excluded
            else f"no artifact of this entry is for device type {device_type!r}"
        )
        return [
            SetStatus(
                flow_id,
                Status.NOARTIFACT,
                key,
                generation,
                spec.version,
                spec.deployment_id,
                error=why,
            )
        ]
    target = Target.from_spec(flow_id, spec, artifact, generation)

    if rec is not None and rec.target == target.key and rec.no_retry:
        return []  # failed for good (its health window): even if it is what runs

    if (
        rec is not None
        and installed_matches(rec.installed, spec, artifact)
        and not (rec.broken and rec.target != target.key)
    ):  # (a new deployment of the running version restarts a broken flow)
        if _status_is(rec, target.key, Status.SUCCESS, Status.ALREADY_INSTALLED):
            return []
        return [
            SetStatus(
                flow_id,
                Status.ALREADY_INSTALLED,
                target.key,
                generation,
                spec.version,
                spec.deployment_id,
            )
        ]

    if rec is not None and rec.target == target.key and rec.status == Status.FAILURE:
        if rec.attempts > spec.retries:
            return []  # wait for a new desired document (or a new deploymentId)
        if rec.next_retry_at is not None and now < rec.next_retry_at:
            return [Wait(flow_id, rec.next_retry_at)]

    held = hold(flow_id, rec, now) if hold is not None else None
    if held is not None:
        waiting = (
            _status_is(rec, target.key, Status.PENDING)
            and rec is not None
            and rec.deferred_until == held.until
            and rec.error == held.reason
        )
        steps: list[Step] = [] if waiting else [Defer(target, held.until, held.reason)]
        return [*steps, Wait(flow_id, held.until)]

    return [Download(target), Verify(target), Install(target), Activate(target)]


def _plan_abort(
    flow_id: str, spec: FlowSpec, rec: FlowRecord | None, generation: int
) -> list[Step]:
    deployment_id = spec.deployment_id
    key = f"abort:{deployment_id}{':revert' if spec.revert else ''}"
    if rec is not None and rec.target == key:
        return []  # done already
    installed = rec.installed if rec is not None else None
    if installed is not None and installed.deployment_id == deployment_id:
        # It activated here: only a revert undoes it (and only with a version to go back to).
        if spec.revert and rec is not None and rec.previous is not None:
            return [
                Revert(
                    flow_id,
                    Status.ABORTED,
                    key,
                    generation,
                    deployment_id,
                    reason=f"deployment {deployment_id} aborted",
                )
            ]
        return []
    return [
        SetStatus(
            flow_id,
            Status.ABORTED,
            key,
            generation,
            desired_version=spec.version,
            deployment_id=deployment_id,
            error=(
                f"deployment {deployment_id} aborted; it had been reverted already"
                if rec is not None and rec.reverted and rec.deployment_id == deployment_id
                else f"deployment {deployment_id} aborted before it activated here"
            ),
        )
    ]


def plan(
    desired: DesiredState | None,
    current: Mapping[str, FlowRecord],
    *,
    device_type: str,
    now: float,
    hold: HoldFn | None = None,
) -> list[Step]:
    """All steps to take the device from ``current`` towards ``desired``."""
    if desired is None:
        return []
    steps: list[Step] = []
    for flow_id in sorted(set(desired.flows) | set(desired.invalid) | set(current)):
        steps.extend(
            plan_flow(
                flow_id,
                desired.flows.get(flow_id),
                desired.invalid.get(flow_id),
                current.get(flow_id),
                generation=desired.generation,
                device_type=device_type,
                now=now,
                hold=hold,
            )
        )
    return steps

"""The reconciliation planner: a pure function from (desired, current) to steps.

No I/O, no clock (``now`` is an argument), no mutation of its inputs: the executor
(:mod:`agent.device.reconciler`) owns side effects and has one executor per step kind.

For each flow, in id order, the plan is one of:

- ``SetStatus(failure)`` for an entry that failed validation (the running version
  keeps running);
- ``Remove`` for a flow that is absent or has a blank/null version and is installed;
  ``SetStatus(removed)`` when nothing is installed; ``Forget`` for a removed flow that
  a later generation no longer mentions;
- ``SetStatus(noartifact)`` when ``deviceTypes`` excludes this device;
- ``SetStatus(already-installed)`` when the running version already matches;
- nothing, when the status already describes this target, or its retries are spent;
- ``Wait`` while a failed attempt's retry backoff runs;
- otherwise ``Download, Verify, Install, Activate``: blue/green, the old version
  runs until ``Activate``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.device.state import FlowRecord, installed_matches, target_key
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

    @classmethod
    def from_spec(cls, flow_id: str, spec: FlowSpec, generation: int) -> Target:
        assert spec.version
        assert spec.artifact is not None
        return cls(
            flow_id=flow_id,
            version=spec.version,
            artifact=spec.artifact,
            config_json=json.dumps(spec.config, sort_keys=True),
            manifest_json=spec.manifest().canonical(),
            retries=spec.retries,
            deployment_id=spec.deployment_id,
            key=target_key(spec),
            generation=generation,
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


Step = SetStatus | Remove | Forget | Wait | Download | Verify | Install | Activate

#: Steps that do work towards a target, in order.
INSTALL_CHAIN = (Download, Verify, Install, Activate)


def flow_id_of(step: Step) -> str:
    if isinstance(step, Download | Verify | Install | Activate):
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

    target = Target.from_spec(flow_id, spec, generation)
    if spec.device_types and device_type not in spec.device_types:
        if _status_is(rec, target.key, Status.NOARTIFACT):
            return []
        return [
            SetStatus(
                flow_id,
                Status.NOARTIFACT,
                target.key,
                generation,
                spec.version,
                spec.deployment_id,
                error=f"device type {device_type!r} is not in deviceTypes {spec.device_types}",
            )
        ]

    if (
        rec is not None
        and installed_matches(rec.installed, spec)
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
            return []  # retries spent: wait for a new desired document
        if rec.next_retry_at is not None and now < rec.next_retry_at:
            return [Wait(flow_id, rec.next_retry_at)]

    return [Download(target), Verify(target), Install(target), Activate(target)]


def plan(
    desired: DesiredState | None,
    current: Mapping[str, FlowRecord],
    *,
    device_type: str,
    now: float,
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
            )
        )
    return steps

"""Devices: create, change, decommission, and commands sent to them."""

from __future__ import annotations

import json
import secrets
from typing import Any

from agent.server.broker_link import BrokerUnavailable
from agent.server.context import ServerContext
from agent.server.db import deployments as deployments_repo
from agent.server.db import devices as devices_repo
from agent.server.db.models import Application, Device
from agent.server.errors import ApiError, NotFound, Validation
from agent.server.service import rollouts
from agent.server.service.desired import EntryFor, removal_entry
from agent.wire.protocol import utc_now_iso
from agent.wire.topics import Topics


class BrokerDown(ApiError):
    status = 503
    type = "ServiceUnavailable"


def decommission(ctx: ServerContext, app: Application, device_id: str) -> None:
    """Every flow removed (a last desired document), then the device is no longer
    targeted; once it reports its flows gone, its retained documents are cleared.
    First it leaves the Mender deployments it has not finished (``decommissioned``),
    so none starts it meanwhile."""
    with ctx.db.transaction() as s:
        dev = devices_repo.get(s, app.id, device_id)
        if dev is None or dev.decommissioned:
            raise NotFound(f"Device {device_id} was not found")
    rollouts.decommission(ctx, app, device_id, "the device was decommissioned")
    with ctx.db.transaction() as s:
        flows = list(deployments_repo.for_device(s, app.id, device_id))
    plan: dict[str, dict[str, tuple[str | None, EntryFor]]] = {
        device_id: dict.fromkeys(flows, (None, removal_entry))
    }
    if flows:
        ctx.writer.change(app, plan, "edge")  # (each record keeps its own kind)
    with ctx.db.transaction() as s:
        dev2 = devices_repo.get(s, app.id, device_id, lock=True)
        if dev2 is not None:
            dev2.decommissioned = True
            dev2.online = False
    if not flows:
        ctx.retire(app.topic_prefix, device_id)


def update(ctx: ServerContext, app: Application, device_id: str, changes: dict[str, Any]) -> Device:
    with ctx.db.transaction() as s:
        dev = devices_repo.get(s, app.id, device_id, lock=True)
        if dev is None or dev.decommissioned:
            raise NotFound(f"Device {device_id} was not found")
        for key, value in changes.items():
            setattr(dev, key, value)
        return dev


def send_command(
    ctx: ServerContext,
    app: Application,
    device_ids: list[str],
    name: str,
    payload: Any,
    time: Any,
) -> int:
    """Publish the command (QoS 1, not retained) to each device; returns how many."""
    body = {"name": name, "payload": payload, "time": time or utc_now_iso()}
    publish_commands(ctx, app, [(d, {**body, "id": secrets.token_hex(8)}) for d in device_ids])
    return len(device_ids)


def publish_commands(
    ctx: ServerContext, app: Application, commands: list[tuple[str, dict[str, Any]]]
) -> None:
    """Publish each ``(device id, command document)`` (QoS 1, not retained) to its
    device's command topic, and wait until the broker took them all."""
    if ctx.link is None:
        raise BrokerDown("no broker configured")
    messages = []
    for device_id, doc in commands:
        data = json.dumps(doc, separators=(",", ":")).encode()
        if len(data) > 256 * 1024:
            raise Validation("command over 256 KiB")
        messages.append((Topics(app.topic_prefix, device_id).command, data, False))
    try:
        ctx.link.publish_many(messages)
    except BrokerUnavailable as exc:
        raise BrokerDown(f"the broker did not take the command: {exc}") from None

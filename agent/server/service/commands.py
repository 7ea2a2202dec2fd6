"""Commands to one device that the server remembers: sent with an id of its own,
recorded, and matched with the device's response (``{prefix}/{id}/command/response``,
recorded by the inventory) for the console to show."""

from __future__ import annotations

import secrets
from typing import Any

from agent.server.context import ServerContext
from agent.server.db import commands as commands_repo
from agent.server.db import devices as devices_repo
from agent.server.db.models import Application, CommandRecord, utcnow
from agent.server.errors import NotFound, Validation
from agent.server.service.devices import publish_commands
from agent.server.text import text_problem, tree_problem
from agent.wire.protocol import utc_now_iso

#: A command's name, as the agent accepts it (protocol.md § Commands).
MAX_NAME = 255


def send(
    ctx: ServerContext, app: Application, device_id: str, name: str, payload: Any
) -> CommandRecord:
    """Send ``{"name", "id", "payload", "time"}`` to a device of ``app`` and record it
    (before it is published: the response may come at once). Raises NotFound for a
    device the application does not have, Validation for a bad name, BrokerDown if
    the broker did not take it (then nothing stays recorded). A device keeps its
    newest :data:`commands_repo.MAX_PER_DEVICE` commands (the older go now)."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise Validation(f"a command's name is 1 to {MAX_NAME} characters")
    # (Checked here too, whoever calls: PostgreSQL would refuse them with a 500.)
    if (problem := text_problem(name)) is not None:
        raise Validation(f"name: {problem}")
    if (problem := tree_problem(payload)) is not None:
        raise Validation(f"payload: {problem}")
    command_id = secrets.token_hex(12)
    with ctx.db.transaction() as s:
        dev = devices_repo.get(s, app.id, device_id)
        if dev is None or dev.decommissioned:
            raise NotFound(f"Device {device_id} was not found")
        commands_repo.create(
            s,
            id=command_id,
            application_id=app.id,
            device_id=device_id,
            name=name,
            payload=payload,
            sent=utcnow(),
        )
        commands_repo.trim(s, app.id, device_id)
    doc = {"name": name, "id": command_id, "payload": payload, "time": utc_now_iso()}
    try:
        publish_commands(ctx, app, [(device_id, doc)])
    except Exception:
        with ctx.db.transaction() as s:
            row = commands_repo.get(s, app.id, command_id)
            if row is not None:
                s.delete(row)
        raise
    found = get(ctx, app.id, command_id)
    assert found is not None
    return found


def get(ctx: ServerContext, app_id: str, command_id: str) -> CommandRecord | None:
    """A command of the application (with its response once it came), or None."""
    with ctx.db.transaction() as s:
        return commands_repo.get(s, app_id, command_id)


def recent(ctx: ServerContext, app_id: str, device_id: str, limit: int = 20) -> list[CommandRecord]:
    with ctx.db.transaction() as s:
        return commands_repo.recent(s, app_id, device_id, limit)

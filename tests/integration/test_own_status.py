"""A device that hears itself reported offline while it is connected announces itself
again (a late last will of an earlier connection, or a retained message a clustered
broker lost), but not at its own clean shutdown, and not without bound."""

from __future__ import annotations

import json
from typing import Any

from broker import Operator
from common import wait_until
from scenario import STATUS

from agent.device.daemon import Agent
from agent.device.reporter import MAX_REBIRTHS


async def test_an_offline_status_while_connected_is_answered(
    operator: Operator, running_agent: Any
) -> None:
    operator.subscribe("edge/dev1/status")
    agent: Agent = await running_agent()
    await operator.wait_for(STATUS, lambda d: d["online"] is True)
    births = len(operator.messages(STATUS))
    # What a late will looks like: retained, offline, from "elsewhere".
    operator.publish(STATUS, {"online": False})
    await operator.wait_for(STATUS, lambda d: d["online"] is True, timeout=10)
    assert len(operator.messages(STATUS)) == births + 2  # the offline, and one answer
    # A cleared status (an empty retained message) is answered too, after a second.
    operator.publish(STATUS, b"")
    await operator.wait_for(STATUS, lambda d: d["online"] is True, timeout=10)
    # Bounded: a writer that keeps saying offline gets at most MAX_REBIRTHS answers.
    for _ in range(MAX_REBIRTHS + 3):
        operator.publish(STATUS, {"online": False})
    await wait_until(
        lambda: agent.parts.reporter._reborn >= MAX_REBIRTHS, 15, "the answers used up"
    )
    answers = [json.loads(p) for p in operator.messages(STATUS) if p]
    assert sum(1 for d in answers if d["online"]) <= 1 + MAX_REBIRTHS


async def test_the_clean_shutdown_offline_is_not_answered(
    operator: Operator, running_agent: Any
) -> None:
    operator.subscribe("edge/dev1/status")
    agent: Agent = await running_agent()
    await operator.wait_for(STATUS, lambda d: d["online"] is True)
    agent.stop()
    await agent.stopped()
    await operator.wait_for(STATUS, lambda d: d["online"] is False, timeout=10)
    assert json.loads(operator.messages(STATUS)[-1])["online"] is False

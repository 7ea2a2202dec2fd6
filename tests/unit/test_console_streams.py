"""The console's stream slots: bounded per session and per process, and given back
however a response ends (no I/O but an in-process ASGI call)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from starlette.types import Message

from agent.server.console.streams import SlotResponse, Slots, TooManyStreams, event


def test_per_session_and_per_process_bounds() -> None:
    slots = Slots(per_session=2, per_application=3, per_process=4)
    slots.take("a", "app1")
    slots.take("a", "app1")
    with pytest.raises(TooManyStreams, match="per session"):
        slots.take("a", "app1")
    slots.take("b", "app1")
    with pytest.raises(TooManyStreams, match="per application"):
        slots.take("c", "app1")  # (another session of the same application)
    slots.take("c", "app2")
    with pytest.raises(TooManyStreams, match="this server"):
        slots.take("d", "app3")
    assert (slots.open(), slots.open("a"), slots.open(application="app1")) == (4, 2, 3)
    slots.give_back("a", "app1")
    slots.take("d", "app3")
    for s, app in (("a", "app1"), ("b", "app1"), ("c", "app2"), ("d", "app3")):
        slots.give_back(s, app)
    assert slots.open() == 0
    assert slots.open("a") == 0
    assert slots.open(application="app1") == 0
    slots.give_back("a", "app1")  # (once too often: never below zero)
    assert slots.open() == 0


async def _call(response: SlotResponse, disconnect_at_once: bool) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        if disconnect_at_once:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "GET"}
    await response(scope, receive, send)
    return sent


@pytest.mark.parametrize("disconnect_at_once", [False, True])
async def test_a_response_gives_its_slot_back(disconnect_at_once: bool) -> None:
    slots = Slots()

    async def body() -> AsyncIterator[str]:
        yield event("status", "<p>one</p>")

    slots.take("s", "app")
    await _call(SlotResponse(body(), slots, "s", "app"), disconnect_at_once)
    assert slots.open() == 0


async def test_a_failing_body_gives_its_slot_back() -> None:
    slots = Slots()

    async def body() -> AsyncIterator[str]:
        yield event("status", "x")
        raise RuntimeError("the database went away")

    slots.take("s", "app")
    with pytest.raises(RuntimeError):
        await _call(SlotResponse(body(), slots, "s", "app"), False)
    assert slots.open() == 0


def test_an_event_cannot_end_early() -> None:
    """Every line of the fragment is a ``data:`` line: a blank line or a fake
    ``event:`` in the HTML cannot end the event or start another."""
    text = event("status", "<p>a</p>\n\nevent: done\r\ndata: x\rz\u2028w")
    assert "\r" not in text  # (a CR alone ends a line for a browser, too)
    lines = text.split("\n")
    assert lines[0] == "event: status"
    assert all(line.startswith("data: ") for line in lines[1:-2])
    assert lines[-2:] == ["", ""]

"""Cross-thread hand-off to the event loop: in order, one wake-up per batch."""

from __future__ import annotations

import asyncio
import threading

from common import wait_until

from agent.device.runtime._handoff import Handoff


async def test_a_burst_from_another_thread_runs_in_order_with_one_wakeup() -> None:
    loop = asyncio.get_running_loop()
    handoff = Handoff(loop)
    seen: list[int] = []

    def burst() -> None:
        for i in range(5000):
            handoff.post(seen.append, i)

    # Block the loop while the other thread posts, as a busy agent would be.
    thread = threading.Thread(target=burst)
    thread.start()
    thread.join()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert seen == list(range(5000))
    assert handoff.wakeups == 1


async def test_a_failing_callback_does_not_stop_the_others() -> None:
    handoff = Handoff(asyncio.get_running_loop())
    seen: list[str] = []

    def boom() -> None:
        raise ValueError("boom")

    def post_both() -> None:
        handoff.post(boom)
        handoff.post(seen.append, "after")

    threading.Thread(target=post_both).start()
    await wait_until(lambda: seen, 5, "the second callback")
    assert seen == ["after"]


def test_posting_after_the_loop_closed_is_harmless() -> None:
    loop = asyncio.new_event_loop()
    handoff = Handoff(loop)
    loop.close()
    handoff.post(print, "never runs")  # no exception, nothing scheduled
    assert handoff.wakeups == 0

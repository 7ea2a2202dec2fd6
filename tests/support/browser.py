"""A real browser for the console's tests: Debian's Chromium driven by Playwright for
Python (the package only: ``playwright install`` is never run, its browser download is
not used). ``scripts/bootstrap`` installs the ``chromium`` package.

Playwright's sync API refuses to run inside a running asyncio loop, so the tests that
use it are plain functions; the sim agents they need run in a thread with their own
loop (:class:`LoopThread`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest

CHROMIUM = "/usr/bin/chromium"
# what a test browser needs here: no sandbox (root in a container), no GPU, and none
# of Chromium's own traffic (updates, sync, field trials) to the outside
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}

T = TypeVar("T")


def unavailable() -> str | None:
    """Why the browser cannot exist on this platform, or None. A missing binary on a
    platform Debian builds it for is a failure (run ``make test``: bootstrap installs
    it), not a skip."""
    if platform.system() != "Linux":
        return f"Debian's Chromium does not exist on {platform.system()}"
    if platform.machine() not in ("x86_64", "aarch64", "armv7l", "i686", "ppc64le"):
        return f"Debian builds no Chromium for {platform.machine()}"
    return None


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A launched Chromium (playwright.sync_api.Browser), closed at the end."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (scripts/bootstrap installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


class LoopThread:
    """An asyncio loop in a daemon thread: async parts (sim agents) beside a sync test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, make: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
        async def wrap() -> T:
            return await make()

        fut: Future[T] = asyncio.run_coroutine_threadsafe(wrap(), self.loop)
        return fut.result(timeout)

    @contextlib.contextmanager
    def entered(self, cm: contextlib.AbstractAsyncContextManager[T]) -> Iterator[T]:
        """``async with cm`` held open in the loop while the block runs."""
        value = self.run(cm.__aenter__)
        try:
            yield value
        finally:
            self.run(lambda: cm.__aexit__(None, None, None))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

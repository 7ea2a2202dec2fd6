"""The rollout engine (Mender's phased deployments, run by the server). Not written
yet: it only waits."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.server.context import ServerContext


class RolloutEngine:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self._kick = threading.Event()

    def kick(self) -> None:
        self._kick.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._kick.wait(1.0)
            self._kick.clear()

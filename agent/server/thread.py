"""The server's HTTP side on a thread of this process, stopped in bounded time.

``edge-agent server`` runs uvicorn on its main thread. The demo (and the tests)
run it beside other work, on a thread, and must be able to stop it however busy
it is: uvicorn's shutdown otherwise waits for every open response, and a console's
live stream only ends when its browser goes. :meth:`ServerThread.stop` asks uvicorn
to exit, gives open responses ``grace`` seconds, then forces the exit.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

GRACE_S = 2.0  # for responses still open when asked to stop
FORCED_S = 3.0  # for the loop to end once forced


class ServerThread:
    """uvicorn serving ``app`` on ``host:port``, on a daemon thread."""

    def __init__(self, app: FastAPI, host: str, port: int, *, grace: float = GRACE_S) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=max(1, round(grace)),
        )
        self.server: uvicorn.Server = uvicorn.Server(config)
        self._grace = grace
        self._thread = threading.Thread(target=self.server.run, name="http-server", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; :class:`RuntimeError` when it is not up within ``timeout``."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> bool:
        """Stop within about ``grace`` + 0.5 + :data:`FORCED_S` seconds; False when
        the thread is still alive after that (a request stuck in a worker thread)."""
        self.server.should_exit = True
        if not self._thread.is_alive():
            return True
        self._thread.join(self._grace + 0.5)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(FORCED_S)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

"""The systemd notify protocol (``$NOTIFY_SOCKET``), without a library.

One datagram per message on the AF_UNIX socket systemd names (``@`` means the
abstract namespace). Without ``$NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) every call is a no-op. ``$WATCHDOG_USEC`` gives the watchdog
interval; pings are sent at half of it (and only when ``$WATCHDOG_PID``, if set,
is this process).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.path = env.get("NOTIFY_SOCKET") or None
        self.watchdog_usec: int | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half the watchdog timeout), or None."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None

    def notify(self, *lines: str) -> bool:
        if self.path is None:
            return False
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(lines).encode(), address)
            self.sent += 1
            return True
        return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", "STATUS=reloading configuration")

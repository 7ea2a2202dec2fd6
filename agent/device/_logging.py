"""structlog set-up and the per-attempt capture behind deployment logs.

Every log line that carries ``flow_id`` (bound with structlog's contextvars inside
a flow's reconcile task, or explicitly for guest output) is also appended to that
flow's capture buffer while a deployment attempt is running. On ``failure`` the
buffer is published as the deployment log (like Mender's).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from collections.abc import MutableMapping
from typing import Any

import structlog

from agent.wire import redact
from agent.wire.protocol import LogMessage, utc_now_iso

#: Log lines kept per flow for ``agent.logs``.
RECENT_LINES = 500

_SKIP = frozenset({"event", "timestamp", "level", "flow_id", "device_id", "logger"})


class LogCapture:
    """Bounded per-(device, flow) buffers of log lines, filled by a structlog processor."""

    def __init__(self, max_lines: int = 500) -> None:
        self.max_lines = max_lines
        self._buffers: dict[tuple[str | None, str], deque[LogMessage]] = {}
        self._recent: dict[tuple[str | None, str], deque[LogMessage]] = {}
        self._lock = threading.Lock()

    def start(self, device_id: str, flow_id: str, max_lines: int | None = None) -> None:
        with self._lock:
            self._buffers[(device_id, flow_id)] = deque(maxlen=max_lines or self.max_lines)

    def take(self, device_id: str, flow_id: str) -> list[LogMessage]:
        with self._lock:
            buf = self._buffers.pop((device_id, flow_id), None)
        return list(buf) if buf else []

    def recent(self, device_id: str, flow_id: str, lines: int) -> list[LogMessage]:
        """The last ``lines`` log lines of a flow (kept always, up to RECENT_LINES)."""
        with self._lock:
            buf = self._recent.get((device_id, flow_id))
            return list(buf)[-lines:] if buf else []

    def __call__(
        self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        flow_id = event_dict.get("flow_id")
        if flow_id is None:
            return event_dict
        key = (event_dict.get("device_id"), str(flow_id))
        extra = " ".join(f"{k}={v}" for k, v in event_dict.items() if k not in _SKIP)
        line = LogMessage(
            time=str(event_dict.get("timestamp") or utc_now_iso()),
            level=method,
            message=f"{event_dict.get('event', '')} {extra}".strip(),
        )
        with self._lock:
            buf = self._buffers.get(key)
            if buf is not None:
                buf.append(line)
            recent = self._recent.get(key)
            if recent is None:
                recent = self._recent[key] = deque(maxlen=RECENT_LINES)
            recent.append(line)
        return event_dict


#: The process-wide capture (several simulated agents share it, keyed by device id).
capture = LogCapture()

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", fmt: str = "console", stream: Any = None) -> None:
    """Configure structlog for the process (safe to call again, e.g. on reload)."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact.log_processor,  # before the capture: deployment logs are redacted too
            capture,
            structlog.processors.format_exc_info,
            redact.exception_processor,  # the traceback text
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )

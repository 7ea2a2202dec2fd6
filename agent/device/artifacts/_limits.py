"""The caps, timeouts and retry policy a :class:`~agent.device.artifacts.Fetcher` obeys."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FetchLimits:
    """Caps, timeouts and retry policy of :class:`Fetcher` (sizes in bytes, times in s)."""

    max_size: int = 64 * 1024 * 1024  # hard cap on an artifact's size
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # httpx read timeout per read
    stall_timeout: float = 30.0  # abort if no byte arrived for this long
    retries: int = 3  # extra attempts inside one fetch() for retryable errors
    backoff_initial: float = 0.5  # seconds; exponential, jittered, capped by backoff_max
    backoff_max: float = 10.0
    min_free_bytes: int = 16 * 1024 * 1024  # keep this much free on the store's filesystem

    def __post_init__(self) -> None:
        if self.max_size <= 0 or self.retries < 0 or self.min_free_bytes < 0:
            raise ValueError(f"invalid FetchLimits: {self}")
        if min(self.connect_timeout, self.read_timeout, self.stall_timeout) <= 0:
            raise ValueError(f"invalid FetchLimits: timeouts must be > 0: {self}")
        if self.backoff_initial < 0 or self.backoff_max < 0:
            raise ValueError(f"invalid FetchLimits: backoff must be >= 0: {self}")

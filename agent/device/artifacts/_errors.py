"""How fetch failures read: one-line exception text and per-instance retryability.

Third-party exceptions (httpx, OSError) leave the fetcher only as :mod:`agent.errors`
exceptions; these helpers build their messages.
"""

from __future__ import annotations

from agent.errors import DownloadError


def describe(exc: BaseException) -> str:
    """``exc``'s message on one line, or its type name if it has none."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def download_error(message: str, *, retryable: bool) -> DownloadError:
    """A DownloadError whose ``retryable`` is decided per instance (4xx: no)."""
    error = DownloadError(message)
    error.retryable = retryable
    return error

"""Per-flow key/value storage: in memory, quota-limited, persisted atomically.

Host functions run on wasm worker threads, so every method is thread-safe. Writes
mark the store dirty; :meth:`KVStore.flush` (called by the flow's runner at most
once a second, and when the flow stops) writes the whole store with
write-temp + fsync + rename. A crash loses at most the last second of writes,
never the file.
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

from agent.device._fsutil import atomic_write

MAX_KEY = 256


class QuotaExceeded(Exception):
    pass


class KVStore:
    def __init__(self, path: Path, quota: int) -> None:
        self.path = path
        self.quota = quota
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._dirty = False
        self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            self._data = {k: base64.b64decode(v) for k, v in raw.get("values", {}).items()}
        except FileNotFoundError:
            self._data = {}
        except (ValueError, TypeError, AttributeError):
            aside = self.path.with_suffix(".corrupt")
            self.path.replace(aside)
            self._data = {}

    @property
    def used(self) -> int:
        return sum(len(k.encode()) + len(v) for k, v in self._data.items())

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._data.get(key)

    def set(self, key: str, value: bytes) -> None:
        with self._lock:
            old = self._data.get(key)
            delta = len(value) - (len(old) if old is not None else -len(key.encode()))
            if self.used + delta > self.quota:
                raise QuotaExceeded
            self._data[key] = value
            self._dirty = True

    def delete(self, key: str) -> bool:
        with self._lock:
            found = self._data.pop(key, None) is not None
            self._dirty = self._dirty or found
            return found

    @property
    def dirty(self) -> bool:
        """Unsaved changes (a plain read: a stale answer only delays the next flush)."""
        return self._dirty

    def flush(self) -> bool:
        """Write if dirty (blocking). Returns whether it wrote."""
        with self._lock:
            if not self._dirty:
                return False
            doc = {"values": {k: base64.b64encode(v).decode() for k, v in self._data.items()}}
            self._dirty = False
        atomic_write(self.path, json.dumps(doc, sort_keys=True).encode())
        return True

"""Process-wide settings of the daemon (``edge-agent run``), made first thing.

They apply to the daemon's own process only, never to a library user's (tests, the
fleet simulator, an embedding application), which is why they are not made on import.

- **glibc malloc arenas.** glibc gives a thread that meets contention its own malloc
  arena, up to 8 per core, and each arena keeps the memory its thread freed. The
  daemon has a dozen threads (wasm workers, the MQTT network thread, the output pump,
  asyncio's executor) that mostly sleep, so the arenas are mostly held-free memory:
  :data:`ARENA_MAX` caps them. The systemd unit sets ``MALLOC_ARENA_MAX`` in the
  environment, which glibc reads before the first allocation; this covers every
  other way of starting the daemon (by hand, a container, the benchmarks). An
  explicit ``MALLOC_ARENA_MAX`` or ``GLIBC_TUNABLES`` is left alone.
- **rich.** structlog imports ``rich`` (3.8 MiB) when it is installed, for pretty
  tracebacks; the daemon formats tracebacks to text before its renderer
  (``format_exc_info``), so it never uses them. ``rich`` is the operator extra,
  present in development environments and absent on devices: the daemon does not
  import it, so it runs the same in both.
- **pydantic plugins.** On its first model pydantic reads the entry points of every
  installed distribution, looking for plugins (7-14 ms of start-up here). The daemon
  uses none: ``PYDANTIC_DISABLE_PLUGINS`` unless the environment says otherwise.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: Most malloc arenas the daemon's threads share (glibc's default: 8 per core).
ARENA_MAX = 2
_M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h


def tune() -> None:
    """Apply the settings above; call before the daemon imports its parts or starts
    a thread."""
    limit_malloc_arenas()
    if "structlog" not in sys.modules:
        sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")


def limit_malloc_arenas(arenas: int = ARENA_MAX) -> bool:
    """Cap glibc's malloc arenas unless the environment already says; True if set."""
    if "MALLOC_ARENA_MAX" in os.environ or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))

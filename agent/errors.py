"""The exception tree of edge-agent.

Third-party exceptions (httpx, paho, wasmtime, pydantic, OSError) are translated into
these at the edge of the module that talks to the library, so the layers above
only ever see this tree::

    AgentError
    ├── ConfigError              the configuration file, environment or flags are invalid
    ├── ProtocolError            a wire message is malformed or violates protocol v1
    │   └── UnsafePath           a name from input cannot safely name a file
    ├── StateError               the persisted state cannot be read or written
    ├── ArtifactError            an artifact could not be obtained or is not acceptable
    │   ├── DownloadError        transport failure (connect, timeout, stall, HTTP status)
    │   ├── ArtifactTooLarge     declared or streamed size over the cap, or no disk space
    │   └── IntegrityError       size or SHA-256 mismatch
    └── SandboxError             a flow could not be compiled, instantiated or run
        ├── InvalidModule        the bytes are not a valid WebAssembly module
        ├── InstantiationError   imports, limits or start-up failed
        └── FlowTrap             the guest trapped (deadline, memory, unreachable, exit != 0)

Every error's ``str()`` is a one-line, operator-readable reason: it is what ends up
in the ``error`` field of a flow's state and in the deployment log.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error edge-agent raises on purpose."""


class ConfigError(AgentError):
    """Invalid configuration. ``str()`` names the source, the key and the problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


class ProtocolError(AgentError):
    """A wire message that cannot be accepted."""


class UnsafePath(ProtocolError):
    """A name from input (flow id, digest, member name) that would not stay one plain
    path component inside its parent directory."""


class StateError(AgentError):
    """Persisted state that cannot be read or written."""


class ArtifactError(AgentError):
    """An artifact could not be obtained or is not acceptable."""

    #: Whether trying the same download again may succeed (network faults: yes;
    #: a checksum mismatch or an oversized artifact: no).
    retryable: bool = False


class DownloadError(ArtifactError):
    """Transport failure while fetching an artifact."""

    retryable = True


class ArtifactTooLarge(ArtifactError):
    """The artifact is larger than allowed, or does not fit on the disk."""


class IntegrityError(ArtifactError):
    """The artifact's size or SHA-256 digest does not match what was declared."""


class SandboxError(AgentError):
    """A flow could not be compiled, instantiated or run."""


class InvalidModule(SandboxError):
    """The bytes are not a valid WebAssembly module."""


class InstantiationError(SandboxError):
    """The module's imports, limits or start-up function failed."""


class FlowTrap(SandboxError):
    """The guest trapped or exited with a non-zero code."""

    def __init__(self, message: str, code: str = "trap") -> None:
        self.code = code
        super().__init__(message)

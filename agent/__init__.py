"""edge-agent: run WASM flows deployed over MQTT on a device, in a wasmtime sandbox.

The public surface is small: :func:`agent.cli.main` (the ``edge-agent`` command),
:class:`agent.device.daemon.Agent` (the daemon as an async context manager), the
configuration model :class:`agent.device.config.AgentConfig`, the wire models in
:mod:`agent.wire.protocol` and the exception tree in :mod:`agent.errors`.
"""

__version__ = "0.1.0"

"""Running flows: the wasmtime sandbox, supervised runners, and the host APIs.

:mod:`.sandbox` (engine, limits, module cache), :mod:`.runner` (one flow's instance,
triggers and supervision), :mod:`.flows` (the running set of an agent),
:mod:`.hostapi` (the ``edge`` API), :mod:`.eea` with :mod:`.eea_settings` and
:mod:`.eea_identity` (Losant EEA bundles), :mod:`.kvstore` (flow storage).
"""

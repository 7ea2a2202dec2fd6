"""The wire: what crosses between an operator and a device, with no I/O.

Protocol v1 models (:mod:`.protocol`), topic names (:mod:`.topics`), flow manifests
(:mod:`.manifest`), the workflow bundle format (:mod:`.bundle`), artifact signatures
(:mod:`.signing`), bounded JSON parsing, time values and URL redaction. Shared by
the device agent and the operator side.
"""

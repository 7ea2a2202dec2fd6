"""The device agent (``edge-agent run``): the daemon and everything it owns.

:mod:`.daemon` wires the parts and owns the lifecycle; :mod:`.reconciler` with the
pure :mod:`.planner` converges desired and current state, persisted by :mod:`.state`;
:mod:`.reporter` tells the operator side; :mod:`.mqtt` is the broker session,
:mod:`.outbox` the offline queue, :mod:`.commands` the command topic,
:mod:`.losant` and :mod:`.pacer` the Losant profile; :mod:`.artifacts` downloads and
stores artifacts; :mod:`.runtime` runs flows in wasmtime.
"""

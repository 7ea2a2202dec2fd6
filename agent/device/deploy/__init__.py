"""Deployments on the device: desired state in, flows installed, reverted, held back.

- :mod:`.intake`: desired documents in (bounds, signatures, order, intent saved first);
- :mod:`.planner`: the pure planner, ``plan(desired, current) -> steps``;
- :mod:`.reconciler`: the loop that runs the steps, one task per flow;
- :mod:`.executors`: one executor per step kind;
- :mod:`.records`: the one writer of flow records and its table of transitions;
- :mod:`.state`: ``state.json``;
- :mod:`.local`: installed flows started from the local store;
- :mod:`.health` and :mod:`.revert`: the health window and going back;
- :mod:`.windows`: the maintenance window and defer requests;
- :mod:`.cleanup`: artifacts and compiled modules no longer needed.
"""

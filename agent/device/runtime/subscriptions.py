"""The MQTT subscriptions the agent makes on behalf of flows' ``mqtt`` triggers.

A trigger's filter is checked before its flow starts: within the device's own
topics, not too broad, never reaching the device's desired or command topic.
Subscriptions are reference-counted across flows (and across the two versions of
one flow during a swap), and the agent's own subscriptions (``protected``) are
never released by a flow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from paho.mqtt.client import topic_matches_sub

from agent.errors import InstantiationError
from agent.wire.manifest import MqttTrigger, check_subscription


class TriggerSubscriptions:
    def __init__(
        self,
        device_base: str,
        *,
        subscribe: Callable[[str, int], None] | None,
        unsubscribe: Callable[[str], None] | None,
        protected: frozenset[str],
    ) -> None:
        self.device_base = device_base
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        #: Topics the agent subscribes to itself: a flow never unsubscribes them.
        self.protected = protected
        self._counts: dict[str, int] = {}

    def check(self, triggers: Iterable[Any]) -> None:
        """Raise :class:`InstantiationError` for an mqtt trigger a flow may not have."""
        prefix, _, device = self.device_base.rpartition("/")
        control = (f"{self.device_base}/desired", f"{self.device_base}/command")
        for trig in triggers:
            if isinstance(trig, MqttTrigger):
                problem = check_subscription(trig.topic, prefix or "edge", device)
                if problem is None and any(topic_matches_sub(trig.topic, t) for t in control):
                    problem = (
                        f"mqtt trigger {trig.topic!r} reaches the device's own desired "
                        "or command topic (use a command trigger for commands)"
                    )
                if problem:
                    raise InstantiationError(problem)

    def ref(self, topic: str, qos: int) -> None:
        self._counts[topic] = self._counts.get(topic, 0) + 1
        first = self._counts[topic] == 1
        if first and self._subscribe is not None and topic not in self.protected:
            self._subscribe(topic, qos)

    def unref(self, topic: str) -> None:
        count = self._counts.get(topic, 0) - 1
        if count > 0:
            self._counts[topic] = count
            return
        self._counts.pop(topic, None)
        if self._unsubscribe is not None and topic not in self.protected:
            self._unsubscribe(topic)

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

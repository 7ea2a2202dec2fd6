"""The way out for messages that are not state reports.

A flow's message (already permission-checked) goes out QoS 1 through the outbox
(kept while offline) or QoS 0 straight out (dropped while offline); the Losant
profile's messages go out paced, as Losant's broker wants. Neither path raises.
"""

from __future__ import annotations

import structlog

from agent.device.losant import MAX_MESSAGE as MAX_LOSANT_MESSAGE
from agent.device.mqtt import MqttSession
from agent.device.outbox import Outbox
from agent.device.pacer import Pacer

log = structlog.get_logger("agent.device.publisher")


class Publisher:
    def __init__(self, session: MqttSession, outbox: Outbox, pacer: Pacer | None) -> None:
        self.session = session
        self.outbox = outbox
        #: Set in the Losant profile: every message is paced, and bounded in size.
        self.pacer = pacer

    def now(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish now, or paced in the Losant profile; never raises."""
        try:
            if self.pacer is not None:
                self.pacer.publish(topic, payload, qos=qos)
            else:
                self.session.publish(topic, payload, qos=qos)
        except (RuntimeError, ValueError) as exc:
            log.warning("message dropped", topic=topic, error=str(exc))

    def flow_message(self, topic: str, payload: bytes, qos: int) -> None:
        """A flow's message, on the event loop: QoS 1 through the outbox, QoS 0 now."""
        if self.pacer is not None and len(payload) > MAX_LOSANT_MESSAGE:
            log.warning(
                "message over Losant's 256 KB limit; dropped", topic=topic, bytes=len(payload)
            )
            return
        if qos:
            self.outbox.put(topic, payload)
            return
        self.now(topic, payload, qos=0)

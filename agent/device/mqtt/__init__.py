"""The device's MQTT connection: :class:`MqttSession`, one paho-mqtt 2.x client with its
own network thread, reconnecting, usable from asyncio.

What the rest of the project uses is re-exported here; the modules behind it are
implementation.
"""

from agent.device.mqtt.session import (
    STILL_FAILING_EVERY_S,
    Message,
    MqttSession,
    Will,
    backoff_delay,
)

__all__ = ["STILL_FAILING_EVERY_S", "Message", "MqttSession", "Will", "backoff_delay"]

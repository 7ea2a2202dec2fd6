"""The device's MQTT connection: :class:`MqttSession`, one paho-mqtt 2.x client with its
own network thread, reconnecting, usable from asyncio.

What the rest of the project uses is re-exported here; the private modules behind it
are implementation. :mod:`agent.device.mqtt.client` (a paho client configured from
:class:`~agent.device.config.MqttConfig`) is public too: the fleet tool builds its
client there, so every client of the project is set up in one place.
"""

from agent.device.mqtt._netloop import STILL_FAILING_EVERY_S, backoff_delay
from agent.device.mqtt.client import Will
from agent.device.mqtt.session import Message, MqttSession

__all__ = ["STILL_FAILING_EVERY_S", "Message", "MqttSession", "Will", "backoff_delay"]

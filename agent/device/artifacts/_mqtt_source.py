"""Fetching ``mqtt:<topic>`` artifacts.

The MQTT layer's ``mqtt_fetch(topic, timeout)`` returns the first message on the
topic (normally the retained one) as the whole artifact; :func:`fetch_mqtt` checks it
against the job and stores it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from agent.device.artifacts._errors import describe
from agent.errors import ArtifactError, DownloadError

if TYPE_CHECKING:
    from pathlib import Path

    from agent.device.artifacts._job import Job

#: ``mqtt_fetch(topic, timeout)``: the payload of the first message on ``topic``.
MqttFetch = Callable[[str, float], Awaitable[bytes]]


async def fetch_mqtt(job: Job, mqtt_fetch: MqttFetch | None) -> Path:
    """Take the artifact from its topic, check it and store it."""
    topic = job.url[len("mqtt:") :]
    if not topic or "+" in topic or "#" in topic:
        raise ArtifactError(f"invalid MQTT artifact URL {job.display}: needs a plain topic")
    if mqtt_fetch is None:
        raise ArtifactError(f"cannot fetch {job.display}: MQTT artifact delivery is off")
    timeout = job.limits().read_timeout
    try:
        payload = await mqtt_fetch(topic, timeout)
    except TimeoutError:
        raise DownloadError(
            f"no artifact arrived on MQTT topic {topic} within {timeout:g} s"
        ) from None
    except ArtifactError:
        raise
    except OSError as exc:
        raise DownloadError(f"MQTT fetch of {job.display} failed: {describe(exc)}") from exc
    payload = bytes(payload)
    job.done = len(payload)
    if len(payload) > job.cap:
        raise job.too_large(len(payload), declared=False)
    job.check_disk(len(payload))
    hasher = await asyncio.to_thread(hashlib.sha256, payload)
    job.check_result(hasher)
    return await job.put_bytes(payload)

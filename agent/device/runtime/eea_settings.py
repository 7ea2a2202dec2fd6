"""EEA bundle settings: agent-wide defaults (``[eea]``), per-flow ``config.eea``.

Sizes are **bytes**, as the EEA API 1.0.0 defines them, with Losant's defaults. A
bundle keeps its queue, its storage and its two message buffers in its own linear
memory, so together they must fit the sandbox memory limit: a setting that cannot
fit is refused before the bundle is started, with the numbers in the message.

The Losant device id an EEA bundle gets from ``eea_get_device_id``: a flow's
``config.eea.deviceId``, else the agent's device id when it is a Losant id, else
``[losant] device_id``, else the agent's device id as it is (bundles compiled by
Losant's platform refuse anything but a Losant device id, 24 lower-case hex digits).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import InstantiationError

#: A Losant object id (devices, applications, ...): 24 lower-case hex digits.
LOSANT_ID_PATTERN = r"^[0-9a-f]{24}$"
_LOSANT_ID = re.compile(LOSANT_ID_PATTERN)
_MIB = 1024 * 1024


def is_losant_id(value: str) -> bool:
    return bool(_LOSANT_ID.fullmatch(value))


class EEADefaults(BaseModel):
    """``[eea]``: the settings every EEA bundle gets unless its ``config.eea`` says
    otherwise (EEA API 1.0.0; sizes in bytes, Losant's defaults)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    queue_size: Annotated[int, Field(ge=1024, le=1024 * _MIB)] = Field(
        1_024_000,
        description="Bytes the bundle's workflow queue may use (eea_config_set_queue_size).",
    )
    storage_size: Annotated[int, Field(ge=0, le=1024 * _MIB)] = Field(
        1_024_000,
        description="Bytes of workflow storage (eea_config_set_storage_size).",
    )
    topic_buffer: Annotated[int, Field(ge=16, le=65_536)] = Field(
        256, description="Bytes of the incoming topic buffer (eea_set_message_buffers)."
    )
    payload_buffer: Annotated[int, Field(ge=16, le=16 * _MIB)] = Field(
        4096, description="Bytes of the incoming payload buffer (eea_set_message_buffers)."
    )
    storage_interval_ms: Annotated[int, Field(ge=0, le=86_400_000)] = Field(
        30_000,
        description="How often the bundle saves its storage, ms; 0 = never "
        "(eea_config_set_storage_interval).",
    )
    trace_level: Annotated[int, Field(ge=0, le=2)] = Field(
        2, description="0 errors only, 1 + info, 2 + verbose (eea_config_set_trace_level)."
    )
    debug_enabled: bool = Field(
        True, description="Debug-node messages on or off (eea_config_set_debug_enabled)."
    )
    loop_interval_ms: Annotated[int, Field(ge=10, le=100)] = Field(
        50, description="How often eea_loop is called, ms (the API wants under 100)."
    )


def default_settings() -> EEADefaults:
    """``[eea]`` with every default."""
    return EEADefaults.model_validate({})


class FlowEEAConfig(BaseModel):
    """A flow's ``config.eea`` (camelCase; every member optional)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    queue_size: Annotated[int, Field(ge=1024, le=1024 * _MIB)] | None = Field(
        None, alias="queueSize"
    )
    storage_size: Annotated[int, Field(ge=0, le=1024 * _MIB)] | None = Field(
        None, alias="storageSize"
    )
    topic_buffer: Annotated[int, Field(ge=16, le=65_536)] | None = Field(None, alias="topicBuffer")
    payload_buffer: Annotated[int, Field(ge=16, le=16 * _MIB)] | None = Field(
        None, alias="payloadBuffer"
    )
    storage_interval_ms: Annotated[int, Field(ge=0, le=86_400_000)] | None = Field(
        None, alias="storageIntervalMs"
    )
    trace_level: Annotated[int, Field(ge=0, le=2)] | None = Field(None, alias="traceLevel")
    debug_enabled: bool | None = Field(None, alias="debugEnabled")
    loop_interval_ms: Annotated[int, Field(ge=10, le=100)] | None = Field(
        None, alias="loopIntervalMs"
    )
    device_id: Annotated[str, Field(pattern=LOSANT_ID_PATTERN)] | None = Field(
        None, alias="deviceId"
    )


def resolve(
    config: dict[str, Any],
    defaults: EEADefaults,
    *,
    memory_limit: int,
    device_id: str,
    losant_device_id: str | None = None,
) -> tuple[EEADefaults, str]:
    """The settings and the Losant device id for one bundle, from its flow ``config``.

    Raises :class:`InstantiationError` (before anything runs) for an invalid
    ``config.eea`` or for sizes that do not fit ``memory_limit`` together.
    """
    raw = config.get("eea", {})
    if not isinstance(raw, dict):
        raise InstantiationError("config.eea must be an object")
    try:
        own = FlowEEAConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InstantiationError(f"config.eea.{where}: {err['msg']}") from None
    chosen = own.model_dump(exclude_none=True, exclude={"device_id"})
    settings = defaults.model_copy(update=chosen)
    parts = {
        "queueSize": settings.queue_size,
        "storageSize": settings.storage_size,
        "topicBuffer": settings.topic_buffer,
        "payloadBuffer": settings.payload_buffer,
    }
    total = sum(parts.values())
    if total > memory_limit:
        detail = " + ".join(f"{k} {v:,}" for k, v in parts.items())
        raise InstantiationError(
            f"EEA settings need {total:,} bytes of the bundle's memory ({detail}), over the "
            f"sandbox memory limit of {memory_limit:,} bytes (sandbox.memory_limit); "
            "lower config.eea or [eea] sizes"
        )
    own_id = device_id if is_losant_id(device_id) else None
    return settings, own.device_id or own_id or losant_device_id or device_id

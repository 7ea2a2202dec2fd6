"""Topic names of protocol v1, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    """The topics of one device under one prefix."""

    prefix: str
    device_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    @property
    def desired(self) -> str:
        return f"{self.base}/desired"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def command(self) -> str:
        return f"{self.base}/command"

    @property
    def command_response(self) -> str:
        return f"{self.base}/command/response"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    def deployment_log(self, deployment_or_flow_id: str) -> str:
        return f"{self.base}/deployments/{deployment_or_flow_id}/log"

    def artifact(self, sha256: str) -> str:
        """Convention for artifacts delivered as retained MQTT messages."""
        return f"{self.prefix}/artifacts/{sha256}"

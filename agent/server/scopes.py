"""API token scopes, as Losant names them, and which ones each endpoint accepts.

A read (``get``, ``export``) accepts ``all.Application``, ``all.Application.read``
(and the organization and user forms), ``{resource}.*`` and ``{resource}.{action}``;
a change accepts the same without the ``.read`` forms; the ``.bounded`` forms count
as the full ones. Reading devices and sending them commands also accept
``all.Device`` (and ``all.Device.read`` for reads), as the seeds and Losant's client
list.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.server.errors import Validation

RESOURCES = {
    "edgeDeployments": ("get", "release", "remove", "replace"),
    "edgeDeployment": ("get",),
    "embeddedDeployments": ("get", "release", "remove", "replace", "export"),
    "embeddedDeployment": ("get",),
    "devices": ("get", "post", "export", "sendCommand"),
    "device": ("get", "patch", "delete", "sendCommand"),
    "flows": ("get", "post"),
    # Mender's deployments API (this project's names: Mender has no scopes).
    "artifacts": ("get", "post", "put", "delete"),
    "rollouts": ("get", "post", "abort"),
}
#: The endpoints that also take a device-wide token (``all.Device``, and
#: ``all.Device.read`` for the reads), as Losant lists them.
DEVICE_WIDE = frozenset(
    {("devices", "get"), ("device", "get"), ("devices", "sendCommand"), ("device", "sendCommand")}
)
BROAD = (
    *(
        f"all.{who}{form}"
        for who in ("Application", "Organization", "User")
        for form in ("", ".read", ".bounded")
    ),
    "all.Device",
    "all.Device.read",
)


def known_scopes() -> list[str]:
    out = list(BROAD)
    for resource, actions in RESOURCES.items():
        out.append(f"{resource}.*")
        out.extend(f"{resource}.{action}" for action in actions)
    return out


def validate_scopes(scopes: Iterable[str]) -> None:
    known = set(known_scopes())
    scopes = list(scopes)
    if not scopes:
        raise Validation("a token needs at least one scope")
    unknown = [s for s in scopes if s not in known]
    if unknown:
        raise Validation(
            f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def accepted(resource: str, action: str, *, read: bool) -> frozenset[str]:
    """The scopes that let a token call ``resource.action``."""
    if action not in RESOURCES[resource]:
        raise KeyError(f"{resource}.{action}")
    out = {f"{resource}.*", f"{resource}.{action}"}
    for who in ("Application", "Organization", "User"):
        out |= {f"all.{who}", f"all.{who}.bounded"}
        if read:
            out.add(f"all.{who}.read")
    if (resource, action) in DEVICE_WIDE:
        out.add("all.Device")
        if read:
            out.add("all.Device.read")
    return frozenset(out)

"""Who an EEA bundle is: its bundle identifier and EEA interface version.

Bundles compiled by Losant's platform export four i32 globals, ``BUNDLE_IDENTIFIER``,
``BUNDLE_IDENTIFIER_LENGTH``, ``INTERFACE_VERSION`` and ``INTERFACE_VERSION_LENGTH``:
each holds an address in the bundle's linear memory; at the ``_LENGTH`` address is
one u8 byte count, at the string address that many UTF-8 bytes. Other bundles carry
custom sections ``bundleIdentifier`` / ``interfaceVersion``. Globals win.

Read statically (the globals' initial values and the data segments) when a bundle
arrives, before anything runs; and from the live instance once it runs (what the
state report and the Losant hello say).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.device.runtime._wasmbin import read_static
from agent.errors import InstantiationError

#: The EEA API this host implements; a bundle's interface must have the same major.
INTERFACE_VERSION = "1.0.0"
_GLOBALS = {
    "identifier": ("BUNDLE_IDENTIFIER", "BUNDLE_IDENTIFIER_LENGTH"),
    "interface": ("INTERFACE_VERSION", "INTERFACE_VERSION_LENGTH"),
}
_SECTIONS = {"identifier": "bundleIdentifier", "interface": "interfaceVersion"}


@dataclass(frozen=True)
class BundleIdentity:
    identifier: str | None = None
    interface_version: str | None = None
    #: Where they were read: "globals", "sections" or None (neither).
    source: str | None = None

    def as_wire(self) -> dict[str, str | None]:
        return {"identifier": self.identifier, "interfaceVersion": self.interface_version}


def _text(raw: bytes | None) -> str | None:
    if not raw:
        return None
    return raw.decode("utf-8", errors="replace").strip("\0") or None


def _from(
    read_global: Callable[[str], int | None], read_memory: Callable[[int, int], bytes | None]
) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for key, (address_name, length_name) in _GLOBALS.items():
        address, length_at = read_global(address_name), read_global(length_name)
        if address is None or length_at is None:
            continue
        length = read_memory(length_at, 1)
        if length:
            found[key] = _text(read_memory(address, length[0]))
    return found


def static_identity(data: bytes) -> BundleIdentity:
    """The identity of a bundle from its bytes alone (nothing is run)."""
    module = read_static(data)
    found = _from(module.exported_globals.get, module.memory)
    if found.get("identifier") or found.get("interface"):
        return BundleIdentity(found.get("identifier"), found.get("interface"), "globals")
    ident = _text(module.custom.get(_SECTIONS["identifier"]))
    interface = _text(module.custom.get(_SECTIONS["interface"]))
    return BundleIdentity(ident, interface, "sections" if ident or interface else None)


def live_identity(
    read_global: Callable[[str], int | None],
    read_memory: Callable[[int, int], bytes | None],
    fallback: BundleIdentity,
) -> BundleIdentity:
    """The identity read from a running instance's globals and memory; ``fallback``
    (the static reading) when the instance exports none."""
    found = _from(read_global, read_memory)
    if found.get("identifier") or found.get("interface"):
        return BundleIdentity(found.get("identifier"), found.get("interface"), "globals")
    return fallback


def check_interface(identity: BundleIdentity) -> None:
    """Refuse an interface whose major version is not this host's (1)."""
    version = identity.interface_version
    if version is None:
        return  # Losant's hello-world bundles carry none
    if version.split(".", 1)[0] != INTERFACE_VERSION.split(".", 1)[0]:
        raise InstantiationError(
            f"EEA bundle interface version {version[:40]!r} is not supported (this host "
            f"implements EEA API {INTERFACE_VERSION}; major version 1 is required)"
        )

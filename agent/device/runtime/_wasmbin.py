"""Reading facts out of a WebAssembly binary without running it.

Used for what a host must know about a module before (or without) instantiating it:
its custom sections, and the initial value of exported constant globals together
with the bytes the active data segments put in memory 0 at start. That is enough to
read a Losant EEA bundle's identity (``BUNDLE_IDENTIFIER`` & co. are exported
globals holding addresses of strings in the bundle's data) at the moment a bundle
arrives, when nothing runs yet.

Everything here is tolerant of hostile input: a malformed binary gives empty
results, never an exception, and every loop is bounded by the input's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_MAGIC = b"\0asm"
_SEC_CUSTOM, _SEC_IMPORT, _SEC_GLOBAL, _SEC_EXPORT, _SEC_DATA = 0, 2, 6, 7, 11
_KIND_FUNC, _KIND_TABLE, _KIND_MEMORY, _KIND_GLOBAL = 0, 1, 2, 3
#: The most bytes a static memory image keeps (bundles' identity strings are tiny;
#: data segments beyond this are skipped rather than copied).
MAX_IMAGE_BYTES = 64 * 1024 * 1024


class _Malformed(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else min(end, len(data))

    def byte(self) -> int:
        if self.pos >= self.end:
            raise _Malformed("unexpected end")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self, bits: int = 32) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result
            if shift >= bits + 7:
                raise _Malformed("LEB128 too long")

    def sleb(self, bits: int) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                if b & 0x40:
                    result -= 1 << shift
                return result
            if shift >= bits + 7:
                raise _Malformed("LEB128 too long")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise _Malformed("length past the end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def name(self) -> str:
        return self.take(self.uleb()).decode("utf-8", errors="replace")

    def limits(self) -> None:
        flags = self.byte()
        self.uleb(64)
        if flags & 1:
            self.uleb(64)

    def const_expr(self) -> int | None:
        """A constant expression; its value if it is a single i32/i64 const."""
        value: int | None = None
        steps = 0
        while True:
            steps += 1
            if steps > 16:
                raise _Malformed("constant expression too long")
            op = self.byte()
            if op == 0x0B:
                return value if steps == 2 else None
            if op == 0x41:
                value = self.sleb(32) & 0xFFFFFFFF
            elif op == 0x42:
                value = self.sleb(64)
            elif op in (0x23, 0xD2):  # global.get, ref.func: not a constant we know
                self.uleb()
                value = None
            elif op == 0x43:
                self.take(4)
            elif op == 0x44:
                self.take(8)
            elif op == 0xD0:
                self.byte()
            else:
                raise _Malformed(f"unsupported opcode 0x{op:02x} in a constant expression")


@dataclass
class StaticModule:
    """What :func:`read_static` found (every part may be empty)."""

    custom: dict[str, bytes] = field(default_factory=dict)
    #: Exported globals whose initial value is an integer constant: name -> value.
    exported_globals: dict[str, int] = field(default_factory=dict)
    #: Active data segments of memory 0: (offset, bytes).
    segments: list[tuple[int, bytes]] = field(default_factory=list)

    def memory(self, address: int, length: int) -> bytes | None:
        """The ``length`` bytes at ``address`` of memory 0 right after instantiation,
        if one data segment holds them all (memory starts zeroed, so bytes no
        segment writes are zero; None when the range straddles segments)."""
        for offset, data in reversed(self.segments):  # later segments win
            if offset <= address and address + length <= offset + len(data):
                return data[address - offset : address - offset + length]
        covered = any(
            offset < address + length and address < offset + len(data)
            for offset, data in self.segments
        )
        return None if covered else bytes(length)


@dataclass
class _Scan:
    out: StaticModule = field(default_factory=StaticModule)
    globals_init: list[int | None] = field(default_factory=list)
    exports: dict[str, int] = field(default_factory=dict)
    image_bytes: int = 0

    def imports(self, body: _Reader) -> None:
        for _ in range(body.uleb()):
            body.name()
            body.name()
            kind = body.byte()
            if kind == _KIND_FUNC:
                body.uleb()
            elif kind == _KIND_TABLE:
                body.byte()
                body.limits()
            elif kind == _KIND_MEMORY:
                body.limits()
            elif kind == _KIND_GLOBAL:
                body.byte()
                body.byte()
                self.globals_init.append(None)  # imported: value unknown here
            else:
                raise _Malformed("unknown import kind")

    def globals(self, body: _Reader) -> None:
        for _ in range(body.uleb()):
            body.byte()  # value type
            body.byte()  # mutability
            self.globals_init.append(body.const_expr())

    def export_section(self, body: _Reader) -> None:
        for _ in range(body.uleb()):
            name = body.name()
            kind = body.byte()
            index = body.uleb()
            if kind == _KIND_GLOBAL:
                self.exports[name] = index

    def data(self, body: _Reader) -> None:
        for _ in range(body.uleb()):
            flags = body.uleb()
            memory = body.uleb() if flags == 2 else 0
            offset = body.const_expr() if flags in (0, 2) else None
            chunk = body.take(body.uleb())
            if flags in (0, 2) and memory == 0 and offset is not None:
                self.image_bytes += len(chunk)
                if self.image_bytes <= MAX_IMAGE_BYTES:
                    self.out.segments.append((offset, chunk))


def read_static(data: bytes) -> StaticModule:
    """Parse ``data``'s custom sections, exported constant globals and active data."""
    scan = _Scan()
    out = scan.out
    if data[:4] != _MAGIC or len(data) < 8:
        return out
    parsers = {
        _SEC_IMPORT: scan.imports,
        _SEC_GLOBAL: scan.globals,
        _SEC_EXPORT: scan.export_section,
        _SEC_DATA: scan.data,
    }
    r = _Reader(data, 8)
    try:
        while r.pos < r.end:
            section = r.byte()
            size = r.uleb()
            body = _Reader(data, r.pos, r.pos + size)
            r.pos += size
            if r.pos > r.end:
                break
            if section == _SEC_CUSTOM:
                name = body.name()
                out.custom.setdefault(name, data[body.pos : body.end])
            elif section in parsers:
                parsers[section](body)
    except _Malformed:
        pass
    for name, index in scan.exports.items():
        value = scan.globals_init[index] if 0 <= index < len(scan.globals_init) else None
        if value is not None:
            out.exported_globals[name] = value
    return out

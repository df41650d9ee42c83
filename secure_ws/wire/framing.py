"""RFC 6455 framing for the server side, with no I/O: bytes in, messages out.

:mod:`secure_ws.uvicorn.ws_protocol` feeds this what the socket delivers once the
handshake is done. It is kept apart from the transport, as ``websockets``
keeps its protocol apart from its I/O, so hostile byte streams can be tested
without a socket.

What it accepts is what RFC 6455 allows a client to send with no extension
negotiated: masked frames, no reserved bits, the six defined opcodes, control
frames of at most 125 bytes and never fragmented, fragments of one message at a
time. A message's size is checked from each frame header, before its payload is
buffered, so an announced 8 EiB frame costs nothing. Anything else stops the
parser with the close code RFC 6455 §7.4.1 gives for it.

Bounds: a fragmented message is gathered in one ``bytearray`` of at most
``max_size`` bytes, and may have at most ``max_size // FRAGMENT_COST`` fragments (at least 16)
(1,024 for the default 64 KiB), so a message that never ends (``FIN=0`` then
empty continuations forever) is refused with 1009 long before it costs anything. An incomplete frame waits in
``_pending``, which never holds more than one frame header plus the payload the
size check allowed.
"""

from __future__ import annotations

from collections.abc import Iterator

try:
    from websockets.speedups import apply_mask  # C; websockets comes with uvicorn[standard]
except ImportError:  # pragma: no cover (a websockets build without its C extension)
    from websockets.utils import apply_mask

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Codes a peer may put in a close frame (RFC 6455 §7.4, IANA registry); 1005, 1006 and 1015 never go on the wire.
_WIRE_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))

Event = tuple[int, str | bytes]

# A message of max_size bytes may come in at most max_size // FRAGMENT_COST fragments: handling a frame
# costs far more than copying its bytes, so empty or 1-byte fragments must not be unlimited.
FRAGMENT_COST = 64
MIN_FRAGMENTS = 16  # however small max_size is


class Violation(Exception):
    """The peer broke the protocol: close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Parser:
    """Turns a client's byte stream into ``(opcode, payload)`` events.

    Text messages come out as ``str`` (invalid UTF-8 is a 1007 violation),
    binary ones as ``bytes``, whole, however they were fragmented; control frames
    (``CLOSE``, ``PING``, ``PONG``) come out as they arrive, between fragments
    if need be. After a violation the parser is spent: :attr:`error` holds it and
    further input is ignored; so is anything after a ``CLOSE``.
    """

    __slots__ = ("max_size", "error", "_closed", "_pending", "_opcode", "_parts", "_size", "_fragments_left")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.error: Violation | None = None
        self._closed = False  # a CLOSE frame ends the stream: what follows it is ignored
        self._pending = b""  # an incomplete frame, waiting for the rest
        self._opcode = 0  # of the fragmented message in progress, 0 when none
        self._parts = bytearray()  # the fragmented message's payload so far
        self._size = 0
        self._fragments_left = 0  # fragments the message in progress may still have

    def feed(self, data: bytes) -> list[Event]:
        """The events completed by ``data``; those before a violation are still returned."""
        events: list[Event] = []
        if self.error is not None or self._closed:
            return events
        if self._pending:
            data = self._pending + data
            self._pending = b""
        elif (
            not self._opcode
            and len(data) >= 6
            and data[0] == 0x81
            and 0x80 <= data[1] < 0xFE
            and len(data) - 6 == data[1] - 0x80 <= self.max_size
        ):
            # The common case, decided from two bytes: exactly one whole, final, masked text frame of
            # under 126 bytes (0x81: FIN + TEXT, no reserved bits; 0x80 + 0..125: masked, short length).
            try:
                return [(TEXT, apply_mask(data[6:], data[2:6]).decode())]
            except UnicodeDecodeError:
                pass  # the general path below reports it
        try:
            pos = self._parse(data, events)
        except Violation as exc:
            self.error = exc
            return events
        if pos < len(data):
            self._pending = data[pos:]
        return events

    def _parse(self, data: bytes, events: list[Event]) -> int:
        pos, end = 0, len(data)
        while end - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            if b0 & 0x70:
                raise Violation(1002, "reserved bits set")
            if not b1 & 0x80:
                raise Violation(1002, "client frame not masked")
            opcode = b0 & 0x0F
            size = b1 & 0x7F
            at = pos + 2
            if size == 126:
                if end - at < 2:
                    break
                size = int.from_bytes(data[at : at + 2], "big")
                at += 2
            elif size == 127:
                if end - at < 8:
                    break
                size = int.from_bytes(data[at : at + 8], "big")
                at += 8
            if opcode >= CLOSE:
                if opcode > PONG:
                    raise Violation(1002, "unknown opcode")
                if size > 125 or not b0 & 0x80:
                    raise Violation(1002, "bad control frame")
            elif opcode > BINARY:
                raise Violation(1002, "unknown opcode")
            elif self._size + size > self.max_size:
                raise Violation(1009, "message too big")
            stop = at + 4 + size
            if stop > end:
                break
            payload = apply_mask(data[at + 4 : stop], data[at : at + 4]) if size else b""
            pos = stop
            if opcode >= CLOSE:
                events.append((opcode, payload))
                if opcode == CLOSE:
                    self._closed = True
                    return end
                continue
            if opcode == CONT:
                if not self._opcode:
                    raise Violation(1002, "continuation without a message")
                self._fragments_left -= 1
                if self._fragments_left < 0:
                    raise Violation(1009, "message too big")
                self._parts += payload
                self._size += size
                if not b0 & 0x80:
                    continue
                opcode, payload = self._opcode, bytes(self._parts)
                self._opcode, self._parts, self._size = 0, bytearray(), 0
            elif self._opcode:
                raise Violation(1002, "new message inside a fragmented one")
            elif not b0 & 0x80:
                self._opcode, self._parts, self._size = opcode, bytearray(payload), size
                self._fragments_left = max(MIN_FRAGMENTS, self.max_size // FRAGMENT_COST) - 1
                continue
            if opcode == TEXT:
                try:
                    events.append((TEXT, payload.decode()))
                except UnicodeDecodeError:
                    raise Violation(1007, "invalid UTF-8") from None
            else:
                events.append((BINARY, payload))
        return pos


def parse_close(payload: bytes) -> tuple[int, str]:
    """A close frame's code and reason (1005 when it carries none), or :class:`Violation`."""
    if not payload:
        return 1005, ""
    code = int.from_bytes(payload[:2], "big")
    if len(payload) < 2 or not (code in _WIRE_CLOSE_CODES or 3000 <= code < 5000):
        raise Violation(1002, "bad close code")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise Violation(1007, "invalid UTF-8 in close reason") from None


# The two header bytes of every short text frame, built once: a reply is framed on every request.
_TEXT_HEADS = tuple(bytes((0x80 | TEXT, size)) for size in range(126))


def frame(opcode: int, payload: bytes | memoryview, fin: bool = True) -> bytes:
    """One unmasked server frame, final unless ``fin`` is False (a fragment that more follow)."""
    size = len(payload)
    if size < 126 and opcode == TEXT and fin:
        return _TEXT_HEADS[size] + payload
    b0 = 0x80 | opcode if fin else opcode
    if size < 126:
        return bytes((b0, size)) + payload
    if size < 65536:
        return bytes((b0, 126)) + size.to_bytes(2, "big") + payload
    return bytes((b0, 127)) + size.to_bytes(8, "big") + payload


def fragments(opcode: int, payload: bytes, size: int) -> Iterator[bytes]:
    """``payload`` as one message of frames carrying at most ``size`` bytes each (RFC 6455 §5.4), made one at a
    time as they are taken."""
    view = memoryview(payload)
    end = len(payload)
    for start in range(0, end, size):
        yield frame(CONT if start else opcode, view[start : start + size], start + size >= end)


def close_frame(code: int, reason: str = "") -> bytes:
    # A control frame holds 125 bytes: 2 for the code, at most 123 for the reason, cut on a character boundary.
    return frame(CLOSE, code.to_bytes(2, "big") + reason.encode()[:123].decode(errors="ignore").encode())

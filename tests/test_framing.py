"""RFC 6455 framing: ``secure_ws.wire.framing`` in process, then ``secure_ws.uvicorn.ws_protocol`` on the real wire.

(a) The sans-I/O parser fed hand-built masked client frames, no socket: whole and split frames, the three
    length encodings, fragmentation with control frames in between, every violation and its close code,
    the size limit read from a header alone; ``parse_close``, ``frame`` and ``close_frame``; and one
    hypothesis property (any fragmentation, any chunking, the same messages out).
(b) Raw bytes over real TLS to real uvicorn, past what a well-behaved client library would send: the close
    codes the server answers violations with, pings, fragments, pipelined requests, the closing handshake,
    and no permessage-deflate in the 101. (A header over 8 KiB answered, not hung, is in test_hardening.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from helpers import Server, run
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ws.wire.framing import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    Parser,
    Violation,
    close_frame,
    fragments,
    frame,
    parse_close,
)

MASK = b"\x37\xfa\x21\x3d"


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True,
                 length: int | None = None, mask: bytes = MASK) -> bytes:
    """One client frame: FIN/RSV/opcode, mask bit and a 7/16/64-bit length (``length`` may lie), mask, payload."""
    size = len(payload) if length is None else length
    head = bytes(((0x80 if fin else 0) | rsv << 4 | opcode,))
    bit = 0x80 if masked else 0
    if size < 126:
        head += bytes((bit | size,))
    elif size < 65536:
        head += bytes((bit | 126,)) + size.to_bytes(2, "big")
    else:
        head += bytes((bit | 127,)) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text(data: str, **kwargs: Any) -> bytes:
    return client_frame(TEXT, data.encode(), **kwargs)


def violation(data: bytes, max_size: int = 65536) -> int | None:
    """The close code a fresh parser ends with after ``data`` (None if it found nothing wrong)."""
    parser = Parser(max_size)
    parser.feed(data)
    return parser.error.code if parser.error else None


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame: final, unmasked, no RSV bits; its (opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    assert b0 & 0xF0 == 0x80 and not b1 & 0x80, f"server frame header {b0:#x} {b1:#x}"
    size = b1 & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    elif size == 127:
        size = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(size)


def decode(data: bytes) -> tuple[int, bytes]:
    """``read_frame`` over bytes in memory; they must hold exactly one frame."""
    async def go() -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        decoded = await read_frame(reader)
        assert await reader.read() == b"", "bytes after the frame"
        return decoded

    return run(go())


# -- (a) the parser ----------------------------------------------------------------------------------


def test_one_text_frame():
    assert Parser(65536).feed(text('{"type":"ping"}')) == [(TEXT, '{"type":"ping"}')]


def test_empty_text_frame_is_empty_string():
    assert Parser(65536).feed(text("")) == [(TEXT, "")]


def test_frame_fed_one_byte_at_a_time():
    parser, data = Parser(65536), text("héllo")
    events = [event for i in range(len(data)) for event in parser.feed(data[i : i + 1])]
    assert events == [(TEXT, "héllo")] and parser.error is None


def test_several_frames_in_one_chunk():
    data = text("a") + client_frame(BINARY, b"\x00\xff") + text("c")
    assert Parser(65536).feed(data) == [(TEXT, "a"), (BINARY, b"\x00\xff"), (TEXT, "c")]


def test_a_longer_length_encoding_is_read_by_its_length_not_taken_for_a_short_frame():
    """A 124-byte text in a 16-bit length field makes a 132-byte frame whose second byte is 0x80 + 126:
    the one-frame shortcut must not read that 126 as the payload size."""
    payload = "x" * 124
    data = bytes((0x81, 0x80 | 126)) + len(payload).to_bytes(2, "big") + MASK
    data += bytes(b ^ MASK[i % 4] for i, b in enumerate(payload.encode()))
    assert len(data) - 6 == 126
    assert Parser(65536).feed(data) == [(TEXT, payload)]


@pytest.mark.parametrize("size", [125, 126, 65535, 65536, 70000], ids=["7-bit", "16-bit-min", "16-bit-max",
                                                                          "64-bit-min", "64-bit"])
def test_length_encodings(size):
    payload = bytes(i % 251 for i in range(size))
    data = client_frame(BINARY, payload)
    assert data[1] & 0x7F == (size if size < 126 else 126 if size < 65536 else 127)
    assert Parser(1 << 20).feed(data) == [(BINARY, payload)]


def test_fragmented_text_is_one_message():
    data = text("he", fin=False) + client_frame(CONT, b"ll", fin=False) + client_frame(CONT, b"o")
    assert Parser(65536).feed(data) == [(TEXT, "hello")]


def test_control_frames_between_fragments_come_out_in_order():
    data = (client_frame(BINARY, b"1", fin=False) + client_frame(PING, b"p") + client_frame(CONT, b"2", fin=False)
            + client_frame(PONG, b"q") + client_frame(CONT, b"3"))
    assert Parser(65536).feed(data) == [(PING, b"p"), (PONG, b"q"), (BINARY, b"123")]


def test_multibyte_character_split_across_fragments():
    euro = "€".encode()
    data = client_frame(TEXT, b"a" + euro[:1], fin=False) + client_frame(CONT, euro[1:2], fin=False) + \
        client_frame(CONT, euro[2:] + b"b")
    assert Parser(65536).feed(data) == [(TEXT, "a€b")]


@pytest.mark.parametrize("payload", [b"\xff", b"a\xc3", b"\xed\xa0\x80", b"\xc0\xaf"],
                         ids=["ff", "truncated", "surrogate", "overlong"])
def test_invalid_utf8_is_1007(payload):
    assert violation(client_frame(TEXT, payload)) == 1007
    assert violation(client_frame(TEXT, b"ok", fin=False) + client_frame(CONT, payload)) == 1007


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(text("x", masked=False), id="unmasked"),
        *(pytest.param(text("x", rsv=bit), id=f"rsv{i}") for i, bit in ((1, 4), (2, 2), (3, 1))),
        *(pytest.param(client_frame(op, b"x"), id=f"opcode-{op:#x}") for op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)),
        pytest.param(client_frame(PING, b"x" * 126), id="126-byte-ping"),
        pytest.param(client_frame(CLOSE, b"\x03\xe8" + b"x" * 124), id="126-byte-close"),
        pytest.param(client_frame(PING, b"x", fin=False), id="fragmented-ping"),
        pytest.param(client_frame(CONT, b"x"), id="cont-without-message"),
        pytest.param(text("a", fin=False) + text("b"), id="text-inside-fragmented"),
        pytest.param(text("a", fin=False) + client_frame(BINARY, b"b", fin=False), id="binary-inside-fragmented"),
    ],
)
def test_protocol_violations_are_1002(data):
    assert violation(data) == 1002


def test_oversize_frame_is_refused_from_its_header_alone():
    header = client_frame(BINARY, length=2**62)  # 10 header bytes + mask, no payload at all
    parser = Parser(65536)
    assert parser.feed(header) == []
    assert parser.error is not None and parser.error.code == 1009
    assert violation(header[:10]) == 1009  # not even the mask is needed


@pytest.mark.parametrize("last, code", [(10, None), (11, 1009)], ids=["exactly-max", "one-over"])
def test_fragments_summing_over_max_size_are_1009(last, code):
    data = client_frame(BINARY, b"a" * 45, fin=False) + client_frame(CONT, b"b" * 45, fin=False) + \
        client_frame(CONT, b"c" * last)
    parser = Parser(100)
    events = parser.feed(data)
    assert (parser.error.code if parser.error else None) == code
    assert events == ([] if code else [(BINARY, b"a" * 45 + b"b" * 45 + b"c" * 10)])


def test_events_before_a_violation_are_returned_and_later_input_ignored():
    parser = Parser(65536)
    assert parser.feed(text("one") + client_frame(PING, b"p") + text("bad", masked=False) + text("after")) == [
        (TEXT, "one"), (PING, b"p")]
    assert parser.error is not None and parser.error.code == 1002
    assert parser.feed(text("later")) == []


def test_nothing_after_a_close_frame_is_parsed():
    parser = Parser(65536)
    assert parser.feed(text("a") + client_frame(CLOSE, b"\x03\xe8") + text("b") + b"\xff\xff") == [
        (TEXT, "a"), (CLOSE, b"\x03\xe8")]
    assert parser.feed(text("c")) == [] and parser.error is None


@given(messages=st.lists(st.text(max_size=300), max_size=8), data=st.data())
@settings(max_examples=300, deadline=None)
def test_any_fragmentation_and_chunking_gives_back_the_messages(messages, data):
    stream = b""
    for message in messages:
        encoded = message.encode()
        cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=4)))
        pieces = [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)], strict=True)]
        for i, piece in enumerate(pieces):
            mask = data.draw(st.binary(min_size=4, max_size=4))
            stream += client_frame(CONT if i else TEXT, piece, fin=i == len(pieces) - 1, mask=mask)
    splits = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    parser = Parser(1 << 20)
    events = [e for a, b in zip([0, *splits], [*splits, len(stream)], strict=True) for e in parser.feed(stream[a:b])]
    assert parser.error is None
    assert events == [(TEXT, message) for message in messages]


# -- parse_close, frame, close_frame -----------------------------------------------------------------


def test_parse_close_without_payload_is_1005():
    assert parse_close(b"") == (1005, "")


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, *range(1007, 1015), 3000, 4999])
def test_parse_close_accepts_wire_codes(code):
    assert parse_close(code.to_bytes(2, "big") + "bye ü".encode()) == (code, "bye ü")


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"\x03", 1002),
        *((c.to_bytes(2, "big"), 1002) for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000)),
        (b"\x03\xe8\xff", 1007),
        (b"\x03\xe8a\xc3", 1007),
    ],
    ids=lambda v: v.hex() if isinstance(v, bytes) else str(v),
)
def test_parse_close_refuses(payload, code):
    with pytest.raises(Violation) as caught:
        parse_close(payload)
    assert caught.value.code == code


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_frame_lengths(size):
    payload = b"z" * size
    data = frame(BINARY, payload)
    assert len(data) - size == (2 if size < 126 else 4 if size < 65536 else 10)
    assert decode(data) == (BINARY, payload)


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_close_frame_reason_is_cut_on_a_character_boundary(char):
    opcode, payload = decode(close_frame(1008, char * 200))
    assert opcode == CLOSE and len(payload) <= 125
    code, reason = parse_close(payload)
    assert code == 1008 and reason and (char * 200).startswith(reason) and len(payload) > 125 - len(char.encode())


# -- (b) the real wire -------------------------------------------------------------------------------


class Raw:
    """A WebSocket client that writes whatever bytes it is given, over real TLS, after a real upgrade."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        self.reader, self.writer, self.head = reader, writer, head

    @classmethod
    async def open(cls, server: Server, token: str, *headers: str) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=server.ssl_context(),
                                                       server_hostname="localhost")
        lines = ["GET /ws HTTP/1.1", f"Host: localhost:{server.port}", "Upgrade: websocket", "Connection: Upgrade",
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
                 f"Authorization: Bearer {token}", *headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        raw = cls(reader, writer, head)
        assert (await raw.recv_json())["type"] == "welcome"
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> tuple[int, bytes]:
        return await asyncio.wait_for(read_frame(self.reader), 5)

    async def recv_json(self) -> Any:
        opcode, payload = await self.recv()
        assert opcode == TEXT, (opcode, payload)
        return json.loads(payload)

    async def ask(self, message: dict[str, Any]) -> Any:
        await self.send(text(json.dumps(message)))
        return await self.recv_json()

    async def close_code(self) -> int:
        """The code of the close frame the server sends next (nothing else may come first), then its EOF."""
        opcode, payload = await self.recv()
        assert opcode == CLOSE and len(payload) >= 2, (opcode, payload)
        assert await asyncio.wait_for(self.reader.read(), 5) == b"", "data after the close frame"
        return int.from_bytes(payload[:2], "big")


def on_wire(server: Server, token: str, script: Any, *headers: str) -> Any:
    """Open a raw connection, run ``await script(raw)``, return what it returns."""
    async def go() -> Any:
        raw = await Raw.open(server, token, *headers)
        try:
            return await script(raw)
        finally:
            raw.writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(raw.writer.wait_closed(), 5)

    return run(go())


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(text('{"type":"ping"}', masked=False), id="unmasked"),
        pytest.param(text('{"type":"ping"}', rsv=4), id="rsv1-without-deflate"),
        pytest.param(client_frame(3, b"{}"), id="opcode-3"),
        pytest.param(client_frame(CLOSE, (1005).to_bytes(2, "big")), id="close-1005"),
    ],
)
def test_violation_on_the_wire_closes_1002(server, issue, data):
    async def script(raw: Raw) -> int:
        await raw.send(data)
        return await raw.close_code()

    assert on_wire(server, issue(), script) == 1002


def test_oversize_announced_length_closes_1009_without_the_payload(server, issue):
    async def script(raw: Raw) -> int:
        await raw.send(client_frame(BINARY, length=2**40))
        return await raw.close_code()

    assert on_wire(server, issue(), script) == 1009


def test_client_close_1000_is_echoed(server, issue):
    async def script(raw: Raw) -> int:
        await raw.send(client_frame(CLOSE, (1000).to_bytes(2, "big") + b"done"))
        return await raw.close_code()

    assert on_wire(server, issue(), script) == 1000


def test_ping_gets_its_pong_and_the_connection_goes_on(server, issue):
    async def script(raw: Raw) -> tuple[Any, Any]:
        await raw.send(client_frame(PING, b"are you there?"))
        return await raw.recv(), await raw.ask({"type": "ping"})

    assert on_wire(server, issue(), script) == ((PONG, b"are you there?"), {"type": "pong"})


def test_fragmented_request_with_a_ping_in_between_is_answered(server, issue):
    request = b'{"type":"echo","data":"fragmented \xc3\xa9"}'

    async def script(raw: Raw) -> list[Any]:
        await raw.send(client_frame(TEXT, request[:10], fin=False) + client_frame(CONT, request[10:27], fin=False)
                       + client_frame(PING, b"mid") + client_frame(CONT, request[27:]))
        return sorted([await raw.recv(), await raw.recv()])

    # The pong for the last ping of a read goes out after that read's replies (RFC 6455 §5.5.3 sets no order).
    assert on_wire(server, issue(), script) == [(TEXT, '{"type":"echo","data":"fragmented é"}'.encode()), (PONG, b"mid")]


def test_ten_pings_in_one_read_get_ten_pongs_in_order(server, issue):
    """Autobahn|Testsuite case 2.10: every ping answered, with its own payload."""
    async def script(raw: Raw) -> list[Any]:
        await raw.send(b"".join(client_frame(PING, b"%d" % n) for n in range(10)))
        return [await raw.recv() for _ in range(10)] + [await raw.ask({"type": "ping"})]

    assert on_wire(server, issue(), script) == [(PONG, b"%d" % n) for n in range(10)] + [{"type": "pong"}]


def test_a_read_of_many_pings_gets_sixteen_pongs_and_one_for_its_last(server, issue):
    """Beyond the first 16 pings of one read only the last is answered: a flood costs 17 pongs a read at most."""
    async def script(raw: Raw) -> list[Any]:
        await raw.send(b"".join(client_frame(PING, b"%d" % n) for n in range(40)))  # one TLS record, one read
        return [await raw.recv() for _ in range(17)] + [await raw.ask({"type": "ping"})]

    expected = [(PONG, b"%d" % n) for n in (*range(16), 39)] + [{"type": "pong"}]
    assert on_wire(server, issue(), script) == expected


def test_two_requests_in_one_write_get_two_replies_in_order(server, issue):
    async def script(raw: Raw) -> list[Any]:
        await raw.send(text('{"type":"echo","data":1}') + text('{"type":"ping","id":2}'))
        return [await raw.recv_json(), await raw.recv_json()]

    assert on_wire(server, issue(), script) == [{"type": "echo", "data": 1}, {"type": "pong", "id": 2}]


def test_permessage_deflate_is_not_negotiated(server, issue):
    async def script(raw: Raw) -> tuple[bytes, Any]:
        return raw.head, await raw.ask({"type": "ping"})

    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
    head, reply = on_wire(server, issue(), script, offer)
    assert b"sec-websocket-extensions" not in head.lower(), head
    assert reply == {"type": "pong"}


def test_own_protocol_only_on_a_tested_uvicorn():
    """The subclass leans on uvicorn's internals: on another minor version uvicorn's own protocol runs."""
    from secure_ws.uvicorn.ws_protocol import supported

    assert supported("0.54.0") and supported("0.54.7")
    assert not supported("0.55.0") and not supported("1.54.0") and not supported("0.5.4")


def test_keepalive_pings_keep_an_answering_client_and_cut_a_silent_one(make_server, issue):
    """uvicorn's keepalive (kept by our protocol) sends pings; our parser hands the pongs back to it.
    A client that answers stays; one that never answers is closed 1011 after the ping timeout."""
    srv = make_server(("--ws-ping-interval", "0.2", "--ws-ping-timeout", "0.4"))

    async def answering(raw: Raw) -> None:
        pings = 0
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.5
        while loop.time() < until:
            opcode, payload = await raw.recv()
            assert opcode == PING, (opcode, payload)
            pings += 1
            await raw.send(client_frame(PONG, payload))
        assert pings >= 3
        await raw.send(text('{"type":"ping"}'))
        while (frame_ := await raw.recv())[0] == PING:  # keepalive pings may come first
            await raw.send(client_frame(PONG, frame_[1]))
        assert frame_ == (TEXT, b'{"type":"pong"}')

    async def silent(raw: Raw) -> int:
        opcode, _ = await raw.recv()
        assert opcode == PING
        return await raw.close_code()  # no pong: the server gives up

    on_wire(srv, issue(), answering)
    assert on_wire(srv, issue(), silent) == 1011


def test_a_large_message_goes_out_as_fragments_that_join_into_it():
    payload = bytes(range(256)) * 1000  # 256,000 bytes: three fragments of 65,536 and one of 59,392
    pieces = list(fragments(TEXT, payload, 65536))
    assert [len(piece) for piece in pieces] == [65536 + 10] * 3 + [59392 + 4]
    assert [piece[0] for piece in pieces] == [TEXT, CONT, CONT, 0x80 | CONT]  # FIN on the last only
    assert b"".join(piece[10:] for piece in pieces[:3]) + pieces[3][4:] == payload
    assert list(fragments(TEXT, b"small", 65536)) == [frame(TEXT, b"small")]

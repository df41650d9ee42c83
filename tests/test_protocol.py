"""SPEC §4–5 on the real wire: the JSON messages, their errors, frame limits and pub/sub basics.

Every test talks to real uvicorn over TLS with a real ``websockets`` client. Each test uses its
own ``sub`` (``issue()`` makes a unique one), so the default 20/second window is never shared.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from helpers import Server, assert_error, base_env, closed_with, recv_json, run, sans_position, unique_sub, welcome


async def ask(ws: Any, message: dict[str, Any] | str, timeout: float = 5.0) -> dict[str, Any]:
    """Like ``conftest.request`` but the reply must be strict JSON."""
    await ws.send(message if isinstance(message, str) else json.dumps(message))
    return await recv_json(ws, timeout)


async def still_alive(ws: Any) -> None:
    """The connection is open and answering: a ping gets its pong."""
    try:
        reply = await ask(ws, {"type": "ping", "id": "alive?"})
    except websockets.ConnectionClosed as exc:
        raise AssertionError(f"connection was closed: {exc.rcvd}") from None
    except TimeoutError:
        raise AssertionError("connection is open but no longer answers a ping") from None
    assert reply == {"type": "pong", "id": "alive?"}, reply


@pytest.fixture(scope="module")
def small(keydir):
    """A server whose largest inbound message is 1024 bytes."""
    srv = Server(keydir, base_env(keydir, SECURE_WS_MAX_MESSAGE_BYTES="1024")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def roomy(keydir):
    """A server accepting messages up to 1 MB, for deeply nested input."""
    srv = Server(keydir, base_env(keydir, SECURE_WS_MAX_MESSAGE_BYTES="1048576")).start()
    yield srv
    srv.stop()


# -- ping, echo, id --------------------------------------------------------------------------


def test_ping_pong(server, issue):
    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            assert await ask(ws, {"type": "ping"}) == {"type": "pong"}
            assert await ask(ws, {"type": "ping"}) == {"type": "pong"}

    run(go())


ECHO_VALUES = [
    pytest.param({"a": 1, "b": "two"}, id="object"),
    pytest.param({}, id="empty-object"),
    pytest.param([1, "two", None, True, False, 1.5], id="array"),
    pytest.param([], id="empty-array"),
    pytest.param("héllo wörld ✓ 😀 中文 ﷽", id="unicode-string"),
    pytest.param("", id="empty-string"),
    pytest.param('quote " backslash \\ newline \n tab \t nul \u0000', id="escapes"),
    pytest.param(0, id="zero"),
    pytest.param(-17, id="negative-int"),
    pytest.param(2**53 + 1, id="int-beyond-double"),
    pytest.param(12345678901234567890123, id="int-beyond-int64"),
    pytest.param(3.141592653589793, id="float"),
    pytest.param(-2.5e-10, id="float-exponent"),
    pytest.param(None, id="null"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param({"a": [{"b": [1, {"c": None, "d": ["x", {"e": {"f": [[[]]]}}]}]}], "g": "ü"}, id="nested"),
]


@pytest.mark.parametrize("data", ECHO_VALUES)
def test_echo_returns_data_unchanged(server, issue, data):
    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            reply = await ask(ws, {"type": "echo", "data": data})
            assert reply == {"type": "echo", "data": data}
            assert type(reply["data"]) is type(data)

    run(go())


@pytest.mark.parametrize("id", ["req-1", "", "ünï-✓", 0, 42, -7, 2**40], ids=repr)
def test_id_is_echoed_in_replies(server, issue, id):
    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            pong = await ask(ws, {"type": "ping", "id": id})
            assert pong == {"type": "pong", "id": id} and type(pong["id"]) is type(id)
            echo = await ask(ws, {"type": "echo", "id": id, "data": [1]})
            assert echo == {"type": "echo", "id": id, "data": [1]} and type(echo["id"]) is type(id)

    run(go())


@pytest.mark.parametrize("id", ["abc", 7])
def test_id_is_echoed_in_error_frames(server, issue, id):
    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            assert_error(await ask(ws, {"type": "no-such-type", "id": id}), "unknown_type", id)
            assert_error(await ask(ws, {"type": "echo", "id": id}), "bad_request", id)
            assert_error(await ask(ws, {"id": id}), "bad_request", id)
            assert_error(await ask(ws, {"type": 5, "id": id}), "bad_request", id)
            assert_error(await ask(ws, {"type": "subscribe", "channel": "a b", "id": id}), "bad_request", id)
            await still_alive(ws)

    run(go())


# -- errors never close the connection ------------------------------------------------------------

BAD_REQUESTS = [
    pytest.param("hello", id="not-json-word"),
    pytest.param("{", id="truncated-object"),
    pytest.param('{"type":"ping"', id="unterminated"),
    pytest.param('{"type":"ping",}', id="trailing-comma"),
    pytest.param("{'type':'ping'}", id="single-quotes"),
    pytest.param("", id="empty-frame"),
    pytest.param("   ", id="whitespace-only"),
    pytest.param('{"type":"ping"} {"type":"ping"}', id="two-documents"),
    pytest.param('[{"type":"ping"}]', id="top-level-array"),
    pytest.param("[]", id="empty-array"),
    pytest.param('"ping"', id="top-level-string"),
    pytest.param("42", id="top-level-number"),
    pytest.param("null", id="top-level-null"),
    pytest.param("true", id="top-level-true"),
    pytest.param("{}", id="missing-type"),
    pytest.param('{"data":1}', id="missing-type-with-data"),
    pytest.param('{"type":1}', id="type-number"),
    pytest.param('{"type":null}', id="type-null"),
    pytest.param('{"type":["ping"]}', id="type-array"),
    pytest.param('{"type":{"ping":1}}', id="type-object"),
    pytest.param('{"type":true}', id="type-bool"),
    pytest.param('{"type":"ping","id":1.5}', id="id-float"),
    pytest.param('{"type":"ping","id":1.0}', id="id-float-integral"),
    pytest.param('{"type":"ping","id":true}', id="id-bool"),
    pytest.param('{"type":"ping","id":{"a":1}}', id="id-object"),
    pytest.param('{"type":"ping","id":[1]}', id="id-array"),
    pytest.param('{"type":"echo"}', id="echo-without-data"),
    pytest.param('{"type":"echo","data":NaN}', id="NaN"),
    pytest.param('{"type":"echo","data":Infinity}', id="Infinity"),
    pytest.param('{"type":"echo","data":-Infinity}', id="minus-Infinity"),
    pytest.param('{"type":"echo","data":[1,NaN]}', id="NaN-in-array"),
    pytest.param('{"type":"echo","data":"ctl\x01char"}', id="raw-control-char-in-string"),
    pytest.param('{"type":"echo","data":01}', id="leading-zero"),
    pytest.param('{"type":"subscribe"}', id="subscribe-without-channel"),
    pytest.param('{"type":"publish","channel":"room.x"}', id="publish-without-data"),
    pytest.param('{"type":"refresh"}', id="refresh-without-token"),
    pytest.param('{"type":"refresh","token":42}', id="refresh-token-not-string"),
]


@pytest.mark.parametrize("frame", BAD_REQUESTS)
def test_bad_request_keeps_connection_open(server, issue, frame):
    async def go():
        async with server.connect(issue(scope="subscribe:room.* publish:room.*")) as ws:
            await welcome(ws)
            assert_error(await ask(ws, frame), "bad_request")
            await still_alive(ws)

    run(go())


@pytest.mark.parametrize("kind", ["PING", "Ping", "pong", "welcome", "message", "error", "hello", "x" * 200])
def test_unknown_type(server, issue, kind):
    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            assert_error(await ask(ws, {"type": kind}), "unknown_type")
            await still_alive(ws)

    run(go())


def test_many_errors_in_a_row_do_not_close(server, issue):
    """Errors never close, even a run of them (below the rate limit)."""

    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            for frame in ("nope", "[]", '{"type":7}', '{"type":"nope"}', '{"type":"echo"}') * 2:
                reply = await ask(ws, frame)
                assert reply["type"] == "error" and reply["code"] in ("bad_request", "unknown_type"), reply
            await still_alive(ws)

    run(go())


@pytest.mark.parametrize("opener,closer", [("[", "]"), ('{"a":', "}")], ids=["arrays", "objects"])
def test_deeply_nested_json_is_bad_request_not_a_fault(roomy, issue, opener, closer):
    depth = 100_000

    async def go():
        async with roomy.connect(issue()) as ws:
            await welcome(ws)
            inner = opener * depth + ("1" if opener != "[" else "") + closer * depth
            # nested as the whole frame…
            assert_error(await ask(ws, inner), "bad_request")
            await still_alive(ws)
            # …and as echo data
            assert_error(await ask(ws, '{"type":"echo","data":' + inner + "}"), "bad_request")
            await still_alive(ws)
            # unterminated nesting
            assert_error(await ask(ws, opener * depth), "bad_request")
            await still_alive(ws)

    run(go())


def test_huge_integer_is_refused_or_echoed_never_a_fault(server, issue):
    digits = "7" * 5000

    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            for text in ('{"type":"echo","data":' + digits + "}", '{"type":"echo","data":[-' + digits + "]}",
                         '{"type":"ping","id":' + digits + "}"):
                await ws.send(text)
                raw = await asyncio.wait_for(ws.recv(), 5)  # a close (1011) would raise here
                reply = json.loads(raw) if "error" in raw[:20] else None
                if reply is not None:
                    assert_error(reply, "bad_request")
                else:  # echoed faithfully (as data, or as the id of a pong)
                    assert raw.startswith(('{"type":"echo"', '{"type":"pong"')) and digits in raw, raw[:80]
                await still_alive(ws)

    run(go())


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "[1e999]"])
def test_number_overflowing_a_double_never_produces_invalid_json(server, issue, literal):
    """``1e400`` is valid JSON; a reply must be valid JSON too (no ``Infinity``): refuse it or echo it faithfully."""

    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            reply = await ask(ws, '{"type":"echo","data":' + literal + "}")  # strict JSON parse of the reply
            if reply["type"] == "error":
                assert_error(reply, "bad_request")
            else:
                assert reply["type"] == "echo", reply
            await still_alive(ws)

    run(go())


def test_lone_surrogate_escape_is_refused_or_echoed_never_a_fault(server, issue):
    r"""``"\ud800"`` is syntactically valid JSON but no UTF-8 text can carry it: bad_request, not 1011."""

    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            await ws.send('{"type":"echo","data":"a\\ud800b"}')
            try:
                reply = await recv_json(ws)
            except websockets.ConnectionClosed as exc:
                raise AssertionError(f"connection closed on a client error: {exc.rcvd}") from None
            if reply["type"] == "error":
                assert_error(reply, "bad_request")
            else:
                assert reply == {"type": "echo", "data": "a\ud800b"}, reply
            await still_alive(ws)

    run(go())


# -- frame-level closes -------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"\x00\x01binary", b'{"type":"ping"}'], ids=["bytes", "json-in-binary"])
def test_binary_frame_closes_1003(server, issue, payload):
    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(payload)
            code, _ = await closed_with(ws)
            assert code == 1003

    run(go())


def echo_of_size(size: int, char: str = "x") -> str:
    """An echo request of exactly ``size`` UTF-8 bytes, padded with ``char`` (the last one ASCII if needed)."""
    head, tail = '{"type":"echo","data":"', '"}'
    room = size - len((head + tail).encode())
    width = len(char.encode())
    text = head + char * (room // width) + "x" * (room % width) + tail
    assert len(text.encode()) == size
    return text


@pytest.mark.parametrize("char", ["x", "é", "✓", "😀"], ids=["ascii", "2-byte", "3-byte", "4-byte"])
def test_message_exactly_at_the_limit_is_accepted(small, issue, char):
    text = echo_of_size(1024, char)

    async def go():
        async with small.connect(issue()) as ws:
            await welcome(ws)
            reply = await ask(ws, text)
            assert reply == json.loads(text)
            await still_alive(ws)

    run(go())


@pytest.mark.parametrize("char", ["x", "é", "✓", "😀"], ids=["ascii", "2-byte", "3-byte", "4-byte"])
def test_message_one_byte_over_the_limit_closes_1009(small, issue, char):
    text = echo_of_size(1025, char)

    async def go():
        async with small.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(text)
            code, _ = await closed_with(ws)
            assert code == 1009

    run(go())


@pytest.mark.parametrize("char", ["é", "✓", "😀"], ids=["2-byte", "3-byte", "4-byte"])
def test_limit_counts_utf8_bytes_not_characters(small, issue, char):
    # Far fewer than 1024 characters, but more than 1024 bytes once encoded.
    count = 1024 // len(char.encode()) + 8
    text = '{"type":"echo","data":"' + char * count + '"}'
    assert len(text) < 1024 < len(text.encode())

    async def go():
        async with small.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(text)
            code, _ = await closed_with(ws)
            assert code == 1009

    run(go())


def test_fragmented_message_is_measured_whole(small, issue):
    at_limit, over = echo_of_size(1024), echo_of_size(1025)

    async def go():
        async with small.connect(issue()) as ws:
            await welcome(ws)
            await ws.send([at_limit[i : i + 100] for i in range(0, len(at_limit), 100)])
            assert await recv_json(ws) == json.loads(at_limit)
            await ws.send([over[i : i + 100] for i in range(0, len(over), 100)])
            code, _ = await closed_with(ws)
            assert code == 1009

    run(go())


def test_default_limit_is_65536_bytes(server, issue):
    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            text = echo_of_size(65536)
            assert await ask(ws, text) == json.loads(text)
            await ws.send(echo_of_size(65537))
            code, _ = await closed_with(ws)
            assert code == 1009

    run(go())


async def send_raw_text_frame(ws: Any, payload: bytes) -> None:
    """Send a text frame whose payload is arbitrary bytes, bypassing the client's UTF-8 encoding."""
    async with ws.send_context():
        ws.protocol.send_text(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe",
        b'{"type":"echo","data":"\xc3"}',  # truncated 2-byte sequence
        b'{"type":"echo","data":"\xed\xa0\x80"}',  # an encoded surrogate (CESU-8), not UTF-8
        b'{"type":"echo","data":"\xc0\xaf"}',  # overlong encoding of '/'
        b'{"type":"echo","data":"\xf4\x90\x80\x80"}',  # beyond U+10FFFF
    ],
    ids=["ff-fe", "truncated", "surrogate", "overlong", "beyond-10ffff"],
)
def test_invalid_utf8_closes_1007(server, issue, payload):
    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            await send_raw_text_frame(ws, payload)
            code, _ = await closed_with(ws)
            assert code == 1007

    run(go())


def test_raw_frame_helper_sends_valid_text_normally(server, issue):
    """The raw-frame path used above does reach the server as a text frame (guards the 1007 test)."""

    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            await send_raw_text_frame(ws, '{"type":"echo","data":"é"}'.encode())
            assert await recv_json(ws) == {"type": "echo", "data": "é"}

    run(go())


# -- subscribe, unsubscribe, publish ----------------------------------------------------------------

ROOMS = "subscribe:room.* publish:room.*"


def test_subscribe_publish_deliver(server, issue):
    publisher_sub = unique_sub("pub")
    data = {"text": "héllo 😀", "n": [1, 2.5, None, True]}

    async def go():
        async with server.connect(issue(scope=ROOMS)) as alice, server.connect(
            issue(scope=ROOMS)
        ) as bob, server.connect(issue(sub=publisher_sub, scope=ROOMS)) as pub:
            for ws in (alice, bob, pub):
                await welcome(ws)
            assert sans_position(await ask(alice, {"type": "subscribe", "channel": "room.lobby"})) == {
                "type": "subscribed", "channel": "room.lobby"}
            assert sans_position(await ask(bob, {"type": "subscribe", "channel": "room.lobby", "id": 9})) == {
                "type": "subscribed", "channel": "room.lobby", "id": 9}
            assert await ask(pub, {"type": "publish", "channel": "room.lobby", "data": data, "id": "p1"}) == {
                "type": "published", "channel": "room.lobby", "id": "p1"}
            expected = {"type": "message", "channel": "room.lobby", "from": publisher_sub, "data": data}
            assert sans_position(await recv_json(alice)) == expected
            assert sans_position(await recv_json(bob)) == expected
            await still_alive(alice)

    run(go())


@pytest.mark.parametrize("data", [None, "", [], 0, "ünï"], ids=repr)
def test_publish_any_json_value(server, issue, data):
    async def go():
        async with server.connect(issue(scope=ROOMS)) as sub, server.connect(issue(scope=ROOMS)) as pub:
            await welcome(sub)
            hello = await welcome(pub)
            await ask(sub, {"type": "subscribe", "channel": "room.any"})
            assert await ask(pub, {"type": "publish", "channel": "room.any", "data": data}) == {
                "type": "published", "channel": "room.any"}
            assert sans_position(await recv_json(sub)) == {"type": "message", "channel": "room.any", "from": hello["sub"], "data": data}

    run(go())


def test_unsubscribe_stops_delivery(server, issue):
    async def go():
        async with server.connect(issue(scope=ROOMS)) as sub, server.connect(issue(scope=ROOMS)) as pub:
            await welcome(sub)
            await welcome(pub)
            await ask(sub, {"type": "subscribe", "channel": "room.a"})
            await ask(sub, {"type": "subscribe", "channel": "room.b"})
            assert await ask(sub, {"type": "unsubscribe", "channel": "room.a", "id": "u"}) == {
                "type": "unsubscribed", "channel": "room.a", "id": "u"}
            assert (await ask(pub, {"type": "publish", "channel": "room.a", "data": "A"}))["type"] == "published"
            assert (await ask(pub, {"type": "publish", "channel": "room.b", "data": "B"}))["type"] == "published"
            first = await recv_json(sub)  # room.a was published first: it must not arrive
            assert first["channel"] == "room.b" and first["data"] == "B", first

    run(go())


def test_messages_only_reach_subscribers_of_that_channel(server, issue):
    async def go():
        async with server.connect(issue(scope=ROOMS)) as sub, server.connect(issue(scope=ROOMS)) as pub:
            await welcome(sub)
            await welcome(pub)
            await ask(sub, {"type": "subscribe", "channel": "room.two"})
            await ask(pub, {"type": "publish", "channel": "room.one", "data": 1})
            await ask(pub, {"type": "publish", "channel": "room.two", "data": 2})
            assert (await recv_json(sub))["data"] == 2

    run(go())


def test_forbidden_without_scope(server, issue):
    async def go():
        async with server.connect(issue()) as ws:  # no scope claim at all
            await welcome(ws)
            assert_error(await ask(ws, {"type": "subscribe", "channel": "room.lobby", "id": 1}), "forbidden", 1)
            assert_error(await ask(ws, {"type": "publish", "channel": "room.lobby", "data": 1}), "forbidden")
            await still_alive(ws)
        async with server.connect(issue(scope="")) as ws:
            await welcome(ws)
            assert_error(await ask(ws, {"type": "subscribe", "channel": "room.lobby"}), "forbidden")
            await still_alive(ws)

    run(go())


def test_subscribe_right_does_not_grant_publish_and_vice_versa(server, issue):
    async def go():
        async with server.connect(issue(scope="subscribe:room.*")) as ws:
            await welcome(ws)
            assert (await ask(ws, {"type": "subscribe", "channel": "room.x"}))["type"] == "subscribed"
            assert_error(await ask(ws, {"type": "publish", "channel": "room.x", "data": 1}), "forbidden")
        async with server.connect(issue(scope="publish:room.*")) as ws:
            await welcome(ws)
            assert (await ask(ws, {"type": "publish", "channel": "room.x", "data": 1}))["type"] == "published"
            assert_error(await ask(ws, {"type": "subscribe", "channel": "room.x"}), "forbidden")
            await still_alive(ws)

    run(go())


def test_scope_pattern_is_a_glob_not_a_regex(server, issue):
    async def go():
        async with server.connect(issue(scope="subscribe:room.lobby publish:room.lobby")) as ws:
            await welcome(ws)
            assert (await ask(ws, {"type": "subscribe", "channel": "room.lobby"}))["type"] == "subscribed"
            assert_error(await ask(ws, {"type": "subscribe", "channel": "roomXlobby"}), "forbidden")
            assert_error(await ask(ws, {"type": "publish", "channel": "roomXlobby", "data": 1}), "forbidden")
            assert_error(await ask(ws, {"type": "subscribe", "channel": "room.lobby2"}), "forbidden")
            assert_error(await ask(ws, {"type": "subscribe", "channel": "xroom.lobby"}), "forbidden")
        async with server.connect(issue(scope=ROOMS)) as ws:
            await welcome(ws)
            assert_error(await ask(ws, {"type": "subscribe", "channel": "roomXlobby"}), "forbidden")
            assert_error(await ask(ws, {"type": "subscribe", "channel": "lobby"}), "forbidden")
            assert_error(await ask(ws, {"type": "subscribe", "channel": "aroom.x"}), "forbidden")
            # '*' matches any run of characters, dots and colons included
            assert (await ask(ws, {"type": "subscribe", "channel": "room.a.b:c-d_e"}))["type"] == "subscribed"
        async with server.connect(issue(scope="subscribe:a+b subscribe:x|y subscribe:[ab]")) as ws:
            await welcome(ws)  # regex metacharacters in a pattern are literal, never operators
            assert_error(await ask(ws, {"type": "subscribe", "channel": "aab"}), "forbidden")
            assert_error(await ask(ws, {"type": "subscribe", "channel": "x"}), "forbidden")
            assert_error(await ask(ws, {"type": "subscribe", "channel": "a"}), "forbidden")

    run(go())


BAD_CHANNELS = [
    pytest.param("", id="empty"),
    pytest.param("r" * 129, id="129-chars"),
    pytest.param("room lobby", id="space"),
    pytest.param("room/lobby", id="slash"),
    pytest.param("room.lobby\n", id="trailing-newline"),
    pytest.param("rööm", id="non-ascii"),
    pytest.param("room*", id="star"),
    pytest.param(123, id="number"),
    pytest.param(None, id="null"),
    pytest.param(["room.x"], id="array"),
]


@pytest.mark.parametrize("channel", BAD_CHANNELS)
def test_bad_channel_name_is_bad_request(server, issue, channel):
    async def go():
        async with server.connect(issue(scope="subscribe:* publish:*")) as ws:
            await welcome(ws)
            for request_ in (
                {"type": "subscribe", "channel": channel, "id": "s"},
                {"type": "unsubscribe", "channel": channel, "id": "u"},
                {"type": "publish", "channel": channel, "data": 1, "id": "p"},
            ):
                assert_error(await ask(ws, request_), "bad_request", request_["id"])
            await still_alive(ws)

    run(go())


def test_longest_channel_name_is_accepted(server, issue):
    channel = "A-z_0.9:" * 16
    assert len(channel) == 128

    async def go():
        async with server.connect(issue(scope="subscribe:* publish:*")) as ws:
            await welcome(ws)
            assert sans_position(await ask(ws, {"type": "subscribe", "channel": channel})) == {"type": "subscribed", "channel": channel}
            assert await ask(ws, {"type": "publish", "channel": channel, "data": 1}) == {
                "type": "published", "channel": channel}
            assert (await recv_json(ws))["channel"] == channel  # subscribed to it itself
            assert await ask(ws, {"type": "unsubscribe", "channel": channel}) == {
                "type": "unsubscribed", "channel": channel}

    run(go())


def test_unencodable_publication_never_breaks_subscribers(server, issue):
    r"""A publisher sending ``"\ud800"`` must not leave subscribers closed, silenced, or fed invalid JSON."""

    async def go():
        async with server.connect(issue(scope=ROOMS)) as sub, server.connect(issue(scope=ROOMS)) as pub:
            await welcome(sub)
            await welcome(pub)
            await ask(sub, {"type": "subscribe", "channel": "room.s"})
            reply = await ask(pub, '{"type":"publish","channel":"room.s","data":"\\ud800"}')
            if reply["type"] == "error":
                assert_error(reply, "bad_request")
            else:
                assert reply == {"type": "published", "channel": "room.s"}
                try:
                    message = await recv_json(sub)
                except TimeoutError:
                    raise AssertionError("'published', yet the subscriber never got the message") from None
                assert message["data"] == "\ud800", message
            await still_alive(pub)
            await still_alive(sub)

    run(go())


def test_overflowing_number_publication_is_valid_json_for_subscribers(server, issue):
    async def go():
        async with server.connect(issue(scope=ROOMS)) as sub, server.connect(issue(scope=ROOMS)) as pub:
            await welcome(sub)
            await welcome(pub)
            await ask(sub, {"type": "subscribe", "channel": "room.n"})
            reply = await ask(pub, '{"type":"publish","channel":"room.n","data":1e400}')
            if reply["type"] == "error":
                assert_error(reply, "bad_request")
            else:
                assert reply == {"type": "published", "channel": "room.n"}
                await recv_json(sub)  # must parse as strict JSON
            await still_alive(sub)

    run(go())

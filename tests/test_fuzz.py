"""Fuzzing the message layer (SPEC §4, §5) with hypothesis.

(a) ``secure_ws.wire.messages`` in process: ``decode`` is total (a request dict or ``ProtocolError``, nothing
    else), agrees with a reference on random JSON, and what it accepts can be sent back as strict JSON;
    ``channel_of`` and ``Grants`` against reference implementations.
(b) a whole ``Session`` in process, driven through fake ASGI ``receive``/``send`` like
    ``scripts/microbench.py`` does: whatever frames arrive, it sends only valid JSON objects of a known
    type, or one close with a SPEC code; never 1011, never an exception, and it always finishes.
(c) the real wire: one server, one connection, a few hundred seeded random frames.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import closed_with, run, unique_sub, welcome
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_ws.auth.scopes import Grants
from secure_ws.auth.signing import SigningKeys, issue_token
from secure_ws.core.session import Session
from secure_ws.service import Service
from secure_ws.settings import load_settings
from secure_ws.wire.messages import CHANNEL, ProtocolError, channel_of, decode, reply

REPLY_TYPES = {"welcome", "pong", "echo", "subscribed", "unsubscribed", "published", "message", "refreshed", "history", "error"}
ERROR_CODES = {"bad_request", "unknown_type", "forbidden", "rate_limited"}
SPEC_CLOSE_CODES = {1003, 1007, 1008, 1009, 1001}
CLOSE_REASONS_1008 = {"rate limit exceeded", "invalid token", "token expired", "token revoked", "slow consumer"}
MAX_BYTES = 2048


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN/Infinity, which are not JSON (RFC 8259)."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def assert_valid_frame(text: Any) -> dict[str, Any]:
    assert isinstance(text, str), f"a text frame that is not str: {text!r}"
    text.encode("utf-8")  # uvicorn must be able to put it on the wire (no lone surrogates)
    frame = strict_json(text)
    assert type(frame) is dict and frame.get("type") in REPLY_TYPES, frame
    if frame["type"] == "error":
        assert frame["code"] in ERROR_CODES, frame
        assert isinstance(frame["message"], str), frame
        if frame["code"] == "rate_limited":
            assert type(frame["retry_after_ms"]) is int and frame["retry_after_ms"] >= 0, frame
    if "id" in frame:
        assert type(frame["id"]) in (str, int), frame
    return frame


# -- strategies ---------------------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Pick a strategy with the given weights (``one_of`` picks its branches about evenly)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(table).flatmap(lambda strategy: strategy)


REQUEST_TYPES = weighted(
    (12, st.sampled_from(["ping", "echo", "subscribe", "unsubscribe", "publish", "refresh", "history"])),  # reach dispatch
    (1, st.sampled_from(["PING", "Ping", "pong", "message", "welcome", "", " ping"])),
    (1, st.text(max_size=10)),
    (1, st.integers() | st.none() | st.lists(st.text(max_size=3), max_size=2)),
)
CHANNELS = weighted(
    (6, st.sampled_from(["room.1", "room.lobby", "room.a:b-c_d", "other", "x" * 128, "room." + "x" * 123])),
    (2, st.sampled_from(["x" * 129, "", "room 1", "room.*", "ROOM.1", "room.é", "room.1\n", "room.\u0000"])),
    (1, st.text(max_size=20) | st.integers() | st.none() | st.lists(st.integers(), max_size=2)),
)
VALID_IDS = st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=20) | st.just("x" * 128)
INVALID_IDS = (
    st.text(min_size=129, max_size=140)
    | st.just(10**130)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
IDS = weighted((4, VALID_IDS), (1, INVALID_IDS))
TOKEN_KINDS = ("same-sub", "other-sub", "expired", "forged", "garbage", "empty")
TOKENS = weighted((5, st.sampled_from(TOKEN_KINDS).map(lambda kind: f"<<{kind}>>")), (1, st.integers() | st.none()))

# SPEC §11 positions: well-formed (some matching nothing), and everything else a client could send.
SINCES = weighted(
    (3, st.fixed_dictionaries({"offset": st.integers(min_value=0, max_value=2**53), "epoch": st.text(min_size=1, max_size=64)})),
    (2, st.fixed_dictionaries({"offset": st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=3),
                               "epoch": st.text(max_size=80) | st.integers()})),
    (1, JSON_VALUES),
)
LIMITS = st.integers(min_value=-(2**70), max_value=2**70) | JSON_VALUES
REQUESTS = st.fixed_dictionaries(
    {"type": REQUEST_TYPES},
    optional={"id": IDS, "channel": CHANNELS, "data": JSON_VALUES, "token": TOKENS, "extra": JSON_VALUES,
              "since": SINCES, "limit": LIMITS},
)


@st.composite
def frames(draw: Any, hostile: bool = False) -> tuple[str, Any]:
    """One inbound frame: ("json", object, ensure_ascii) | ("text", str) | ("bytes", bytes)."""
    options = [
        (30, REQUESTS.map(lambda r: ("json", r, True))),
        (10, REQUESTS.map(lambda r: ("json", r, False))),
        (4, JSON_VALUES.map(lambda v: ("json", v, True))),
        (4, st.text(max_size=60).map(lambda t: ("text", t))),
        (3, st.sampled_from(['{"type":"ping"', "{", "[]", "null", '"ping"', "{}", '{"type":null}', "\ufeff{}", " ",
                             '{"type":"ping","type":"echo"}', '{"type":"echo","data":1,"data":2}']).map(lambda t: ("text", t))),
        (1, st.binary(max_size=40).map(lambda b: ("bytes", b))),
        (1, st.integers(min_value=MAX_BYTES - 4, max_value=MAX_BYTES + 4).map(lambda n: ("text", "x" * n))),
        (1, st.integers(min_value=MAX_BYTES // 2 - 2, max_value=MAX_BYTES // 2 + 2).map(lambda n: ("text", "é" * n))),
    ]
    if hostile:
        options.append((20, st.sampled_from(HOSTILE_LITERALS).map(lambda t: ("text", t))))
    return draw(weighted(*options))


HOSTILE_LITERALS = [
    '{"type":"echo","data":1e999}',
    '{"type":"echo","data":-1e400,"id":1}',
    '{"type":"echo","data":[1E400]}',
    '{"type":"publish","channel":"room.1","data":{"n":1e309}}',
    '{"type":"echo","data":"a\\ud800b"}',
    '{"type":"echo","data":"\\udfff"}',
    '{"type":"publish","channel":"room.1","data":"\\ud83d"}',
    '{"type":"echo","data":"\\ud83d\\ude00"}',  # a valid surrogate pair: fine
    '{"type":"echo","data":' + "1" * 5000 + "}",
    '{"type":"echo","data":NaN}',
    '{"type":"echo","data":Infinity}',
    '{"type":"echo","data":' + "[" * 900 + "]" * 900 + "}",
    '{"type":"echo","data":' + "[" * 5000 + "]" * 5000 + "}",
    '{"type":"echo","data":' + '{"a":' * 700 + "0" + "}" * 700 + "}",
    '{"type":"subscribe","channel":"room.1"}',
]


# -- (a) protocol in process ------------------------------------------------------------------------------


def _check_decoded(text: str) -> dict[str, Any] | None:
    try:
        message = decode(text)
    except ProtocolError as exc:
        assert exc.code == "bad_request", exc.code
        assert isinstance(exc.message, str) and exc.message
        assert exc.id is None or type(exc.id) in (str, int)
        return None
    assert type(message) is dict and type(message["type"]) is str, message
    assert message.get("id") is None or type(message["id"]) in (str, int)
    return message


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=()), max_size=200))
def test_decode_is_total_on_any_text(text):
    _check_decoded(text)


@settings(max_examples=400, deadline=None)
@given(JSON_VALUES | REQUESTS, st.booleans())
def test_decode_agrees_with_a_reference_on_json(value, ensure_ascii):
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    message = _check_decoded(text)
    id = value.get("id") if isinstance(value, dict) else None
    valid = (
        isinstance(value, dict)
        and type(value.get("type")) is str
        and (id is None or (type(id) in (str, int) and len(str(id)) <= 128))
    )
    if valid:
        assert message == value
    else:
        assert message is None, f"accepted {value!r}"


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=200_000), st.sampled_from(["[", '{"a":', '{"type":"echo","data":[']))
def test_decode_survives_deep_nesting(depth, opener):
    closer = {"[": "]", '{"a":': "}", '{"type":"echo","data":[': "]}"}[opener]
    _check_decoded(opener * depth + "0" + closer * depth)
    _check_decoded(opener * depth)  # unterminated


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=20_000), st.sampled_from(["", "-", "0.", "1e", "1e-", "-0."]))
def test_decode_survives_huge_numbers(digits, prefix):
    number = prefix + "9" * digits
    _check_decoded('{"type":"echo","data":' + number + "}")
    _check_decoded('{"type":"echo","id":' + number + "}")
    _check_decoded(number)


HOSTILE_VALUES = [
    "1e999", "-1e400", "[1E400]", '{"n":1e309}', "1" * 5000, "NaN", "Infinity", "-Infinity",
    '"a\\ud800b"', '"\\udfff"', '"\\ud83d"', '"\\ud83d\\ude00"', "[" * 900 + "]" * 900,
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(HOSTILE_VALUES) | JSON_VALUES.map(json.dumps), IDS | st.none())
def test_accepted_requests_reencode_as_strict_utf8_json(data, id):
    """Whatever ``decode`` accepts may be echoed back: the reply must be JSON a peer can parse (no Infinity)
    and text a WebSocket can carry (UTF-8, so no lone surrogates)."""
    text = '{"type":"echo","id":' + json.dumps(id) + ',"data":' + data + "}"
    message = _check_decoded(text)
    if message is None:
        return
    out = reply(message, {"type": "echo", "data": message["data"]})
    out.encode("utf-8")
    assert strict_json(out)["type"] == "echo"


@settings(max_examples=400, deadline=None)
@given(CHANNELS | JSON_VALUES, IDS | st.none())
def test_channel_of_accepts_exactly_the_spec_names(channel, id):
    request = {"type": "subscribe", "channel": channel}
    if id is not None:
        request["id"] = id
    expected = type(channel) is str and re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", channel, flags=re.ASCII) is not None
    try:
        got = channel_of(request)
    except ProtocolError as exc:
        assert not expected, f"refused {channel!r}"
        assert exc.code == "bad_request" and exc.id == id
        return
    assert expected and got == channel, f"accepted {channel!r}"
    assert CHANNEL.fullmatch(got)


def glob_reference(pattern: str, name: str) -> bool:
    """'*' matches any run of characters (including none); every other character only itself."""
    # classic DP, independent of the regex translation under test
    n, m = len(pattern), len(name)
    row = [True] + [False] * m
    for i in range(1, n + 1):
        new = [row[0] and pattern[i - 1] == "*"] + [False] * m
        for j in range(1, m + 1):
            if pattern[i - 1] == "*":
                new[j] = new[j - 1] or row[j]
            else:
                new[j] = row[j - 1] and pattern[i - 1] == name[j - 1]
        row = new
    return row[m]


NAME_CHARS = st.sampled_from(list("ab.:-_X9*") + ["?", "[", "]", "\\", "(", ")", "+", "$", "^", "|", "{", "}"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(NAME_CHARS, max_size=8), max_size=3), st.lists(st.text(NAME_CHARS, max_size=8), max_size=3),
       st.text(NAME_CHARS, max_size=10), st.lists(st.text(max_size=12), max_size=3))
def test_grants_follow_the_glob_reference(sub_patterns, pub_patterns, channel, junk_scopes):
    scopes = tuple([f"subscribe:{p}" for p in sub_patterns] + [f"publish:{p}" for p in pub_patterns] + junk_scopes)
    grants = Grants(scopes)
    sub_ok = any(glob_reference(s[10:], channel) for s in scopes if s.startswith("subscribe:"))
    pub_ok = any(glob_reference(s[8:], channel) for s in scopes if s.startswith("publish:"))
    assert grants.may_subscribe(channel) is sub_ok
    assert grants.may_publish(channel) is pub_ok


# -- (b) a whole Session in process -----------------------------------------------------------------------


class Harness:
    """Key material and settings for in-process sessions (no network, no os.environ changes)."""

    def __init__(self, folder: Path) -> None:
        self.base = {
            "SECURE_WS_JWKS_FILE": str(folder / "jwks.json"),
            "SECURE_WS_SIGNING_KEYS_FILE": str(folder / "signing-keys.json"),
            "SECURE_WS_REVOCATION_FILE": str(folder / "revocations.json"),
            "SECURE_WS_MAX_MESSAGE_BYTES": str(MAX_BYTES),
        }
        SigningKeys(load_settings(self.base, env_file=None)).rotate("EdDSA")
        self.settings = {
            "fast": load_settings({**self.base, "SECURE_WS_RATE_LIMIT": "1000000/second"}, env_file=None),
            "tight": load_settings(
                {**self.base, "SECURE_WS_RATE_LIMIT": "8/second", "SECURE_WS_RATE_LIMIT_CLOSE_AFTER": "3"}, env_file=None
            ),
        }
        s = self.settings["fast"]
        self.sub = "fuzzer"
        self.scope = "subscribe:room.* publish:room.*"
        self.tokens = {
            "main": issue_token(self.sub, scope=self.scope, ttl=900, settings=s),
            "same-sub": issue_token(self.sub, scope="subscribe:room.1", ttl=900, settings=s),
            "other-sub": issue_token("someone-else", scope=self.scope, ttl=900, settings=s),
            "expired": issue_token(self.sub, scope=self.scope, ttl=60, settings=s, now=time.time() - 3600),
            "garbage": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
            "empty": "",
        }
        main = self.tokens["main"]
        head, payload, sig = main.split(".")
        self.tokens["forged"] = f"{head}.{payload}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}"

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("token"), str) and value["token"].startswith("<<"):
            value = {**value, "token": self.tokens[value["token"][2:-2]]}
        return value

    def inbound(self, frame: tuple) -> dict[str, Any]:
        if frame[0] == "json":
            return {"type": "websocket.receive", "text": json.dumps(self.resolve(frame[1]), ensure_ascii=frame[2])}
        if frame[0] == "text":
            return {"type": "websocket.receive", "text": frame[1]}
        return {"type": "websocket.receive", "bytes": frame[1]}

    async def drive(self, frames: list[tuple], profile: str) -> tuple[list[dict], list[dict]]:
        """Run one session over ``frames`` then a client disconnect; return (inbound, outbound) ASGI messages."""
        settings_ = self.settings[profile]
        service = Service(settings_)
        async with service.lifespan():
            return await self._drive(service, frames)

    async def _drive(self, service: Service, frames: list[tuple]) -> tuple[list[dict], list[dict]]:
        principal = await service.authenticate(self.tokens["main"])
        inbound = [{"type": "websocket.connect"}, *(self.inbound(f) for f in frames),
                   {"type": "websocket.disconnect", "code": 1000}]
        queue: asyncio.Queue = asyncio.Queue()
        for message in inbound:
            queue.put_nowait(message)
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            if queue.empty():  # the session must not read past the disconnect
                raise AssertionError("receive() called after websocket.disconnect")
            await asyncio.sleep(0)  # as a real server would, let other tasks (publication delivery) run
            return queue.get_nowait()

        assert service.session_deps is not None
        session = Session(service.session_deps, send, principal)
        await asyncio.wait_for(session.run(receive, "secure-ws.v1"), timeout=10)
        await asyncio.sleep(0)  # let a publication drainer finish, if any
        return inbound, sent


def check_session_output(inbound: list[dict], sent: list[dict], max_bytes: int = MAX_BYTES) -> None:
    assert sent and sent[0] == {"type": "websocket.accept", "subprotocol": "secure-ws.v1"}, sent[:1]
    closes = [i for i, m in enumerate(sent) if m["type"] == "websocket.close"]
    assert len(closes) <= 1, [sent[i] for i in closes]
    if closes:
        assert closes[0] == len(sent) - 1, f"sent after close: {sent[closes[0] + 1:][:3]}"
        close = sent[-1]
        code, reason = close["code"], close.get("reason", "")
        assert code in SPEC_CLOSE_CODES, f"closed {code} {reason!r}"
        if code == 1003:
            assert any("bytes" in m for m in inbound[1:]), "1003 without a binary frame"
        if code == 1009:
            assert any(len((m.get("text") or "").encode("utf-8", "surrogatepass")) > max_bytes
                       for m in inbound[1:]), "1009 without an oversized frame"
        if code == 1008:
            assert reason in CLOSE_REASONS_1008, reason
    frames = [m for m in sent[1:] if m["type"] != "websocket.close"]
    for m in frames:
        assert m["type"] == "websocket.send" and set(m) == {"type", "text"}, m
        assert_valid_frame(m["text"])
    assert frames and strict_json(frames[0]["text"])["type"] == "welcome"


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Harness:
    return Harness(tmp_path_factory.mktemp("fuzz-keys"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(frames(), max_size=25), st.sampled_from(["fast", "fast", "tight"]))
def test_session_survives_random_frames(harness, frame_list, profile):
    inbound, sent = asyncio.run(harness.drive(frame_list, profile))
    check_session_output(inbound, sent)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(frames(hostile=True), min_size=1, max_size=12))
def test_session_survives_hostile_literals(harness, frame_list):
    """Overflowing numbers, lone surrogate escapes, NaN, deep nesting, 5000-digit integers."""
    inbound, sent = asyncio.run(harness.drive(frame_list, "fast"))
    check_session_output(inbound, sent)


def test_session_control_replies_are_what_the_spec_says(harness):
    """A fixed script through the same harness, so the fuzz checks above are known to see real replies."""
    script = [
        ("json", {"type": "ping", "id": 1}, True),
        ("json", {"type": "echo", "data": {"a": [1, 2.5, None]}}, True),
        ("json", {"type": "subscribe", "channel": "room.1"}, True),
        ("json", {"type": "publish", "channel": "room.1", "data": "hi"}, True),
        ("json", {"type": "subscribe", "channel": "secret"}, True),
        ("json", {"type": "refresh", "token": "<<same-sub>>"}, True),
        ("text", "nope"),
        ("bytes", b"\x00"),
        ("json", {"type": "ping"}, True),  # after the close: ignored
    ]
    inbound, sent = asyncio.run(harness.drive(script, "fast"))
    check_session_output(inbound, sent)
    out = [strict_json(m["text"]) for m in sent if m["type"] == "websocket.send"]
    types = [(f["type"], f.get("code")) for f in out]
    assert types[:2] == [("welcome", None), ("pong", None)], types
    assert ("echo", None) in types and ("subscribed", None) in types and ("published", None) in types
    assert ("message", None) in types and ("forbidden" in [c for _, c in types])
    assert ("refreshed", None) in types and ("error", "bad_request") in types
    # the refreshed scope (subscribe:room.1 only) still covers room.1: no forced unsubscribe
    assert sent[-1]["type"] == "websocket.close" and sent[-1]["code"] == 1003


# -- (c) the real wire ----------------------------------------------------------------------------------


def random_frame(rng: random.Random, tokens: dict[str, str]) -> str:
    """A text frame that must be answered without closing: a request with random fields, or junk."""

    def value(depth: int = 0) -> Any:
        kind = rng.randrange(9 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.randint(-(2**64), 2**64)
        if kind == 3:
            return rng.uniform(-1e300, 1e300)
        if kind in (4, 5):
            return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF),
                                            rng.randrange(0xE000, 0x10FFFF)])) for _ in range(rng.randrange(12)))
        if kind in (6, 7):
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {str(value(3)): value(depth + 1) for _ in range(rng.randrange(4))}

    roll = rng.random()
    if roll < 0.1:
        return rng.choice(["", "{", "[]", "null", "0", '"x"', "{}", "nope", '{"type":1}', '{"id":[]}', "\ufeff{}",
                           '{"type":"echo"', '{"type":"ping","id":' + "9" * 200 + "}"])
    if roll < 0.2:
        return json.dumps(value())
    message: dict[str, Any] = {"type": rng.choice(["ping", "echo", "subscribe", "unsubscribe", "publish", "refresh",
                                                   "PING", "", "nope", 7])}
    for field, chance in (("id", 0.5), ("channel", 0.7), ("data", 0.7), ("token", 0.2)):
        if rng.random() < chance:
            if field == "channel":
                message[field] = rng.choice(["room.1", "room.2", "room." + "z" * 123, "x" * 129, "other", "secret.1",
                                             "", "a b", None, 3, ["room.1"]])
            elif field == "id":
                message[field] = rng.choice([rng.randint(-99, 10**12), f"req-{rng.randrange(1000)}", None, 1.5,
                                             "x" * 129, [1]])
            elif field == "token":
                message[field] = rng.choice([tokens["same-sub"], 5, None])  # refresh with a bad token closes by design
            else:
                message[field] = value()
    if message["type"] == "refresh" and message.get("token") not in (tokens["same-sub"], None) and rng.random() < 0.5:
        message["token"] = tokens["same-sub"]
    return json.dumps(message, ensure_ascii=rng.random() < 0.5)


def test_wire_fuzz_one_connection(make_server, issue):
    import websockets

    srv = make_server(SECURE_WS_RATE_LIMIT="100000/second")
    sub = unique_sub("fuzz")
    scope = "subscribe:room.* publish:room.*"
    tokens = {"same-sub": issue(sub=sub, scope=scope)}
    rng = random.Random(20240611)
    frames_ = [random_frame(rng, tokens) for _ in range(300)]
    kinds: dict[str, int] = {}

    async def go():
        async with srv.connect(issue(sub=sub, scope=scope)) as ws:
            await welcome(ws)
            for n, text in enumerate(frames_):
                await ws.send(text)
                sentinel = f"sentinel-{n}"
                await ws.send(json.dumps({"type": "ping", "id": sentinel}))
                while True:
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 5)
                    except websockets.ConnectionClosed as exc:
                        code = exc.rcvd.code if exc.rcvd else None
                        raise AssertionError(f"closed {code} after frame {n}: {text[:200]!r}") from None
                    frame = assert_valid_frame(raw)
                    if frame.get("id") == sentinel:
                        assert frame["type"] == "pong"
                        break
                    key = frame["type"] + ("/" + frame["code"] if frame["type"] == "error" else "")
                    kinds[key] = kinds.get(key, 0) + 1
            await ws.send(b"\x01\x02")
            assert await closed_with(ws) == (1003, "binary frames are not accepted")

    started = time.monotonic()
    run(go())
    assert time.monotonic() - started < 20
    # the fuzz did reach every branch that matters, not just the JSON parser
    for kind in ("pong", "echo", "subscribed", "published", "error/bad_request", "error/unknown_type",
                 "error/forbidden"):
        assert kinds.get(kind), f"the fuzz never produced {kind}: {kinds}"
    assert "Traceback" not in srv.log() and "server fault" not in srv.log()

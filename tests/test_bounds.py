"""Bounds on what one hostile client can make the server do: scope globs matched in linear time,
a cap on subscriptions per connection, NumericDate claims that must be numbers, and log lines that a
client-chosen value cannot split or colour. Real uvicorn over TLS, real ``websockets`` client.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from helpers import Server, base_env, refusal, request, run, sans_position, wait_for, welcome
from hypothesis import given, settings
from hypothesis import strategies as st
from test_settings import assert_one_clear_line, start_failure

from secure_ws.auth.scopes import Glob, Grants
from secure_ws.settings import load_settings


def wait_for_log(server: Server, needle: str, timeout: float = 10.0) -> str:
    """The server's log once it contains ``needle`` (records reach the file asynchronously)."""

    def logged() -> str | None:
        text = server.log()
        return text if needle in text else None

    return wait_for(logged, timeout, f"{needle!r} logged")


# -- 6. scope globs: linear time, same meaning ------------------------------------------------


def reference_glob(pattern: str, channel: str) -> bool:
    """The meaning SPEC §5 gives a pattern: ``*`` is any run of characters, everything else literal."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), channel, re.DOTALL) is not None


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet="ab.*", max_size=10), st.text(alphabet="ab.", max_size=12))
def test_glob_agrees_with_the_regex_reference(pattern, channel):
    assert Glob(pattern).matches(channel) == reference_glob(pattern, channel)


@pytest.mark.parametrize(
    "pattern,channel,expected",
    [
        ("room.*", "room.a.b", True),
        ("room.*", "room.", True),  # '*' may match nothing
        ("room.lobby", "roomXlobby", False),  # '.' is literal
        ("*", "", True),
        ("a*a", "a", False),  # head and tail may not share the one 'a'
        ("a*a", "aa", True),
        ("*ab*ab*", "abab", True),
        ("*ab*ab*", "aba", False),
        ("a**b", "ab", True),
        ("*.*.*.*.*.*.x", "." * 127, False),
        ("*.*.*.*.*.*.x", "." * 126 + "x", True),
    ],
)
def test_glob_examples(pattern, channel, expected):
    assert Glob(pattern).matches(channel) is expected
    assert reference_glob(pattern, channel) is expected


def test_pattern_longer_than_any_channel_is_dropped_at_the_bound_not_before():
    longest = "a" * 128
    assert Grants(("subscribe:" + longest + "*",)).may_subscribe(longest)
    # 129 literal characters can match no channel (at most 128): such a pattern is never matched against.
    assert not Grants(("subscribe:" + longest + "a*", "publish:*" + longest + "a")).may_publish(longest)


HOSTILE_PATTERN = "*.*.*.*.*.*.x"  # as a .* regex, failing on a run of dots backtracks for ~40 s


def test_hostile_scope_is_answered_at_once_and_other_clients_are_served_meanwhile(server, issue):
    async def go():
        hostile = issue(scope=f"subscribe:{HOSTILE_PATTERN} publish:{HOSTILE_PATTERN}")
        async with server.connect(hostile) as attacker, server.connect(issue()) as bystander:
            await welcome(attacker)
            await welcome(bystander)
            dots = "." * 127
            for id, kind in enumerate(("subscribe", "publish", "subscribe")):
                await attacker.send(json.dumps({"type": kind, "id": id, "channel": dots, "data": 1}))
            # The bystander asks while the attacker's checks are queued or running: one event loop serves both.
            assert await request(bystander, {"type": "ping", "id": "b"}) == {"type": "pong", "id": "b"}
            for id in range(3):
                frame = json.loads(await asyncio.wait_for(attacker.recv(), 5))
                assert (frame["type"], frame["code"], frame["id"]) == ("error", "forbidden", id)
            matching = "." * 126 + "x"
            assert sans_position(await request(attacker, {"type": "subscribe", "channel": matching})) == {
                "type": "subscribed", "channel": matching,
            }

    run(go())


# -- 8. subscriptions per connection ------------------------------------------------------------


def test_subscriptions_beyond_the_cap_are_limit_exceeded_and_the_connection_stays(make_server, issue):
    srv = make_server(SECURE_WS_MAX_SUBSCRIPTIONS="3", SECURE_WS_RATE_LIMIT="1000/second")

    async def go():
        async with srv.connect(issue(scope="subscribe:* publish:*")) as ws:
            await welcome(ws)
            for name in ("c.1", "c.2", "c.3"):
                assert (await request(ws, {"type": "subscribe", "channel": name}))["type"] == "subscribed"
            refused = await request(ws, {"type": "subscribe", "id": 9, "channel": "c.4"})
            assert refused["type"] == "error" and refused["code"] == "limit_exceeded" and refused["id"] == 9, refused
            assert isinstance(refused["message"], str) and refused["message"]
            # A channel already held is not a new subscription.
            assert (await request(ws, {"type": "subscribe", "channel": "c.2"}))["type"] == "subscribed"
            # The refused one really was not joined: a publication on it is not delivered (only the reply is).
            assert (await request(ws, {"type": "publish", "channel": "c.4", "data": 1}))["type"] == "published"
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}
            # Leaving frees a place.
            assert (await request(ws, {"type": "unsubscribe", "channel": "c.1"}))["type"] == "unsubscribed"
            assert (await request(ws, {"type": "subscribe", "channel": "c.4"}))["type"] == "subscribed"
            assert (await request(ws, {"type": "subscribe", "channel": "c.5"}))["code"] == "limit_exceeded"

    run(go())


def test_default_cap_is_128_subscriptions(make_server, issue):
    srv = make_server(SECURE_WS_RATE_LIMIT="1000/second")

    async def go():
        async with srv.connect(issue(scope="subscribe:*")) as ws:
            await welcome(ws)
            for i in range(128):
                await ws.send(json.dumps({"type": "subscribe", "channel": f"room.{i}"}))
            for i in range(128):
                assert sans_position(json.loads(await asyncio.wait_for(ws.recv(), 5))) == {"type": "subscribed", "channel": f"room.{i}"}
            assert (await request(ws, {"type": "subscribe", "channel": "room.128"}))["code"] == "limit_exceeded"

    run(go())


def test_max_subscriptions_is_read_from_the_environment():
    assert load_settings({}, env_file=None).max_subscriptions == 128
    assert load_settings({"SECURE_WS_MAX_SUBSCRIPTIONS": "7"}, env_file=None).max_subscriptions == 7


@pytest.mark.parametrize("value", ["many", "0", "-1", "1.5"])
def test_bad_max_subscriptions_stops_startup_with_one_line(keydir, tmp_path, value):
    code, output = start_failure(keydir, tmp_path, base_env(keydir, SECURE_WS_MAX_SUBSCRIPTIONS=value))
    assert_one_clear_line(code, output, "SECURE_WS_MAX_SUBSCRIPTIONS")


# -- 10. NumericDate claims must be numbers --------------------------------------------------------


@pytest.mark.parametrize(
    "claim,value",
    [
        ("exp", True),
        ("exp", False),
        ("exp", "1"),  # a string PyJWT would read as the year 1970
        ("exp", 10**400),  # a JSON number too big for a float
        ("exp", float("inf")),
        ("nbf", True),
        ("nbf", float("nan")),
        ("iat", False),
    ],
    ids=repr,
)
def test_non_number_dates_are_invalid_token_not_expired(server, forge, good_claims, claim, value):
    assert run(refusal(server, forge(good_claims(**{claim: value})))) == (1008, "invalid token")


def test_control_a_past_numeric_exp_is_still_token_expired(server, forge, good_claims):
    now = int(time.time())
    assert run(refusal(server, forge(good_claims(iat=now - 600, exp=now - 300)))) == (1008, "token expired")


# -- 11. no raw control character from a client in any log line --------------------------------


HOSTILE_SUB = "evil\r\nFAKE LINE\x1b[31mred\x00\x7f\x85\u2028FAKE SEPARATED\u2029\x9b"
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # anything but the file's own newlines


async def hostile_session(srv: Server, issue) -> str:
    async with srv.connect(issue(sub=HOSTILE_SUB)) as ws:
        hello = await welcome(ws)
        assert hello["sub"] == HOSTILE_SUB  # the client's own sub goes back to it unchanged, as JSON
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
    return hello["connection_id"]


def assert_no_forged_lines(text: str) -> None:
    assert "\x1b" not in text and "\r" not in text
    assert not RAW_CONTROL.search(text), repr(RAW_CONTROL.search(text).group())
    for line in text.splitlines():  # splitlines also breaks at \x85, \u2028, \u2029, \v, \f
        assert not line.startswith("FAKE"), line


ESCAPED_SUB = "evil\\x0d\\x0aFAKE LINE\\x1b[31mred\\x00\\x7f\\x85\\u2028FAKE SEPARATED\\u2029\\x9b"


def test_control_characters_from_clients_are_escaped_in_the_text_log(make_server, issue):
    srv = make_server()
    connection_id = run(hostile_session(srv, issue))
    wait_for_log(srv, f"session {connection_id} sub={ESCAPED_SUB} open")
    wait_for_log(srv, f"session {connection_id} sub={ESCAPED_SUB} disconnected")
    assert_no_forged_lines(srv.log())


def test_control_characters_from_clients_are_escaped_in_the_json_log(make_server, issue):
    srv = make_server(SECURE_WS_LOG_FORMAT="json")
    connection_id = run(hostile_session(srv, issue))
    text = wait_for_log(srv, '"event": "disconnect"')
    assert_no_forged_lines(text)
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    subs = {r["sub"] for r in records if r.get("connection_id") == connection_id}
    assert subs == {ESCAPED_SUB}

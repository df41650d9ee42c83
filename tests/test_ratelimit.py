"""SPEC §4 rate limit on the real wire: per-``sub`` window, ``rate_limited`` errors, abuse close, strategies.

Timing robustness on a slow, noisy machine:

* exact counts use windows of a minute, so a burst (milliseconds) practically never spans a boundary;
* tests with one-second windows start their burst just after a wall-clock second begins
  (``limits`` aligns its buckets to the clock; a true sliding window does not care), leaving
  ~0.9 s for a burst that takes a few milliseconds;
* sleeps only ever wait for a window to open: sleeping longer than planned can only open it more,
  so a slow machine cannot make an assertion fail.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets
from helpers import Server, base_env, closed_with, request, run, sans_position, unique_sub, welcome


@pytest.fixture(scope="module")
def serve(keydir):
    """``serve(**env)``: one server per distinct configuration, shared by the module (unique subs per test)."""
    started: dict[tuple[tuple[str, str], ...], Server] = {}

    def get(**env: str) -> Server:
        key = tuple(sorted(env.items()))
        if key not in started:
            started[key] = Server(keydir, base_env(keydir, **env)).start()
        return started[key]

    yield get
    for srv in started.values():
        srv.stop()


PER_MINUTE = {"SECURE_WS_RATE_LIMIT": "5/minute"}
PER_SECOND = {"SECURE_WS_RATE_LIMIT": "5/second"}


async def read(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def burst(ws: Any, frames: list[Any]) -> list[dict[str, Any]]:
    """Send every frame first, then read one reply per frame."""
    for frame in frames:
        await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
    return [await read(ws) for _ in frames]


def pings(start: int, count: int) -> list[dict[str, Any]]:
    return [{"type": "ping", "id": i} for i in range(start, start + count)]


def assert_pongs(replies: list[dict[str, Any]], start: int) -> None:
    assert replies == [{"type": "pong", "id": i} for i in range(start, start + len(replies))], replies


def assert_rate_limited(frame: dict[str, Any], window_ms: int) -> int:
    assert frame.get("type") == "error" and frame.get("code") == "rate_limited", frame
    retry = frame.get("retry_after_ms")
    assert type(retry) is int and retry > 0, frame
    assert retry <= 2 * window_ms, f"retry_after_ms={retry} for a {window_ms} ms window"
    return retry


async def start_of_second(extra: float = 0.0) -> None:
    """Sleep until just after the next wall-clock second begins (plus ``extra`` whole seconds)."""
    now = time.time()
    await asyncio.sleep(1 - (now % 1) + 0.02 + extra)


# -- the basic contract -------------------------------------------------------------------------


def test_welcome_announces_the_configured_limit(serve, issue):
    srv = serve(**PER_MINUTE)

    async def go():
        async with srv.connect(issue()) as ws:
            assert (await welcome(ws))["rate_limit"] == "5/minute"

    run(go())


def test_burst_first_n_answered_then_rate_limited(serve, issue):
    srv = serve(**PER_MINUTE)

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            replies = await burst(ws, pings(0, 9))
            assert_pongs(replies[:5], 0)
            for frame in replies[5:]:
                assert_rate_limited(frame, 60_000)

    run(go())


def test_burst_on_a_one_second_window(serve, issue):
    srv = serve(**PER_SECOND)

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            await start_of_second()
            replies = await burst(ws, pings(0, 8))
            assert_pongs(replies[:5], 0)
            for frame in replies[5:]:
                assert_rate_limited(frame, 1_000)

    run(go())


def test_rejected_frames_are_dropped_not_executed(serve, issue):
    """A frame over the limit is dropped: a rejected publish reaches no subscriber."""
    srv = serve(**PER_MINUTE)
    scope = "subscribe:room.* publish:room.*"
    witness = unique_sub("witness")

    async def go():
        async with srv.connect(issue(scope=scope)) as listener, srv.connect(
            issue(scope=scope)
        ) as noisy, srv.connect(issue(sub=witness, scope=scope)) as other:
            for ws in (listener, noisy, other):
                await welcome(ws)
            assert (await request(listener, {"type": "subscribe", "channel": "room.rl"}))["type"] == "subscribed"
            assert_pongs(await burst(noisy, pings(0, 5)), 0)
            dropped = await request(noisy, {"type": "publish", "channel": "room.rl", "data": "dropped"})
            assert_rate_limited(dropped, 60_000)
            assert (await request(other, {"type": "publish", "channel": "room.rl", "data": "kept"}))["type"] == "published"
            first = sans_position(await read(listener))  # the dropped publication, had it gone out, would come first
            assert first == {"type": "message", "channel": "room.rl", "from": witness, "data": "kept"}, first

    run(go())


def test_invalid_frames_count_as_hits(serve, issue):
    srv = serve(**PER_MINUTE)

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            replies = await burst(ws, ["not json", "[]", '{"type":"nope"}', '{"type":"echo"}', "{"])
            assert all(r["type"] == "error" and r["code"] in ("bad_request", "unknown_type") for r in replies), replies
            assert_rate_limited(await request(ws, {"type": "ping"}), 60_000)
            # and a refused frame over the limit is answered rate_limited, not bad_request
            assert_rate_limited(await request(ws, "still not json"), 60_000)

    run(go())


# -- keyed by sub ---------------------------------------------------------------------------------


def test_window_is_shared_by_connections_of_one_sub(serve, issue):
    srv = serve(**PER_MINUTE)
    sub = unique_sub()

    async def go():
        async with srv.connect(issue(sub=sub)) as a, srv.connect(issue(sub=sub)) as b:
            await welcome(a)
            await welcome(b)
            assert_pongs(await burst(a, pings(0, 3)), 0)
            assert_pongs(await burst(b, pings(3, 2)), 3)
            assert_rate_limited(await request(b, {"type": "ping"}), 60_000)
            assert_rate_limited(await request(a, {"type": "ping"}), 60_000)

    run(go())


def test_window_is_shared_even_across_different_tokens_of_one_sub(serve, issue):
    srv = serve(**PER_MINUTE)
    sub = unique_sub()

    async def go():
        async with srv.connect(issue(sub=sub, ttl=600)) as a, srv.connect(issue(sub=sub, ttl=900)) as b:
            await welcome(a)
            await welcome(b)
            assert_pongs(await burst(a, pings(0, 5)), 0)
            assert_rate_limited(await request(b, {"type": "ping"}), 60_000)

    run(go())


def test_windows_are_independent_across_subs(serve, issue):
    srv = serve(**PER_MINUTE)

    async def go():
        async with srv.connect(issue()) as x, srv.connect(issue()) as y:
            await welcome(x)
            await welcome(y)
            assert_pongs(await burst(x, pings(0, 5)), 0)
            assert_rate_limited(await request(x, {"type": "ping"}), 60_000)
            assert_pongs(await burst(y, pings(0, 5)), 0)  # y's window is untouched by x
            assert_rate_limited(await request(y, {"type": "ping"}), 60_000)

    run(go())


def test_reconnecting_does_not_refill_the_window(serve, issue):
    srv = serve(**PER_MINUTE)
    sub = unique_sub()

    async def go():
        async with srv.connect(issue(sub=sub)) as ws:
            await welcome(ws)
            assert_pongs(await burst(ws, pings(0, 4)), 0)
        async with srv.connect(issue(sub=sub)) as ws:  # same token holder, new connection
            await welcome(ws)
            assert_pongs(await burst(ws, pings(4, 1)), 4)
            assert_rate_limited(await request(ws, {"type": "ping"}), 60_000)
        async with srv.connect(issue(sub=sub)) as ws:  # and a fresh token for the same sub
            await welcome(ws)
            assert_rate_limited(await request(ws, {"type": "ping"}), 60_000)

    run(go())


def test_connecting_alone_is_not_a_message_hit(serve, issue):
    """The handshake and the welcome are not inbound frames: only frames the client sends count."""
    srv = serve(**PER_MINUTE)
    sub = unique_sub()

    async def go():
        for _ in range(6):
            async with srv.connect(issue(sub=sub)) as ws:
                await welcome(ws)
        async with srv.connect(issue(sub=sub)) as ws:
            await welcome(ws)
            assert_pongs(await burst(ws, pings(0, 5)), 0)

    run(go())


# -- the window opens again -----------------------------------------------------------------------


def test_window_slides_open_again_after_waiting(serve, issue):
    srv = serve(**PER_SECOND)

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            await start_of_second()
            assert_pongs(await burst(ws, pings(0, 5)), 0)
            assert_rate_limited(await request(ws, {"type": "ping"}), 1_000)
            await asyncio.sleep(2.2)  # past two whole windows: everything in it has expired
            assert_pongs(await burst(ws, pings(10, 5)), 10)

    run(go())


@pytest.mark.parametrize("strategy", ["sliding-window", "moving-window", "fixed-window"])
def test_retry_after_is_honest(serve, issue, strategy):
    """After waiting ``retry_after_ms`` (plus a margin), a frame is accepted again."""
    srv = serve(SECURE_WS_RATE_LIMIT="3/second", SECURE_WS_RATE_LIMIT_STRATEGY=strategy)

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            await start_of_second()
            assert_pongs(await burst(ws, pings(0, 3)), 0)
            retry = assert_rate_limited(await request(ws, {"type": "ping"}), 1_000)
            await asyncio.sleep(retry / 1000 + 0.1)
            assert await request(ws, {"type": "ping", "id": 99}) == {"type": "pong", "id": 99}

    run(go())


# -- abuse closes ------------------------------------------------------------------------------------


def test_consecutive_rejections_close_1008(serve, issue):
    srv = serve(SECURE_WS_RATE_LIMIT="5/minute", SECURE_WS_RATE_LIMIT_CLOSE_AFTER="3")

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            assert_pongs(await burst(ws, pings(0, 5)), 0)
            for i in range(3):  # exactly CLOSE_AFTER rejected frames, no more
                await ws.send(json.dumps({"type": "ping", "id": 100 + i}))
            rejected = 0
            try:
                async with asyncio.timeout(5):
                    while True:
                        assert_rate_limited(json.loads(await ws.recv()), 60_000)
                        rejected += 1
            except websockets.ConnectionClosed as exc:
                assert exc.rcvd is not None, "dropped without a close frame"
                assert (exc.rcvd.code, exc.rcvd.reason) == (1008, "rate limit exceeded")
            except TimeoutError:
                raise AssertionError(f"not closed after 3 rejected frames in a row ({rejected} errors seen)") from None
            assert rejected >= 2, "the rejected frames before the last are answered rate_limited"

    run(go())


def test_default_close_after_is_ten(serve, issue):
    srv = serve(**PER_MINUTE)

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            assert_pongs(await burst(ws, pings(0, 5)), 0)
            for frame in await burst(ws, pings(5, 9)):  # nine rejections: still open
                assert_rate_limited(frame, 60_000)
            await ws.send(json.dumps({"type": "ping"}))  # the tenth
            try:
                assert_rate_limited(await read(ws), 60_000)
            except websockets.ConnectionClosed:
                pass
            assert await closed_with(ws) == (1008, "rate limit exceeded")

    run(go())


def test_invalid_frames_over_the_limit_also_lead_to_the_close(serve, issue):
    srv = serve(SECURE_WS_RATE_LIMIT="5/minute", SECURE_WS_RATE_LIMIT_CLOSE_AFTER="3")

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            for _ in range(8):
                await ws.send("garbage")
            assert await closed_with(ws) == (1008, "rate limit exceeded")

    run(go())


def test_accepted_frame_resets_the_consecutive_count(serve, issue):
    srv = serve(SECURE_WS_RATE_LIMIT="2/second", SECURE_WS_RATE_LIMIT_CLOSE_AFTER="3")

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            await start_of_second()
            assert_pongs(await burst(ws, pings(0, 2)), 0)
            for frame in await burst(ws, pings(2, 2)):  # two rejected in a row: one short of the close
                assert_rate_limited(frame, 1_000)
            await start_of_second(extra=1.0)  # two whole windows later: the window is empty again
            assert_pongs(await burst(ws, pings(10, 2)), 10)  # accepted: the streak starts over
            # Two more rejections keep it open (had the count not been reset, 2 + 1 = 3 would close here)…
            for frame in await burst(ws, pings(12, 2)):
                assert_rate_limited(frame, 1_000)
            # …and the third in this new streak closes.
            await ws.send(json.dumps({"type": "ping"}))
            try:
                assert_rate_limited(await read(ws), 1_000)
            except websockets.ConnectionClosed:
                pass
            assert await closed_with(ws) == (1008, "rate limit exceeded")

    run(go())


def test_other_subs_are_unaffected_by_an_abusive_one(serve, issue):
    srv = serve(SECURE_WS_RATE_LIMIT="5/minute", SECURE_WS_RATE_LIMIT_CLOSE_AFTER="3")

    async def go():
        async with srv.connect(issue()) as abuser, srv.connect(issue()) as bystander:
            await welcome(abuser)
            await welcome(bystander)
            for _ in range(8):
                await abuser.send(json.dumps({"type": "ping"}))
            assert await closed_with(abuser) == (1008, "rate limit exceeded")
            assert_pongs(await burst(bystander, pings(0, 5)), 0)

    run(go())


# -- strategies and several limits ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["sliding-window", "moving-window", "fixed-window"])
def test_each_strategy_enforces_the_limit(serve, issue, strategy):
    srv = serve(SECURE_WS_RATE_LIMIT="5/minute", SECURE_WS_RATE_LIMIT_STRATEGY=strategy)
    sub = unique_sub()

    async def go():
        async with srv.connect(issue(sub=sub)) as a, srv.connect(issue(sub=sub)) as b:
            assert (await welcome(a))["rate_limit"] == "5/minute"
            await welcome(b)
            replies = await burst(a, pings(0, 8))
            assert_pongs(replies[:5], 0)
            for frame in replies[5:]:
                assert_rate_limited(frame, 60_000)
            assert_rate_limited(await request(b, {"type": "ping"}), 60_000)  # keyed by sub here too

    run(go())


@pytest.mark.parametrize("limits", ["100/second;3/minute", "3/minute;100/second", "3/minute; 100/second"])
def test_several_limits_enforce_the_strictest(serve, issue, limits):
    srv = serve(SECURE_WS_RATE_LIMIT=limits)

    async def go():
        async with srv.connect(issue()) as ws:
            assert (await welcome(ws))["rate_limit"] == limits
            replies = await burst(ws, pings(0, 6))
            assert_pongs(replies[:3], 0)
            for frame in replies[3:]:
                assert_rate_limited(frame, 60_000)

    run(go())


def test_several_limits_the_short_one_still_applies(serve, issue):
    srv = serve(SECURE_WS_RATE_LIMIT="3/second;100/minute")

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            await start_of_second()
            replies = await burst(ws, pings(0, 5))
            assert_pongs(replies[:3], 0)
            for frame in replies[3:]:
                assert_rate_limited(frame, 1_000)

    run(go())

"""SPEC §2, §4, §5 with ``SECURE_WS_STORAGE_URL=redis://…``: several processes acting as one service.

Two real ``uvicorn`` processes over TLS share the real Redis at ``SECURE_WS_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/7``, flushed once at the start of this module). Checked across the two processes:
the per-``sub`` rate window, the per-``sub`` connection cap (and its lease when a worker dies),
channel fan-out with one Redis subscription per channel per process, and revocations made by
the ops command. Then the channel rights of §5 (glob, not regex; refresh that narrows the
scope) and the slow-consumer guarantee of §4.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import redis
import websockets
from helpers import (
    Server,
    assert_error,
    base_env,
    cli,
    closed_with,
    flushed_test_redis,
    recv_json,
    refusal,
    request,
    rss_kb,
    run,
    running_pair,
    sans_position,
    shared_redis_url,
    subscribe,
    unique_sub,
    welcome,
)

REDIS_URL = shared_redis_url(0)  # SECURE_WS_TEST_REDIS_URL, default redis://127.0.0.1:6379/7
SCALEOUT = {"SECURE_WS_STORAGE_URL": REDIS_URL}
REVOCATION_DEADLINE = 2.0  # SPEC §4: "within 2 s, on every worker and host"


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rdb():
    """A sync client on the dedicated database, flushed once before this module's first server starts."""
    client = flushed_test_redis(REDIS_URL)  # the scale-out tests need the real thing; never a silent skip
    yield client
    client.close()


@pytest.fixture(scope="module")
def pair(keydir, rdb):
    """Servers A and B on the same Redis, with a roomy rate limit so tests can send freely."""
    env = base_env(keydir, **SCALEOUT, SECURE_WS_RATE_LIMIT="1000/second")
    with running_pair(lambda: Server(keydir, env)) as servers:
        yield servers


@pytest.fixture(scope="module")
def solo(keydir):
    """One memory:// server for the rights tests: fixed channel names there cannot meet another test run's
    publications (Redis pub/sub is global to the Redis server, whatever the database number)."""
    srv = Server(keydir, base_env(keydir, SECURE_WS_RATE_LIMIT="1000/second")).start()
    yield srv
    srv.stop()


def cli_env(keydir) -> dict[str, str]:
    return base_env(keydir, **SCALEOUT)


def jti_of(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["jti"]


def conn_key(sub: str) -> str:
    # RedisStorage's lease set; the braces are a Redis Cluster hash tag and part of the key.
    return f"sws:conn:{{{sub}}}"


def numsub(rdb: redis.Redis, channel: str) -> int:
    return dict(rdb.pubsub_numsub(f"sws:ch:{{{channel}}}")).get(f"sws:ch:{{{channel}}}".encode(), 0)


async def settle(read: Callable[[], Any], expected: Any, timeout: float = 3.0, stable: float = 0.3) -> Any:
    """Poll ``read()`` until it equals ``expected`` and stays so for ``stable`` seconds; return the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while time.monotonic() < deadline:
        if value == expected:
            await asyncio.sleep(stable)
            value = read()
            if value == expected:
                return value
        await asyncio.sleep(0.05)
        value = read()
    return value


async def quiet(ws: Any, seconds: float) -> list[dict[str, Any]]:
    """Every frame that arrives within ``seconds`` (expected: none)."""
    got = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                got.append(json.loads(await ws.recv()))
    except TimeoutError:
        pass
    return got


async def alive(ws: Any) -> None:
    assert await request(ws, {"type": "ping", "id": "alive"}) == {"type": "pong", "id": "alive"}


def unique_channel(prefix: str = "room") -> str:
    return f"{prefix}.{secrets.token_hex(5)}"


# -- shared rate window -----------------------------------------------------------------------


def test_rate_window_is_shared_across_servers(make_server, issue, rdb):
    env = dict(SCALEOUT, SECURE_WS_RATE_LIMIT="6/minute")
    a, b = make_server(**env), make_server(**env)
    sub = unique_sub()

    async def go():
        async with a.connect(issue(sub=sub)) as wa, b.connect(issue(sub=sub)) as wb:
            assert (await welcome(wa))["rate_limit"] == "6/minute"
            await welcome(wb)
            replies = [await request(wa, {"type": "ping", "id": i}) for i in range(4)]
            replies += [await request(wb, {"type": "ping", "id": i}) for i in range(4, 8)]
            # Another sub on the same servers has its own window.
            async with a.connect(issue()) as other:
                await welcome(other)
                await alive(other)
        # Reconnecting, on either server, does not refill the window.
        async with b.connect(issue(sub=sub)) as again:
            await welcome(again)
            late = await request(again, {"type": "ping"})
        return replies, late

    replies, late = run(go())
    kinds = [r["type"] for r in replies]
    assert kinds == ["pong"] * 6 + ["error"] * 2, replies  # 4 on A + 2 on B accepted, exactly 6
    assert [r.get("id") for r in replies[:6]] == list(range(6))
    for frame in replies[6:] + [late]:
        assert_error(frame, "rate_limited")
        assert isinstance(frame["retry_after_ms"], int) and 0 < frame["retry_after_ms"] <= 60_000, frame


# -- shared connection cap --------------------------------------------------------------------


def test_connection_cap_is_shared_across_servers(make_server, issue, rdb):
    env = dict(SCALEOUT, SECURE_WS_MAX_CONNECTIONS_PER_CLIENT="2")
    a, b = make_server(**env), make_server(**env)
    sub = unique_sub()

    async def go():
        async with a.connect(issue(sub=sub)) as on_a, b.connect(issue(sub=sub)) as on_b:
            await welcome(on_a)
            await welcome(on_b)
            assert rdb.zcard(conn_key(sub)) == 2
            assert await refusal(a, issue(sub=sub)) == (1008, "too many connections")
            assert await refusal(b, issue(sub=sub)) == (1008, "too many connections")
            async with a.connect(issue()) as stranger:  # the cap is per sub
                await welcome(stranger)
            await on_a.close()
            # The slot is released when the server side finishes; it must show up in Redis promptly.
            assert await settle(lambda: rdb.zcard(conn_key(sub)), 1) == 1
            async with b.connect(issue(sub=sub)) as third:
                await welcome(third)
                await alive(third)
                await alive(on_b)
                assert await refusal(a, issue(sub=sub)) == (1008, "too many connections")

    run(go())
    assert run(settle(lambda: rdb.zcard(conn_key(sub)), 0)) == 0


# -- a dead worker's leases ---------------------------------------------------------------------


def test_sigkilled_worker_frees_its_subs_within_the_lease(make_server, issue, rdb):
    """SLOW (~30 s by design): a worker killed with SIGKILL never releases its slots; the lease must.

    RedisStorage scores each connection lease at Redis TIME + 30 s and renews it every 10 s.
    The lease cannot be shortened from outside, so this test really waits for it: it checks the
    lease's score is at most now + 30 s, that the slot is still held right after the kill (the cap
    is not simply forgotten), then that B welcomes the same sub once the lease runs out — and no
    later than the lease's own deadline plus 3 s.
    """
    env = dict(SCALEOUT, SECURE_WS_MAX_CONNECTIONS_PER_CLIENT="1")
    a, b = make_server(**env), make_server(**env)
    sub = unique_sub("killed")

    async def hold_then_kill():
        ws = await a.connect(issue(sub=sub))
        await welcome(ws)
        seconds, micros = rdb.time()
        redis_now = seconds + micros / 1e6
        leases = rdb.zrange(conn_key(sub), 0, -1, withscores=True)
        assert len(leases) == 1, leases
        expiry = leases[0][1]
        assert redis_now < expiry <= redis_now + 30.5, (redis_now, expiry)
        ttl = rdb.ttl(conn_key(sub))
        assert 0 < ttl <= 31, ttl  # the key itself expires too: nothing left behind for a sub that never returns
        a.proc.kill()
        a.proc.wait(5)
        ws.transport.abort()
        return expiry, redis_now

    expiry, redis_then = run(hold_then_kill())
    started = time.monotonic()
    lease_left = expiry - redis_then  # seconds the lease still had when we looked

    async def until_welcomed():
        assert await refusal(b, issue(sub=sub)) == (1008, "too many connections"), "the dead worker's slot vanished"
        attempts = 1
        while time.monotonic() - started < lease_left + 3.0:
            await asyncio.sleep(1.0)
            attempts += 1
            async with b.connect(issue(sub=sub)) as ws:
                try:
                    first = json.loads(await asyncio.wait_for(ws.recv(), 5))
                except websockets.ConnectionClosed as exc:
                    assert exc.rcvd is not None and (exc.rcvd.code, exc.rcvd.reason) == (1008, "too many connections")
                    continue
                assert first["type"] == "welcome", first
                await alive(ws)
                return time.monotonic() - started, attempts
        raise AssertionError(f"sub still locked out {time.monotonic() - started:.1f}s after its holder was killed")

    waited, attempts = run(until_welcomed())
    print(f"\nlease: welcomed on B {waited:.1f}s after SIGKILL (lease had {lease_left:.1f}s left), {attempts} tries")
    assert waited <= lease_left + 3.0


# -- pub/sub fan-out ------------------------------------------------------------------------------


def test_publish_reaches_subscribers_on_both_servers(pair, issue):
    a, b = pair
    channel = unique_channel()
    publisher_sub = unique_sub("pub")

    async def go():
        async with (
            a.connect(issue(scope="subscribe:room.*")) as on_a,
            b.connect(issue(scope="subscribe:room.*")) as on_b,
            b.connect(issue(scope="subscribe:room.*")) as elsewhere,
            a.connect(issue(sub=publisher_sub, scope="publish:room.*")) as pub_a,
            b.connect(issue(sub=publisher_sub, scope="publish:room.*")) as pub_b,
        ):
            for ws in (on_a, on_b, elsewhere, pub_a, pub_b):
                await welcome(ws)
            await subscribe(on_a, channel)
            await subscribe(on_b, channel)
            await subscribe(elsewhere, channel + "x")
            data = {"text": "héllo ✓", "n": [1, 2.5, None, True]}
            for pub, tag in ((pub_a, "from-a"), (pub_b, "from-b")):
                reply = await request(pub, {"type": "publish", "channel": channel, "data": [tag, data], "id": tag})
                assert reply == {"type": "published", "channel": channel, "id": tag}
                expected = {"type": "message", "channel": channel, "from": publisher_sub, "data": [tag, data]}
                assert sans_position(await recv_json(on_a)) == expected
                assert sans_position(await recv_json(on_b)) == expected
            assert await quiet(elsewhere, 0.5) == []
            assert await quiet(pub_a, 0.1) == [] and await quiet(on_b, 0.1) == []

    run(go())


def test_one_redis_subscription_per_channel_per_process(pair, issue, rdb):
    a, b = pair
    channel = unique_channel()
    scope = "subscribe:room.* publish:room.*"

    async def go():
        async with (
            a.connect(issue(scope=scope)) as a1,
            a.connect(issue(scope=scope)) as a2,
            a.connect(issue(scope=scope)) as a3,
            b.connect(issue(scope=scope)) as b1,
        ):
            for ws in (a1, a2, a3, b1):
                await welcome(ws)
            assert numsub(rdb, channel) == 0
            for ws in (a1, a2, a3):
                await subscribe(ws, channel)
            assert await settle(lambda: numsub(rdb, channel), 1) == 1, "A must hold exactly one Redis subscription"
            await subscribe(a1, channel)  # subscribing twice changes nothing
            await subscribe(b1, channel)
            assert await settle(lambda: numsub(rdb, channel), 2) == 2
            # One publication, delivered once to each local subscriber.
            assert (await request(b1, {"type": "publish", "channel": channel, "data": 1}))["type"] == "published"
            for ws in (a1, a2, a3, b1):
                assert (await recv_json(ws))["data"] == 1
                assert await quiet(ws, 0.2) == []
            for ws in (a1, a2):
                assert await request(ws, {"type": "unsubscribe", "channel": channel}) == {
                    "type": "unsubscribed",
                    "channel": channel,
                }
            assert await settle(lambda: numsub(rdb, channel), 2) == 2, "A still has a3 on the channel"
            await a3.close()  # leaving by disconnecting
            assert await settle(lambda: numsub(rdb, channel), 1) == 1
            await request(b1, {"type": "unsubscribe", "channel": channel})
            assert await settle(lambda: numsub(rdb, channel), 0) == 0
            # And the channel can be joined again afterwards.
            await subscribe(a2, channel)
            assert await settle(lambda: numsub(rdb, channel), 1) == 1
            await request(b1, {"type": "publish", "channel": channel, "data": 2})
            assert (await recv_json(a2))["data"] == 2
        assert await settle(lambda: numsub(rdb, channel), 0) == 0

    run(go())


# -- revocations across processes -----------------------------------------------------------------


async def closes_within(watchers: dict[str, asyncio.Task], since: float, deadline: float) -> dict[str, float]:
    """Wait for each watcher task (which returns (code, reason, when)); return seconds after ``since``."""
    out = {}
    for name, task in watchers.items():
        left = max(0.05, since + deadline - time.monotonic())
        try:
            code, reason, when = await asyncio.wait_for(task, left)
        except TimeoutError:
            raise AssertionError(f"{name}: still open {deadline}s after the revocation command returned") from None
        assert (code, reason) == (1008, "token revoked"), (name, code, reason)
        out[name] = when - since
    return out


async def watch(ws: Any) -> tuple[int, str, float]:
    code, reason = await closed_with(ws, timeout=60)
    return code, reason, time.monotonic()


def test_revoke_jti_reaches_both_servers(pair, issue, keydir):
    a, b = pair
    sub = unique_sub()
    token, sibling = issue(sub=sub), issue(sub=sub)

    async def go():
        async with (
            a.connect(token) as on_a,
            b.connect(token) as on_b,
            a.connect(sibling) as sib_a,
            b.connect(sibling) as sib_b,
        ):
            for ws in (on_a, on_b, sib_a, sib_b):
                await welcome(ws)
            watchers = {"A": asyncio.create_task(watch(on_a)), "B": asyncio.create_task(watch(on_b))}
            t0 = time.monotonic()
            await asyncio.to_thread(cli, keydir, "token", "revoke", "--jti", jti_of(token), env=cli_env(keydir))
            returned = time.monotonic()
            lags = await closes_within(watchers, returned, REVOCATION_DEADLINE)
            # The same sub's other token is untouched, on both servers.
            await alive(sib_a)
            await alive(sib_b)
            for srv in (a, b):
                assert await refusal(srv, token) == (1008, "token revoked")
            return lags, returned - t0

    lags, cli_seconds = run(go())
    print(f"\nrevoke --jti: cli {cli_seconds:.2f}s; closed after cli returned: {lags}")


def test_revoke_sub_reaches_both_servers(pair, issue, keydir):
    a, b = pair
    sub = unique_sub()
    first, second = issue(sub=sub), issue(sub=sub)

    async def go():
        async with (
            a.connect(first) as on_a,
            b.connect(second) as on_b,
            b.connect(issue()) as bystander,
        ):
            for ws in (on_a, on_b, bystander):
                await welcome(ws)
            watchers = {"A": asyncio.create_task(watch(on_a)), "B": asyncio.create_task(watch(on_b))}
            await asyncio.to_thread(cli, keydir, "token", "revoke", "--sub", sub, env=cli_env(keydir))
            returned = time.monotonic()
            lags = await closes_within(watchers, returned, REVOCATION_DEADLINE)
            await alive(bystander)
            for srv in (a, b):
                assert await refusal(srv, first) == (1008, "token revoked")
            # A token of the same sub issued after the command returned is good, on both servers.
            fresh = issue(sub=sub)
            for srv in (a, b):
                async with srv.connect(fresh) as ws:
                    assert (await welcome(ws))["sub"] == sub
                    await alive(ws)
            return lags

    print(f"\nrevoke --sub: closed after cli returned: {run(go())}")


# -- channel rights (SPEC §5) ---------------------------------------------------------------------
# Grants are checked before storage is touched, so these run on one memory:// server; the refresh
# test below, which also checks the Redis subscription is dropped, runs on the pair.


def test_scope_grants_and_forbids(solo, issue):
    a = b = solo

    async def go():
        async with (
            a.connect(issue(scope="subscribe:room.* publish:room.lobby")) as ws,
            b.connect(issue(scope="subscribe:*")) as watcher,
            a.connect(issue(scope="publish:room.*")) as publish_only,
            a.connect(issue()) as no_scope,
        ):
            for w in (ws, watcher, no_scope):
                await welcome(w)
            publish_only_sub = (await welcome(publish_only))["sub"]
            await subscribe(watcher, "room.other")
            await subscribe(watcher, "lobby")

            await subscribe(ws, "room.lobby")
            await subscribe(ws, "room.a.b")
            for channel in ("lobby", "room", "roomXlobby", "xroom.lobby", "Room.lobby"):
                assert_error(await request(ws, {"type": "subscribe", "channel": channel, "id": channel}), "forbidden", channel)

            assert await request(ws, {"type": "publish", "channel": "room.lobby", "data": "hi", "id": 1}) == {
                "type": "published",
                "channel": "room.lobby",
                "id": 1,
            }
            assert (await recv_json(ws))["data"] == "hi"  # it is subscribed to room.lobby itself
            for channel in ("room.other", "lobby", "room.lobby.x", "room.lobbyX"):
                assert_error(await request(ws, {"type": "publish", "channel": channel, "data": "no", "id": 2}), "forbidden", 2)
            # A forbidden publish reaches nobody.
            assert await quiet(watcher, 0.5) == []

            # publish:… never grants subscribe, and no scope grants nothing.
            assert_error(await request(publish_only, {"type": "subscribe", "channel": "room.x", "id": "s"}), "forbidden", "s")
            assert (await request(publish_only, {"type": "publish", "channel": "room.other", "data": 3}))["type"] == "published"
            assert sans_position(await recv_json(watcher)) == {"type": "message", "channel": "room.other", "from": publish_only_sub, "data": 3}
            for kind in ("subscribe", "publish"):
                assert_error(await request(no_scope, {"type": kind, "channel": "room.x", "data": 0}), "forbidden")
            # Errors never close the connection.
            for w in (ws, publish_only, no_scope):
                await alive(w)

    run(go())


def test_patterns_are_globs_not_regexes(solo, issue):
    a = solo
    scope = "subscribe:room.lobby subscribe:a*b subscribe:x.y.*"

    async def go():
        async with a.connect(issue(scope=scope)) as ws:
            await welcome(ws)
            granted = ["room.lobby", "aXYZb", "ab", "a.b", "a:b:c:b", "x.y.z", "x.y.z.w"]
            refused = ["roomXlobby", "room.lobbyX", "Xroom.lobby", "aXYZbc", "XaXYZb", "b", "xAyAz", "x.y", "xXy.z"]
            for channel in granted:
                await subscribe(ws, channel)
            for channel in refused:
                reply = await request(ws, {"type": "subscribe", "channel": channel, "id": channel})
                assert_error(reply, "forbidden", channel)
            await alive(ws)

    run(go())


@pytest.mark.parametrize("kind", ["subscribe", "publish", "unsubscribe"])
def test_bad_channel_names_are_bad_requests(solo, issue, kind):
    a = solo
    bad: list[Any] = ["", " ", "a b", "a/b", "room*", "*", "x" * 129, "é", "a\nb", "room.lobby\n", "room\u00a0x", 7, None,
                      ["room"], {"room": 1}, True]

    async def go():
        async with a.connect(issue(scope="subscribe:* publish:*")) as ws:
            await welcome(ws)
            for i, channel in enumerate(bad):
                reply = await request(ws, {"type": kind, "channel": channel, "data": 0, "id": i})
                assert_error(reply, "bad_request", i)
            reply = await request(ws, {"type": kind, "data": 0, "id": "missing"})
            assert_error(reply, "bad_request", "missing")
            # The edges of the grammar are fine.
            for channel in ("x" * 128, "A-z_0.9:x", "-"):
                reply = await request(ws, {"type": kind, "channel": channel, "data": 0})
                assert reply["type"] in ("subscribed", "published", "unsubscribed") and reply["channel"] == channel, reply
            await alive(ws)

    run(go())


def test_refresh_that_narrows_scope_drops_the_channel(pair, issue, rdb):
    a, b = pair
    sub = unique_sub()
    kept, dropped = unique_channel(), unique_channel()

    async def go():
        async with (
            b.connect(issue(sub=sub, scope="subscribe:room.*")) as ws,
            a.connect(issue(scope="publish:room.*")) as pub,
        ):
            await welcome(ws)
            pub_sub = (await welcome(pub))["sub"]
            await subscribe(ws, kept)
            await subscribe(ws, dropped)
            assert await settle(lambda: numsub(rdb, dropped), 1) == 1
            narrower = issue(sub=sub, scope=f"subscribe:{kept}")
            await ws.send(json.dumps({"type": "refresh", "token": narrower, "id": "r"}))
            frames = [await recv_json(ws), await recv_json(ws)]
            errors = [f for f in frames if f["type"] == "error"]
            refreshed = [f for f in frames if f["type"] == "refreshed"]
            assert len(errors) == 1 and len(refreshed) == 1, frames
            assert_error(errors[0], "forbidden")
            assert errors[0].get("channel") == dropped or dropped in errors[0].get("message", ""), errors[0]
            assert refreshed[0]["id"] == "r"
            # B's only subscriber left the channel, so B's Redis subscription goes too.
            assert await settle(lambda: numsub(rdb, dropped), 0) == 0
            # No more messages from the dropped channel; the kept one still flows.
            await request(pub, {"type": "publish", "channel": dropped, "data": "gone"})
            await request(pub, {"type": "publish", "channel": kept, "data": "kept"})
            assert sans_position(await recv_json(ws)) == {"type": "message", "channel": kept, "from": pub_sub, "data": "kept"}
            assert await quiet(ws, 0.5) == []
            # Nor can it be joined again under the new scope.
            assert_error(await request(ws, {"type": "subscribe", "channel": dropped, "id": 9}), "forbidden", 9)
            await alive(ws)

    run(go())


# -- slow consumer (SPEC §4) ----------------------------------------------------------------------


FLOOD_MESSAGES = 20_000
FLOOD_BYTES = 4096  # 20k x 4 KB = 80 MB: a server that queued it all would blow the RSS bound below
RSS_GROWTH_LIMIT_MB = 40
BATCH = 200


def test_slow_consumer_is_cut_and_never_blocks_the_publisher(make_server, issue):
    """A subscriber that reads nothing while a publisher floods its channel.

    What the product guarantees, and what is checked: the slow subscriber's send queue is
    bounded (SECURE_WS_SEND_QUEUE_BYTES, 4 MiB), so the server closes it with 1008 "slow consumer";
    publishing is fire-and-forget for the publisher, so every ``published`` reply comes back
    promptly and the publisher stays connected; and the server's memory does not grow with the
    flood. The close frame is queued behind data the subscriber never read, so the subscriber
    sees it only once it reads again; it must then see 1008 "slow consumer" (not an abrupt drop)
    after far fewer messages than were published.
    """
    srv = make_server(SECURE_WS_RATE_LIMIT="100000/second")
    channel = unique_channel()
    payload = secrets.token_hex(FLOOD_BYTES // 2)

    async def go():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window: backpressure comes fast
        sock.connect(("127.0.0.1", srv.port))
        sock.setblocking(False)
        slow = await srv.connect(issue(scope="subscribe:room.*"), sock=sock, server_hostname="localhost",
                                 max_queue=1, compression=None)
        await welcome(slow)
        await subscribe(slow, channel)
        # From here on the slow subscriber reads nothing until the flood is over.
        async with srv.connect(issue(scope="publish:room.*"), compression=None) as pub:
            await welcome(pub)
            base = rss_kb(srv.proc.pid)
            worst_batch = 0.0
            started = time.monotonic()
            for start in range(0, FLOOD_MESSAGES, BATCH):
                t = time.monotonic()
                for i in range(start, start + BATCH):
                    await pub.send(json.dumps({"type": "publish", "channel": channel, "data": payload, "id": i}))
                for i in range(start, start + BATCH):
                    reply = json.loads(await asyncio.wait_for(pub.recv(), 10))
                    assert reply == {"type": "published", "channel": channel, "id": i}, reply
                worst_batch = max(worst_batch, time.monotonic() - t)
            flood_seconds = time.monotonic() - started
            peak = rss_kb(srv.proc.pid, "VmHWM")
            end = rss_kb(srv.proc.pid)
            growth_mb = (max(peak, end) - base) / 1024
            print(f"\nslow consumer: flood {FLOOD_MESSAGES}x{FLOOD_BYTES}B in {flood_seconds:.1f}s, worst batch of "
                  f"{BATCH} {worst_batch:.2f}s, server RSS base {base // 1024} MB, peak {peak // 1024} MB, "
                  f"end {end // 1024} MB")
            assert worst_batch < 3.0, "the publisher was held up by the slow subscriber"
            assert growth_mb < RSS_GROWTH_LIMIT_MB, f"server RSS grew {growth_mb:.0f} MB during the flood"
            await alive(pub)  # never closed
        # Now the slow subscriber reads what it was sent, up to the close.
        received, close = 0, None
        try:
            async with asyncio.timeout(20):
                while True:
                    frame = json.loads(await slow.recv())
                    assert frame["type"] == "message" and frame["channel"] == channel, frame
                    received += 1
        except websockets.ConnectionClosed as exc:
            close = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else "dropped without a close frame"
        except TimeoutError:
            close = f"still open after reading {received} messages for 20 s"
        print(f"slow subscriber got {received} messages, then {close}")
        assert received < FLOOD_MESSAGES // 2, "the slow subscriber was never cut"
        assert close == (1008, "slow consumer"), close

    run(go())
    assert re.search(r"closed 1008 slow consumer", srv.log()), "no slow-consumer close in the server log"


def test_a_client_that_never_reads_its_replies_is_paused_not_cut_nor_buffered(make_server, issue):
    """Replies go straight to the socket; once the client's unread replies pass SECURE_WS_SEND_QUEUE_BYTES the
    server stops reading its frames, as TCP would, until it has read them. A client that keeps sending requests
    and never reads therefore stalls (its own sends block), server memory stays flat, and once it reads, every
    reply it asked for arrives, in order."""
    srv = make_server(SECURE_WS_RATE_LIMIT="100000/second")
    payload = secrets.token_hex(FLOOD_BYTES // 2)

    async def go():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        sock.setblocking(False)
        ws = await srv.connect(issue(), sock=sock, server_hostname="localhost", max_queue=1, compression=None)
        await welcome(ws)
        base = rss_kb(srv.proc.pid)
        sent = 0
        with contextlib.suppress(TimeoutError):
            for sent in range(1, FLOOD_MESSAGES + 1):
                # Once the server stops reading, this send's frame waits in the client's buffer: it still counts.
                await asyncio.wait_for(ws.send(json.dumps({"type": "echo", "data": payload, "id": sent - 1})), 3)
        growth_mb = (rss_kb(srv.proc.pid, "VmHWM") - base) / 1024
        received = 0
        async with asyncio.timeout(30):
            while received < sent:
                frame = json.loads(await ws.recv())
                assert frame == {"type": "echo", "data": payload, "id": received}, frame.get("id")
                received += 1
        print(f"\nsent {sent} requests unread before the server stopped reading, server RSS +{growth_mb:.0f} MB")
        assert sent < FLOOD_MESSAGES, "the server read every request although none of its replies was read"
        assert growth_mb < RSS_GROWTH_LIMIT_MB, f"server RSS grew {growth_mb:.0f} MB"
        assert await request(ws, {"type": "ping", "id": "after"}) == {"type": "pong", "id": "after"}
        await ws.close()

    run(go())

"""SPEC §2, §4, §8 when Redis goes away and comes back.

Each test starts its own ``redis-server`` on a spare port (no persistence) and a real
``uvicorn`` over TLS on it, then kills Redis mid-test and restarts it on the same port.
While Redis is down: ``/readyz`` is 503, live connections keep working for what needs no
shared state (ping), what does need it (publish, subscribe) is answered with an ``unavailable``
error frame — never a close — and new handshakes are accepted and closed 1013
``service unavailable``. Once Redis is back: ``/readyz`` is 200 within seconds, handshakes are
welcomed, pub/sub works again (old subscriptions included) and revocations reach live
connections within the 2 s of §4.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import redis
import websockets
from helpers import RedisProcess, Server, base_env, cli, closed_with, recv_json, request, run, sans_position, unique_sub, welcome

REVOCATION_DEADLINE = 2.0
RECOVERY_DEADLINE = 10.0  # "within a few seconds" of Redis answering again


class RestartableRedis:
    """One Redis address that can go away (killed like a crash) and come back empty."""

    def __init__(self, start: Callable[..., RedisProcess]) -> None:
        self._start = start
        self.current = start()

    @property
    def url(self) -> str:
        return self.current.url

    def stop(self) -> None:
        self.current.kill()

    def restart(self) -> None:
        self.current = self._start(self.current.port)  # the same address the server is configured with


@pytest.fixture
def outage_redis(own_redis):
    return RestartableRedis(own_redis)


@pytest.fixture
def outage_server(keydir, outage_redis):
    srv = Server(keydir, base_env(keydir, SECURE_WS_STORAGE_URL=outage_redis.url, SECURE_WS_RATE_LIMIT="1000/second")).start()
    yield srv
    srv.stop()


def readyz(server: Server) -> int:
    return server.get("/readyz")[0]


def wait_ready(server: Server, timeout: float = RECOVERY_DEADLINE) -> float:
    """Seconds until ``/readyz`` answers 200."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if readyz(server) == 200:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"/readyz still not 200 {timeout}s after Redis came back")


async def timed(ws: Any, message: dict[str, Any], timeout: float = 5.0) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    reply = await request(ws, message, timeout)
    return reply, time.monotonic() - started


async def handshake_outcome(server: Server, token: str) -> tuple[Any, ...]:
    """('welcome', frame) or ('closed', code, reason)."""
    async with server.connect(token) as ws:
        try:
            frame = await recv_json(ws)
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None, "dropped without a close frame"
            return ("closed", exc.rcvd.code, exc.rcvd.reason)
        return ("welcome", frame)


def assert_unavailable(frame: dict[str, Any]) -> None:
    assert frame.get("type") == "error" and frame.get("code") == "unavailable", frame
    assert isinstance(frame.get("message"), str) and frame["message"], frame


def test_outage_degrades_then_recovers(outage_server, outage_redis, issue, keydir):
    srv = outage_server
    env = base_env(keydir, SECURE_WS_STORAGE_URL=outage_redis.url)
    token = issue(scope="subscribe:news.* publish:news.*")
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    timings: dict[str, float] = {}

    async def go():
        assert readyz(srv) == 200
        async with (
            srv.connect(token) as live,
            srv.connect(issue(scope="subscribe:news.*")) as listener,
        ):
            await welcome(live)
            await welcome(listener)
            assert sans_position(await request(listener, {"type": "subscribe", "channel": "news.old"})) == {
                "type": "subscribed",
                "channel": "news.old",
            }
            assert (await request(live, {"type": "publish", "channel": "news.old", "data": 0}))["type"] == "published"
            assert (await recv_json(listener))["data"] == 0

            # -- Redis dies ------------------------------------------------------------------
            outage_redis.stop()
            assert await asyncio.to_thread(readyz, srv) == 503
            assert (await asyncio.to_thread(srv.get, "/healthz"))[0] == 200  # alive, just not ready
            reply, timings["ping while down"] = await timed(live, {"type": "ping", "id": "p"})
            assert reply == {"type": "pong", "id": "p"}
            reply, timings["publish while down"] = await timed(
                live, {"type": "publish", "channel": "news.old", "data": 1, "id": "pub-down"}
            )
            assert_unavailable(reply)
            reply, timings["subscribe while down"] = await timed(
                live, {"type": "subscribe", "channel": "news.fresh", "id": "sub-down"}
            )
            assert_unavailable(reply)
            reply = await request(live, {"type": "echo", "data": "still here", "id": 3})
            assert reply == {"type": "echo", "data": "still here", "id": 3}
            started = time.monotonic()
            assert await handshake_outcome(srv, issue()) == ("closed", 1013, "service unavailable")
            timings["handshake refusal while down"] = time.monotonic() - started

            # -- Redis comes back ------------------------------------------------------------
            await asyncio.to_thread(outage_redis.restart)
            timings["readyz 200 after restart"] = await asyncio.to_thread(wait_ready, srv)
            outcome = await handshake_outcome(srv, issue())
            assert outcome[0] == "welcome", outcome
            # The subscription made before the outage is restored: keep publishing until it is heard.
            started = time.monotonic()
            heard = None
            while heard is None and time.monotonic() - started < RECOVERY_DEADLINE:
                reply = await request(live, {"type": "publish", "channel": "news.old", "data": "back"})
                assert reply == {"type": "published", "channel": "news.old"}, reply
                try:
                    heard = await recv_json(listener, 0.5)
                except TimeoutError:
                    pass
            timings["old subscription delivers again"] = time.monotonic() - started
            assert heard is not None and heard["data"] == "back", "the pre-outage subscription never delivered again"
            # A new subscription works (the channel whose subscribe failed during the outage has its own test).
            assert sans_position(await request(live, {"type": "subscribe", "channel": "news.other"})) == {
                "type": "subscribed",
                "channel": "news.other",
            }
            async with srv.connect(issue(scope="publish:news.*")) as pub:
                pub_sub = (await welcome(pub))["sub"]
                assert (await request(pub, {"type": "publish", "channel": "news.other", "data": 2}))["type"] == "published"
            assert sans_position(await recv_json(live, 3)) == {"type": "message", "channel": "news.other", "from": pub_sub, "data": 2}

            # A revocation made after recovery still closes the live connection within 2 s.
            watcher = asyncio.create_task(closed_with(live, timeout=30))
            await asyncio.to_thread(cli, keydir, "token", "revoke", "--jti", jti, env=env)
            returned = time.monotonic()
            try:
                code_reason = await asyncio.wait_for(watcher, REVOCATION_DEADLINE)
            except TimeoutError:
                raise AssertionError("revocation after recovery did not close the live connection within 2 s") from None
            timings["revocation close after cli"] = time.monotonic() - returned
            assert code_reason == (1008, "token revoked")
            assert await request(listener, {"type": "ping"}) == {"type": "pong"}

    try:
        run(go())
    finally:
        print("\noutage timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))


def test_unavailable_errors_echo_the_request_id(outage_server, outage_redis, issue):
    """SPEC §5: every reply, errors included, echoes the request's ``id`` — the client matches them up."""
    srv = outage_server

    async def go():
        async with srv.connect(issue(scope="subscribe:* publish:*")) as ws:
            await welcome(ws)
            outage_redis.stop()
            replies = {}
            for id, message in (
                ("pub-1", {"type": "publish", "channel": "c", "data": 1}),
                (7, {"type": "subscribe", "channel": "c"}),
            ):
                reply = await request(ws, {**message, "id": id})
                assert_unavailable(reply)
                replies[id] = reply.get("id")
            assert replies == {"pub-1": "pub-1", 7: 7}, f"ids echoed in the unavailable errors: {replies}"

    run(go())


def test_channel_whose_subscribe_failed_during_outage_works_after_recovery(outage_server, outage_redis, issue):
    """A subscribe refused with ``unavailable`` must leave nothing behind: once Redis is back,
    subscribing to that same channel must really subscribe (in Redis) and deliver publications."""
    srv = outage_server

    async def go():
        async with (
            srv.connect(issue(scope="subscribe:*")) as sub,
            srv.connect(issue(scope="publish:*")) as pub,
        ):
            await welcome(sub)
            await welcome(pub)
            outage_redis.stop()
            assert_unavailable(await request(sub, {"type": "subscribe", "channel": "flaky"}))
            await asyncio.to_thread(outage_redis.restart)
            await asyncio.to_thread(wait_ready, srv)
            assert sans_position(await request(sub, {"type": "subscribe", "channel": "flaky"})) == {"type": "subscribed", "channel": "flaky"}
            client = redis.Redis(host="127.0.0.1", port=outage_redis.current.port)
            try:
                deadline = time.monotonic() + 3
                while (subscribed := dict(client.pubsub_numsub("sws:ch:{flaky}")).get(b"sws:ch:{flaky}", 0)) == 0:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
            finally:
                client.close()
            assert (await request(pub, {"type": "publish", "channel": "flaky", "data": "x"}))["type"] == "published"
            try:
                frame = await recv_json(sub, 3)
            except TimeoutError:
                raise AssertionError(
                    f"'subscribed' after recovery, but no publication arrives (PUBSUB NUMSUB sws:ch:{{flaky}} = {subscribed})"
                ) from None
            assert frame["type"] == "message" and frame["data"] == "x", frame

    run(go())


def test_channels_left_during_outage_are_released_after_recovery(outage_server, outage_redis, issue):
    """Leaving channels while Redis is down (unsubscribe, or disconnect) must not leak: once Redis is back,
    the process holds no Redis subscription for channels nobody here is subscribed to any more, and the
    disconnect is not a server fault."""
    srv = outage_server

    def numsubs() -> dict[str, int]:
        client = redis.Redis(host="127.0.0.1", port=outage_redis.current.port)
        try:
            counts = dict(client.pubsub_numsub(*(f"sws:ch:{{{c}}}" for c in ("one", "two", "three")), "sws:revocations"))
        finally:
            client.close()
        return {k.decode().rpartition(":")[2].strip("{}"): v for k, v in counts.items()}

    async def go():
        async with srv.connect(issue(scope="subscribe:*")) as stays:
            await welcome(stays)
            leaver = await srv.connect(issue(scope="subscribe:*"))
            await welcome(leaver)
            for channel in ("one", "two"):
                assert (await request(leaver, {"type": "subscribe", "channel": channel}))["type"] == "subscribed"
            assert (await request(stays, {"type": "subscribe", "channel": "three"}))["type"] == "subscribed"
            assert numsubs() == {"one": 1, "two": 1, "three": 1, "revocations": 1}

            outage_redis.stop()
            reply = await request(stays, {"type": "unsubscribe", "channel": "three", "id": "u"})
            assert reply.get("type") in ("unsubscribed", "error"), reply  # either is fair while Redis is down
            await leaver.close()
            await asyncio.sleep(0.3)  # let the server finish with the disconnect

            await asyncio.to_thread(outage_redis.restart)
            await asyncio.to_thread(wait_ready, srv)
            # Only meaningful once the server's pub/sub connection is back (it re-subscribes what it still holds).
            deadline = time.monotonic() + RECOVERY_DEADLINE
            while numsubs()["revocations"] == 0:
                assert time.monotonic() < deadline, "the server never re-subscribed to sws:revocations"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            counts = numsubs()
            del counts["revocations"]
            assert await request(stays, {"type": "ping"}) == {"type": "pong"}
            return counts

    counts = run(go())
    problems = []
    if counts != {"one": 0, "two": 0, "three": 0}:
        problems.append(f"Redis subscriptions left behind with no subscriber in the process: {counts}")
    if "Exception in ASGI application" in srv.log():
        problems.append("the disconnect during the outage was a server fault (traceback in the server log)")
    assert not problems, "; ".join(problems)


def test_handshakes_resume_and_new_subscribers_hear_publishers_after_restart(outage_server, outage_redis, issue):
    """A subscriber and a publisher that both connect only after Redis came back see each other at once."""
    srv = outage_server
    outage_redis.stop()
    assert readyz(srv) == 503
    assert run(handshake_outcome(srv, issue())) == ("closed", 1013, "service unavailable")
    outage_redis.restart()
    waited = wait_ready(srv)
    print(f"\n/readyz 200 {waited:.2f}s after restart")

    async def go():
        async with (
            srv.connect(issue(scope="subscribe:*")) as sub,
            srv.connect(issue(scope="publish:*")) as pub,
        ):
            await welcome(sub)
            await welcome(pub)
            assert sans_position(await request(sub, {"type": "subscribe", "channel": "after"})) == {"type": "subscribed", "channel": "after"}
            assert (await request(pub, {"type": "publish", "channel": "after", "data": 42}))["type"] == "published"
            frame = await recv_json(sub, 3)
            assert frame["type"] == "message" and frame["data"] == 42, frame

    run(go())


def test_cap_still_enforced_after_restart(keydir, outage_redis, issue):
    """Redis came back empty: connection caps start counting again from what connects next."""
    srv = Server(keydir, base_env(keydir, SECURE_WS_STORAGE_URL=outage_redis.url,
                                  SECURE_WS_MAX_CONNECTIONS_PER_CLIENT="1")).start()
    try:
        outage_redis.stop()
        outage_redis.restart()
        wait_ready(srv)
        sub = unique_sub()

        async def go():
            async with srv.connect(issue(sub=sub)) as ws:
                await welcome(ws)
                assert await handshake_outcome(srv, issue(sub=sub)) == ("closed", 1008, "too many connections")

        run(go())
    finally:
        srv.stop()

"""SPEC §11 presence and join/leave events, and the service's channel counts and node list (§10's
`presence`, `channels`, `info`), over the real wire: in memory, then two workers on a real Redis,
one of them killed."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers import (
    AppServer,
    Server,
    assert_error,
    base_env,
    recv_json,
    request,
    run,
    running_pair,
    sans_position,
    unique_sub,
    wait_until,
    welcome,
)

from secure_ws.core.presence import MAX_CLIENTS
from secure_ws.state.presence import MemoryPresence, PresenceStore
from secure_ws.state.redis_presence import RedisPresence

APP = "presence_app:app"
PRESENCE_SECONDS = 30  # secure_ws.state.redis_presence: a killed worker's entries are gone within this
NODE_SECONDS = 10
RENEW_INTERVAL = 10


@pytest.fixture(scope="module")
def memory_app(keydir: Path) -> Iterator[Server]:
    srv = AppServer(keydir, base_env(keydir), APP).start()
    yield srv
    srv.stop()


def redis_pair(keydir: Path, own_redis: Callable[..., Any]) -> Any:
    env = base_env(keydir, SECURE_WS_STORAGE_URL=own_redis().url)
    return running_pair(lambda: AppServer(keydir, env, APP))


async def joined(ws: Any, channel: str, **extra: Any) -> dict[str, Any]:
    answer = await request(ws, {"type": "subscribe", "channel": channel, **extra})
    assert sans_position(answer) == {"type": "subscribed", "channel": channel}, answer
    return answer


async def presence_of(ws: Any, channel: str) -> dict[str, Any]:
    answer = await request(ws, {"type": "presence", "channel": channel, "id": "p"})
    assert answer["type"] == "presence" and answer["channel"] == channel and answer["id"] == "p", answer
    assert answer["count"] == len(answer["clients"]), answer
    return answer["clients"]


async def admin(ws: Any, kind: str, data: Any = None) -> Any:
    answer = await request(ws, {"type": kind, "id": kind, "data": data})
    assert answer["type"] == "result", answer
    return answer["data"]


async def nothing_more(ws: Any) -> None:
    """The next frame is the answer to a ping: nothing was queued before it."""
    assert await request(ws, {"type": "ping"}) == {"type": "pong"}


def channel_name() -> str:
    return f"room.{unique_sub()}"


# -- one process, memory storage -----------------------------------------------------------------


def test_presence_lists_the_subscribed_connections(memory_app: Server, issue: Any) -> None:
    channel = channel_name()
    scope = f"subscribe:{channel}"
    alice, bob = unique_sub("alice"), unique_sub("bob")

    async def go() -> None:
        async with memory_app.connect(issue(alice, scope=scope)) as a, memory_app.connect(issue(bob, scope=scope)) as b, \
                memory_app.connect(issue(scope=scope)) as watcher:
            a_id, b_id = (await welcome(a))["connection_id"], (await welcome(b))["connection_id"]
            await welcome(watcher)
            assert await presence_of(watcher, channel) == {}
            await joined(a, channel)
            await joined(b, channel)
            await joined(b, channel)  # again: still one entry
            assert await presence_of(watcher, channel) == {a_id: {"sub": alice}, b_id: {"sub": bob}}
            assert (await request(a, {"type": "unsubscribe", "channel": channel}))["type"] == "unsubscribed"
            assert await presence_of(watcher, channel) == {b_id: {"sub": bob}}
            await b.close()
            await wait_until(lambda: _empty(watcher, channel), 5, "a disconnected subscriber gone", every=0.25)

    run(go())


async def _empty(ws: Any, channel: str) -> bool:
    return await presence_of(ws, channel) == {}


def test_presence_needs_the_subscribe_right(memory_app: Server, issue: Any) -> None:
    async def go() -> None:
        async with memory_app.connect(issue(scope="subscribe:room.a publish:room.b")) as ws:
            await welcome(ws)
            assert_error(await request(ws, {"type": "presence", "channel": "room.b", "id": 1}), "forbidden", 1)
            assert_error(await request(ws, {"type": "presence", "channel": "bad channel", "id": 2}), "bad_request", 2)
            assert_error(await request(ws, {"type": "presence", "id": 3}), "bad_request", 3)
            assert (await request(ws, {"type": "presence", "channel": "room.a"}))["clients"] == {}

    run(go())


def test_join_and_leave_reach_only_the_connections_that_asked(memory_app: Server, issue: Any) -> None:
    channel = channel_name()
    scope = f"subscribe:{channel}"
    joiner, plain_sub = unique_sub("joiner"), unique_sub("plain")

    async def go() -> None:
        async with memory_app.connect(issue(scope=scope)) as listener, memory_app.connect(issue(plain_sub, scope=scope)) as plain:
            listener_id = (await welcome(listener))["connection_id"]
            plain_id = (await welcome(plain))["connection_id"]
            await joined(listener, channel, join_leave=True)
            await nothing_more(listener)  # its own join is not sent to it
            await joined(plain, channel, join_leave=False)
            assert await recv_json(listener) == {"type": "join", "channel": channel, "sub": plain_sub, "connection_id": plain_id}
            async with memory_app.connect(issue(joiner, scope=scope)) as j:
                j_id = (await welcome(j))["connection_id"]
                await joined(j, channel)
                event = {"type": "join", "channel": channel, "sub": joiner, "connection_id": j_id}
                assert await recv_json(listener) == event
                assert (await request(j, {"type": "unsubscribe", "channel": channel}))["type"] == "unsubscribed"
                assert await recv_json(listener) == {**event, "type": "leave"}
                await joined(j, channel)
                assert await recv_json(listener) == event
            assert await recv_json(listener) == {**event, "type": "leave"}  # a disconnect leaves too
            await nothing_more(listener)
            await nothing_more(plain)  # never asked: heard none of it
            # A re-subscribe without join_leave stops the events; the listener's own entry stays.
            await joined(listener, channel)
            async with memory_app.connect(issue(scope=scope)) as late:
                await welcome(late)
                await joined(late, channel)
                await nothing_more(listener)
                assert listener_id in await presence_of(late, channel)

    run(go())


@pytest.mark.parametrize("flag", ["true", 1, None, [], {}])
def test_join_leave_must_be_a_boolean(memory_app: Server, issue: Any, flag: Any) -> None:
    channel = channel_name()

    async def go() -> None:
        async with memory_app.connect(issue(scope=f"subscribe:{channel}")) as ws:
            await welcome(ws)
            answer = await request(ws, {"type": "subscribe", "channel": channel, "join_leave": flag, "id": "s"})
            assert_error(answer, "bad_request", "s")
            assert await presence_of(ws, channel) == {}  # not subscribed

    run(go())


def test_service_channels_and_info_in_memory(memory_app: Server, issue: Any) -> None:
    channel = channel_name()
    alice = unique_sub("alice")

    async def go() -> None:
        async with memory_app.connect(issue(alice, scope=f"subscribe:{channel}")) as a, \
                memory_app.connect(issue(scope=f"subscribe:{channel}")) as b, memory_app.connect(issue(scope="admin")) as op:
            a_id = (await welcome(a))["connection_id"]
            await welcome(b)
            await welcome(op)
            await joined(a, channel)
            await joined(b, channel)
            assert (await admin(op, "admin.channels"))[channel] == {"subscribers": 2}
            listed = await admin(op, "admin.presence", {"channel": channel})
            assert len(listed) == 2 and listed[a_id] == {"sub": alice}, listed
            (node,) = (await admin(op, "admin.info"))["nodes"]
            assert node["pid"] == memory_app.proc.pid and node["connections"] >= 3, node
            assert isinstance(node["id"], str) and isinstance(node["hostname"], str) and isinstance(node["started"], int)
            await b.close()
            await wait_until(lambda: _subscribers(op, channel, 1), 5, "b no longer counted", every=0.25)

    run(go())


async def _subscribers(op: Any, channel: str, n: int) -> bool:
    return (await admin(op, "admin.channels")).get(channel) == ({"subscribers": n} if n else None)


# -- two workers, one Redis ------------------------------------------------------------------------


def test_presence_and_join_leave_across_workers(keydir: Path, own_redis: Any, issue: Any) -> None:
    channel = channel_name()
    scope = f"subscribe:{channel}"
    joiner = unique_sub("joiner")

    async def go(a: Server, b: Server) -> None:
        async with a.connect(issue(scope=scope)) as listener, a.connect(issue(scope=scope)) as plain:
            listener_id = (await welcome(listener))["connection_id"]
            plain_id = (await welcome(plain))["connection_id"]
            await joined(listener, channel, join_leave=True)
            await joined(plain, channel)
            assert (await recv_json(listener))["connection_id"] == plain_id  # a join on the same worker
            async with b.connect(issue(joiner, scope=scope)) as j:
                j_id = (await welcome(j))["connection_id"]
                await joined(j, channel)
                event = {"type": "join", "channel": channel, "sub": joiner, "connection_id": j_id}
                assert await recv_json(listener) == event
                clients = await presence_of(j, channel)  # asked on B, answered for both
                assert set(clients) == {listener_id, j_id} | set(await presence_of(plain, channel))
                assert len(clients) == 3 and clients[j_id] == {"sub": joiner}
            assert await recv_json(listener) == {**event, "type": "leave"}
            await nothing_more(plain)
            assert j_id not in await presence_of(listener, channel)

    with redis_pair(keydir, own_redis) as (a, b):
        run(go(a, b))


def test_a_killed_workers_connections_leave_presence_within_the_bound(keydir: Path, own_redis: Any, issue: Any) -> None:
    channel = channel_name()
    scope = f"subscribe:{channel}"

    async def go(a: Server, b: Server) -> None:
        async with a.connect(issue(scope=f"{scope} admin")) as watcher:
            watcher_id = (await welcome(watcher))["connection_id"]
            await joined(watcher, channel)
            async with b.connect(issue(scope=scope)) as doomed:
                doomed_id = (await welcome(doomed))["connection_id"]
                await joined(doomed, channel)
                assert set(await presence_of(watcher, channel)) == {watcher_id, doomed_id}
                assert len((await admin(watcher, "admin.info"))["nodes"]) == 2
                b.stop(signal.SIGKILL)  # no cleanup at all: only the expiry can remove its entries
                await wait_until(lambda: _nodes(watcher, 1), NODE_SECONDS + 5, "the killed node gone from info", every=0.25)
                await wait_until(lambda: _only(watcher, channel, watcher_id), PRESENCE_SECONDS + 5, "the killed worker's entry gone", every=0.25)
                assert await _subscribers(watcher, channel, 1)

    with redis_pair(keydir, own_redis) as (a, b):
        run(go(a, b))


async def _only(ws: Any, channel: str, connection_id: str) -> bool:
    return set(await presence_of(ws, channel)) == {connection_id}


async def _nodes(op: Any, n: int) -> bool:
    return len((await admin(op, "admin.info"))["nodes"]) == n


def test_channels_and_info_across_workers(keydir: Path, own_redis: Any, issue: Any) -> None:
    first, second = channel_name(), channel_name()
    scope = f"subscribe:{first} subscribe:{second}"

    async def go(a: Server, b: Server) -> None:
        async with a.connect(issue(scope=scope)) as a1, a.connect(issue(scope=scope)) as a2, \
                b.connect(issue(scope=scope)) as b1, b.connect(issue(scope="admin")) as op:
            for ws in (a1, a2, b1, op):
                await welcome(ws)
            for ws in (a1, a2, b1):
                await joined(ws, first)
            await joined(b1, second)
            channels = await admin(op, "admin.channels")
            assert channels[first] == {"subscribers": 3} and channels[second] == {"subscribers": 1}, channels

            async def both_counted() -> bool:
                nodes = (await admin(op, "admin.info"))["nodes"]
                counts = {node["pid"]: node["connections"] for node in nodes}
                return len(nodes) == 2 and counts == {a.proc.pid: 2, b.proc.pid: 2}

            await wait_until(both_counted, 10, "both nodes with their connection counts", every=0.25)
            await a2.close()
            await wait_until(lambda: _subscribers(op, first, 2), 5, "a2 no longer counted", every=0.25)
            await b1.close()
            await wait_until(lambda: _subscribers(op, second, 0), 5, "second channel gone", every=0.25)

    with redis_pair(keydir, own_redis) as (a, b):
        run(go(a, b))


def test_redis_away_then_back_empty(keydir: Path, own_redis: Any, issue: Any) -> None:
    """Redis down: the presence request and a join_leave subscribe are answered `unavailable`; back empty:
    live subscribers are written back by the renewal and events flow again."""
    channel = channel_name()
    scope = f"subscribe:{channel}"
    listener_sub = unique_sub("listener")
    store = own_redis()
    env = base_env(keydir, SECURE_WS_STORAGE_URL=store.url, SECURE_WS_RATE_LIMIT="1000/second")
    server = AppServer(keydir, env, APP).start()

    async def go() -> None:
        async with server.connect(issue(listener_sub, scope=scope)) as listener, server.connect(issue(scope=scope)) as other:
            listener_id = (await welcome(listener))["connection_id"]
            await welcome(other)
            await joined(listener, channel, join_leave=True)
            store.kill()
            assert_error(await request(listener, {"type": "presence", "channel": channel, "id": 5}), "unavailable", 5)
            subscribe = {"type": "subscribe", "channel": channel, "join_leave": True, "id": "s"}
            assert_error(await request(other, subscribe), "unavailable", "s")  # the hub had the channel: presence failed
            own_redis(store.port)  # back, and empty

            async def written_back() -> bool:  # `unavailable` until the server's pool has reconnected
                answer = await request(other, {"type": "presence", "channel": channel})
                return answer.get("clients") == {listener_id: {"sub": listener_sub}}  # and not `other`: rolled back

            await wait_until(written_back, RENEW_INTERVAL + 10, "the listener's entry written back", every=0.5)
            await joined(other, channel)
            assert (await recv_json(listener, timeout=10))["type"] == "join"

    try:
        run(go())
    finally:
        server.stop()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_answers_are_bounded(backend: str, own_redis: Any) -> None:
    """Past MAX_CLIENTS entries a presence answer lists MAX_CLIENTS and counts them all (the stores in-process:
    a thousand connections over the wire would only test the machine)."""
    async def go() -> None:
        store: PresenceStore
        if backend == "memory":
            store = MemoryPresence()
        else:
            client = aioredis.Redis.from_url(own_redis().url)
            store = RedisPresence(client)
        heard: list[str] = []
        store.on_event = lambda channel, text: heard.append(text)
        for i in range(MAX_CLIENTS + 5):
            await store.add("crowd", f"{i:016x}", f"user-{i}", "ev")
        await store.add("crowd", f"{0:016x}", "user-0", "ev")  # held already: no second entry, no event
        listed, count = await store.clients("crowd", MAX_CLIENTS)
        assert count == MAX_CLIENTS + 5 and len(listed) == MAX_CLIENTS
        assert all(listed[cid] == f"user-{int(cid, 16)}" for cid in listed)
        assert await store.channels(10) == {"crowd": MAX_CLIENTS + 5}
        await store.remove("crowd", f"{1:016x}", "ev")
        await store.remove("crowd", f"{1:016x}", "ev")  # not held any more: nothing
        assert (await store.clients("crowd", MAX_CLIENTS))[1] == MAX_CLIENTS + 4
        # 1,005 joins and one leave; in Redis they are published, and this test does not listen.
        assert len(heard) == (0 if backend == "redis" else MAX_CLIENTS + 6)
        if backend == "redis":
            await client.aclose()

    run(go())

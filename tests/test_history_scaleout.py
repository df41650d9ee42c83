"""SPEC §11 across two workers on a real Redis (a throw-away ``redis-server`` per module or test): one offset
sequence per channel whichever worker publishes, recovery on the other worker, history surviving both workers'
restarts, no gap and no duplicate while publishers keep publishing during a recovery (also as a seeded random
interleaving of publishes, disconnects and reconnects), and ``unavailable`` (nothing half-applied) while Redis
is down.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import (
    ROOMS,
    RedisProcess,
    Server,
    assert_error,
    base_env,
    messages,
    nothing_more,
    publish,
    recv_json,
    request,
    run,
    running_pair,
    unique_channel,
    wait_until,
    welcome,
)


def pair_on(keydir: Path, url: str, **env: str) -> Any:
    return running_pair(lambda: Server(keydir, base_env(keydir, SECURE_WS_STORAGE_URL=url, SECURE_WS_RATE_LIMIT="100000/second", **env)))


@pytest.fixture(scope="module")
def pair(keydir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    redis_server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    try:
        with pair_on(keydir, redis_server.url) as servers:
            yield servers
    finally:
        redis_server.kill()


def test_offsets_are_one_sequence_across_workers_and_recovery_works_on_the_other_worker(pair, issue):
    a, b = pair
    channel = unique_channel()
    token = issue(scope=ROOMS)

    async def go():
        async with a.connect(issue(scope=ROOMS)) as on_a, b.connect(issue(scope=ROOMS)) as on_b:
            await welcome(on_a)
            await welcome(on_b)
            async with a.connect(token) as sub:
                await welcome(sub)
                first = await request(sub, {"type": "subscribe", "channel": channel})
                epoch = first["epoch"]
                assert first["offset"] == 0
                for ws in (on_a, on_b, on_b, on_a):  # whichever worker publishes, one sequence
                    await publish(ws, channel, "x")
                got = await messages(sub, 4)
                assert [(m["offset"], m["epoch"]) for m in got] == [(n, epoch) for n in range(1, 5)]
            await publish(on_a, channel, 5)
            await publish(on_b, channel, 6)
            async with b.connect(token) as sub:  # back, on the other worker
                await welcome(sub)
                reply = await request(sub, {"type": "subscribe", "channel": channel, "since": {"offset": 4, "epoch": epoch}})
                assert reply == {"type": "subscribed", "channel": channel, "offset": 6, "epoch": epoch, "recovered": True}
                assert [(m["offset"], m["data"]) for m in await messages(sub, 2)] == [(5, 5), (6, 6)]
                await publish(on_a, channel, 7)
                assert [m["offset"] for m in await messages(sub, 1)] == [7]
                history = await request(sub, {"type": "history", "channel": channel, "limit": 3})
                assert [m["offset"] for m in history["messages"]] == [5, 6, 7] and history["epoch"] == epoch
                await nothing_more(sub)

    run(go())


async def hammer(ws: Any, channel: str, stop: asyncio.Event, most: int) -> int:
    """Publish as fast as replies allow (not waiting for them) until ``stop`` or ``most``; how many were sent."""
    sent = 0
    while not stop.is_set() and sent < most:
        await ws.send(json.dumps({"type": "publish", "channel": channel, "data": sent}))
        sent += 1
        if sent % 5 == 0:
            await asyncio.sleep(0.002)
    return sent


async def published(ws: Any, count: int) -> None:
    for _ in range(count):
        assert (await recv_json(ws, 10))["type"] == "published"


def test_publishers_on_both_workers_during_a_recovery_leave_no_gap_and_no_duplicate(pair, issue):
    a, b = pair
    token = issue(scope=ROOMS)

    async def go():
        async with a.connect(issue(scope=ROOMS)) as on_a, b.connect(issue(scope=ROOMS)) as on_b:
            await welcome(on_a)
            await welcome(on_b)
            for attempt in range(3):  # each recovery lands somewhere else in the stream of publications
                channel = unique_channel()
                epoch = (await request(on_a, {"type": "history", "channel": channel, "limit": 0}))["epoch"]
                await publish(on_a, channel, *range(20))
                async with (b if attempt % 2 == 0 else a).connect(token) as sub:
                    await welcome(sub)
                    stop = asyncio.Event()
                    # At most 40 each: with the 20 before, the 100 the history keeps always reach back to offset 0,
                    # however late the subscribe lands (this test is about gaps and duplicates, not about overflow).
                    tasks = [asyncio.create_task(hammer(ws, channel, stop, 40)) for ws in (on_a, on_b)]
                    await asyncio.sleep(0.01 * attempt)
                    await sub.send(json.dumps({"type": "subscribe", "channel": channel, "since": {"offset": 0, "epoch": epoch}}))
                    reply = await recv_json(sub, 10)
                    assert reply["type"] == "subscribed" and reply["recovered"] is True, reply
                    await asyncio.sleep(0.2)
                    stop.set()
                    counts = await asyncio.gather(*tasks)
                    await published(on_a, counts[0])
                    await published(on_b, counts[1])
                    total = 20 + sum(counts)
                    offsets = [m["offset"] for m in await messages(sub, total)]
                    assert offsets == list(range(1, total + 1)), f"attempt {attempt}: gap or duplicate"
                    await nothing_more(sub)

    run(go())


def test_random_publishes_disconnects_and_reconnects_never_leave_a_silent_gap(pair, issue):
    """Seeded random interleaving: 4 clients on both workers, each keeping the last offset it saw and
    reconnecting with ``since``. Every client's offsets are exactly consecutive, except right after a
    subscribe answered ``recovered: false`` (then it starts over from the position it was told)."""
    a, b = pair
    rng = random.Random(20261204)
    channel = unique_channel()
    tokens = [issue(scope=ROOMS) for _ in range(4)]

    async def go():
        async with a.connect(issue(scope=ROOMS)) as on_a, b.connect(issue(scope=ROOMS)) as on_b:
            await welcome(on_a)
            await welcome(on_b)
            positions: list[tuple[int, str] | None] = [None] * 4
            conns: list[Any] = [None] * 4
            unrecovered = 0

            async def connect(i: int) -> None:
                nonlocal unrecovered
                ws = await (a if rng.random() < 0.5 else b).connect(tokens[i])
                await welcome(ws)
                frame: dict[str, Any] = {"type": "subscribe", "channel": channel}
                if positions[i] is not None:
                    frame["since"] = {"offset": positions[i][0], "epoch": positions[i][1]}
                reply = await request(ws, frame)
                if reply.get("recovered") is False:
                    unrecovered += 1
                if reply.get("recovered") is not True:
                    positions[i] = (reply["offset"], reply["epoch"])
                conns[i] = ws

            async def drain(i: int) -> None:
                """Read what is pending for client i (the pong marks the end), checking each offset follows."""
                ws = conns[i]
                await ws.send(json.dumps({"type": "ping", "id": "mark"}))
                while True:
                    frame = await recv_json(ws, 10)
                    if frame["type"] == "pong":
                        return
                    assert frame["type"] == "message", frame
                    offset, epoch = positions[i]  # type: ignore[misc]
                    assert (frame["offset"], frame["epoch"]) == (offset + 1, epoch), (i, positions[i], frame["offset"])
                    positions[i] = (frame["offset"], frame["epoch"])

            for i in range(4):
                await connect(i)
            published_total = 0
            for _ in range(60):
                action = rng.random()
                i = rng.randrange(4)
                if action < 0.6:
                    for _ in range(rng.randint(1, 3)):
                        await publish(on_a if rng.random() < 0.5 else on_b, channel, published_total)
                        published_total += 1
                elif action < 0.8 and conns[i] is not None:
                    if rng.random() < 0.5:  # else leave with messages still unread: they are recovered
                        await drain(i)
                    await conns[i].close()
                    conns[i] = None
                elif conns[i] is None:
                    await connect(i)
            for i in range(4):
                if conns[i] is None:
                    await connect(i)
                await drain(i)
                assert positions[i][0] == published_total  # type: ignore[index]
                await conns[i].close()
            assert published_total < 100 and unrecovered == 0  # everything stayed within the 100 kept

    run(go())


def test_history_survives_both_workers_restarting(keydir, own_redis, issue):
    redis_server = own_redis()
    channel = unique_channel()
    token = issue(scope=ROOMS)

    async def before(server: Server) -> str:
        async with server.connect(token) as ws:
            await welcome(ws)
            epoch = (await request(ws, {"type": "subscribe", "channel": channel}))["epoch"]
            await publish(ws, channel, "one")
            await messages(ws, 1)
            return epoch

    with pair_on(keydir, redis_server.url) as (a, b):
        epoch = run(before(a))
        run(publish_once(b, issue(scope=ROOMS), channel, "two"))
    with pair_on(keydir, redis_server.url) as (a, b):

        async def after() -> None:
            async with b.connect(token) as ws:
                await welcome(ws)
                reply = await request(ws, {"type": "subscribe", "channel": channel, "since": {"offset": 1, "epoch": epoch}})
                assert reply["recovered"] is True and reply["epoch"] == epoch and reply["offset"] == 2, reply
                assert [m["data"] for m in await messages(ws, 1)] == ["two"]

        run(after())


async def publish_once(server: Server, token: str, channel: str, data: Any) -> None:
    async with server.connect(token) as ws:
        await welcome(ws)
        await publish(ws, channel, data)


def test_redis_down_means_unavailable_and_redis_lost_means_a_new_epoch(keydir, own_redis, issue):
    redis_server = own_redis()
    channel = unique_channel()
    token = issue(scope=ROOMS)
    with pair_on(keydir, redis_server.url) as (a, _b):

        async def go() -> None:
            async with a.connect(token) as ws:
                await welcome(ws)
                epoch = (await request(ws, {"type": "subscribe", "channel": channel}))["epoch"]
                await publish(ws, channel, "kept")
                await messages(ws, 1)
                redis_server.kill()
                other = unique_channel()
                since = {"offset": 1, "epoch": epoch}
                for n, frame in enumerate([
                    {"type": "subscribe", "channel": other, "since": since},
                    {"type": "history", "channel": channel},
                    {"type": "publish", "channel": channel, "data": "lost"},
                ]):
                    assert_error(await request(ws, {**frame, "id": n}, timeout=10), "unavailable", n)
                own_redis(redis_server.port)  # back at the same address, empty: its history is lost

                async def resubscribed() -> dict[str, Any] | None:
                    reply = await request(ws, {"type": "subscribe", "channel": channel, "since": since}, timeout=10)
                    return reply if reply["type"] == "subscribed" else None

                reply = await wait_until(resubscribed, 15, "subscribe answered once Redis is back", every=0.2)
                # So the epoch changes, and recovery says it could not be done.
                assert reply["recovered"] is False and reply["epoch"] != epoch and reply["offset"] == 0, reply

        run(go())


def test_the_client_recovers_publications_its_worker_missed_while_live(pair, issue):
    """Publications whose fan-out never reached the client's worker (as when a worker's pub/sub link to Redis
    drops for a moment: they are in the history, but were never delivered live): the client, seeing the offsets
    skip on the next live message, asks for them again with ``since``, and hands the application every message
    once, in order. The lost fan-out is made exactly: offsets 2 and 3 are written to the channel's history the
    way the publish script writes them, without their PUBLISH."""
    from secure_ws.client import Client

    a, b = pair
    channel = unique_channel()
    reader_token, writer_token = issue(scope=ROOMS), issue(scope=ROOMS)
    redis_port = int(a.env["SECURE_WS_STORAGE_URL"].rsplit(":", 1)[1].split("/")[0])
    failed: list[str] = []

    async def go():
        async with Client(a.url, lambda: reader_token, ssl=a.ssl_context(), on_recovery_failed=failed.append) as reader, \
                b.connect(writer_token) as writer:
            writer_sub = (await welcome(writer))["sub"]
            await reader.subscribe(channel)
            stream = reader.messages(channel)
            await publish(writer, channel, 1)
            first = await asyncio.wait_for(anext(stream), 5)
            assert first["data"] == 1
            store = redis.Redis(host="127.0.0.1", port=redis_port)
            try:
                for n in (2, 3):
                    offset = store.hincrby(f"sws:hm:{{{channel}}}", "o", 1)
                    text = json.dumps({"type": "message", "channel": channel, "from": writer_sub, "data": n,
                                       "offset": offset, "epoch": first["epoch"]}, separators=(",", ":"))
                    store.rpush(f"sws:h:{{{channel}}}", text)
            finally:
                store.close()
            await publish(writer, channel, 4)  # offset 4, live: the client sees 2 and 3 skipped
            got = [await asyncio.wait_for(anext(stream), 10) for _ in range(3)]
            assert [(m["data"], m["offset"]) for m in got] == [(2, 2), (3, 3), (4, 4)]
            await publish(writer, channel, 5)
            assert (await asyncio.wait_for(anext(stream), 5))["offset"] == 5
            assert await reader.echo("sync") == "sync" and stream._queue.empty()  # nothing twice
            assert failed == [] and reader.recovery_failures == 0

    run(go())


def test_reading_channels_without_history_leaves_nothing_in_redis(keydir, own_redis, issue):
    """A history read or subscribe of a channel never published once left a record (``sws:hm:{C}``) for an
    hour, uncapped. Now only a publication makes one; the epoch the reader is told is still the one the first
    publication carries, on either worker, and a recovery from it loses nothing."""
    redis_server = own_redis()
    channels = [unique_channel() for _ in range(200)]
    with pair_on(keydir, redis_server.url) as (a, b):

        async def go() -> None:
            async with a.connect(issue(scope=ROOMS)) as on_a, b.connect(issue(scope=ROOMS)) as on_b:
                await welcome(on_a)
                await welcome(on_b)
                told = {}
                for channel in channels:
                    found = await request(on_a, {"type": "history", "channel": channel})
                    assert (found["offset"], found["messages"]) == (0, [])
                    told[channel] = found["epoch"]
                    on_b_reply = await request(on_b, {"type": "subscribe", "channel": channel})
                    assert (on_b_reply["offset"], on_b_reply["epoch"]) == (0, told[channel])  # the same on every node
                    assert (await request(on_b, {"type": "unsubscribe", "channel": channel}))["type"] == "unsubscribed"
                client = redis_server.client()
                assert [key for key in client.scan_iter("sws:h*") if key != b"sws:hseed"] == []
                first = channels[0]
                await publish(on_b, first, "one", "two")
                async with a.connect(issue(scope=ROOMS)) as late:
                    await welcome(late)
                    since = {"offset": 0, "epoch": told[first]}
                    reply = await request(late, {"type": "subscribe", "channel": first, "since": since})
                    assert reply == {"type": "subscribed", "channel": first, "offset": 2, "epoch": told[first],
                                     "recovered": True}
                    assert [(m["data"], m["epoch"]) for m in await messages(late, 2)] == [("one", told[first]),
                                                                                         ("two", told[first])]
                assert sorted(client.scan_iter("sws:h*")) == sorted(
                    [b"sws:hseed", f"sws:hm:{{{first}}}".encode(), f"sws:h:{{{first}}}".encode(),
                     f"sws:hn:{{{first}}}".encode()])

        run(go())

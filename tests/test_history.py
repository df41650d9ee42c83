"""SPEC §11 on one server with memory storage, on the real wire: offsets and epochs, recovery with ``since``,
the ``history`` request, and hostile ``since``/``limit`` values.

Each test uses its own channel (``unique_channel``), so the module-wide server's histories never mix.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tracemalloc
from unittest import mock

import pytest
from helpers import (
    ROOMS,
    Serve,
    Server,
    assert_error,
    base_env,
    keydir_env,
    messages,
    nothing_more,
    publish,
    recv_json,
    request,
    rss_kb,
    run,
    unique_channel,
    welcome,
)

from secure_ws.state.memory_history import ENTRY_COST, MemoryHistory, record_cost
from secure_ws.state.storage import HistoryLimits, Position


@pytest.fixture(scope="module")
def fast(keydir):
    """Default history, and a rate limit that a hammering publisher does not reach."""
    srv = Server(keydir, base_env(keydir, SECURE_WS_RATE_LIMIT="100000/second")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small(keydir):
    """A server whose channels keep their last 3 publications."""
    srv = Server(keydir, base_env(keydir, SECURE_WS_HISTORY_SIZE="3", SECURE_WS_RATE_LIMIT="1000/second")).start()
    yield srv
    srv.stop()


def test_messages_and_subscribed_carry_offset_and_epoch(server, issue):
    channel = unique_channel()

    async def go():
        async with server.connect(issue(scope=ROOMS)) as sub, server.connect(issue(scope=ROOMS)) as pub:
            await welcome(sub)
            hello = await welcome(pub)
            first = await request(sub, {"type": "subscribe", "channel": channel, "id": 1})
            assert set(first) == {"type", "channel", "offset", "epoch", "id"} and first["offset"] == 0, first
            epoch = first["epoch"]
            assert isinstance(epoch, str) and epoch
            await publish(pub, channel, "a", {"b": 2}, None)
            got = await messages(sub, 3)
            assert got == [
                {"type": "message", "channel": channel, "from": hello["sub"], "data": data, "offset": n, "epoch": epoch}
                for n, data in ((1, "a"), (2, {"b": 2}), (3, None))
            ]
            # A later subscriber is told where the channel is now, and gets only what follows.
            assert await request(pub, {"type": "subscribe", "channel": channel}) == {
                "type": "subscribed", "channel": channel, "offset": 3, "epoch": epoch}
            await publish(pub, channel, "d")
            assert (await recv_json(pub))["offset"] == 4
            assert (await recv_json(sub))["offset"] == 4

    run(go())


def test_subscribe_since_recovers_what_was_missed_then_live(server, issue):
    channel = unique_channel()
    token = issue(scope=ROOMS)

    async def go():
        async with server.connect(issue(scope=ROOMS)) as pub:
            await welcome(pub)
            async with server.connect(token) as sub:
                await welcome(sub)
                epoch = (await request(sub, {"type": "subscribe", "channel": channel}))["epoch"]
                await publish(pub, channel, 1, 2)
                assert [m["offset"] for m in await messages(sub, 2)] == [1, 2]
            await publish(pub, channel, 3, 4, 5)  # missed while away
            async with server.connect(token) as sub:
                await welcome(sub)
                since = {"offset": 2, "epoch": epoch}
                assert await request(sub, {"type": "subscribe", "channel": channel, "since": since, "id": "r"}) == {
                    "type": "subscribed", "channel": channel, "offset": 5, "epoch": epoch, "recovered": True, "id": "r"}
                assert [m["data"] for m in await messages(sub, 3)] == [3, 4, 5]
                await publish(pub, channel, 6)
                assert [(m["offset"], m["data"]) for m in await messages(sub, 1)] == [(6, 6)]
                await nothing_more(sub)
                # Up to date: recovered, nothing to replay.
                up_to_date = await request(sub, {"type": "subscribe", "channel": channel, "since": {"offset": 6, "epoch": epoch}})
                assert up_to_date["recovered"] is True and up_to_date["offset"] == 6
                await nothing_more(sub)

    run(go())


def test_recovered_false_for_another_epoch_or_a_future_offset(server, issue):
    channel = unique_channel()

    async def go():
        async with server.connect(issue(scope=ROOMS)) as ws:
            await welcome(ws)
            epoch = (await request(ws, {"type": "subscribe", "channel": channel}))["epoch"]
            await publish(ws, channel, "x")
            await messages(ws, 1)
            for since in ({"offset": 0, "epoch": "not-" + epoch}, {"offset": 7, "epoch": epoch}):
                reply = await request(ws, {"type": "subscribe", "channel": channel, "since": since})
                assert reply == {"type": "subscribed", "channel": channel, "offset": 1, "epoch": epoch, "recovered": False}
                await nothing_more(ws)  # live only: nothing replayed
            await publish(ws, channel, "y")
            assert [m["offset"] for m in await messages(ws, 1)] == [2]

    run(go())


def test_recovered_false_when_the_offset_fell_out_of_history(small, issue):
    channel = unique_channel()

    async def go():
        async with small.connect(issue(scope=ROOMS)) as pub, small.connect(issue(scope=ROOMS)) as sub:
            await welcome(pub)
            await welcome(sub)
            epoch = (await request(sub, {"type": "subscribe", "channel": channel}))["epoch"]
            await publish(pub, channel, *range(1, 6))
            await messages(sub, 5)
            # History holds 3, 4, 5: since 2 is the oldest position still recoverable, since 1 is not.
            ok = await request(sub, {"type": "subscribe", "channel": channel, "since": {"offset": 2, "epoch": epoch}})
            assert ok["recovered"] is True
            assert [m["offset"] for m in await messages(sub, 3)] == [3, 4, 5]
            lost = await request(sub, {"type": "subscribe", "channel": channel, "since": {"offset": 1, "epoch": epoch}})
            assert lost == {"type": "subscribed", "channel": channel, "offset": 5, "epoch": epoch, "recovered": False}
            await nothing_more(sub)

    run(go())


def test_history_off_means_no_offsets_and_no_recovery(make_server, issue):
    srv = make_server(SECURE_WS_HISTORY_SIZE="0")
    channel = unique_channel()

    async def go():
        async with srv.connect(issue(scope=ROOMS)) as ws:
            hello = await welcome(ws)
            assert await request(ws, {"type": "subscribe", "channel": channel}) == {"type": "subscribed", "channel": channel}
            await publish(ws, channel, "plain")
            assert await recv_json(ws) == {"type": "message", "channel": channel, "from": hello["sub"], "data": "plain"}
            reply = await request(ws, {"type": "subscribe", "channel": channel, "since": {"offset": 1, "epoch": "e"}})
            assert reply == {"type": "subscribed", "channel": channel, "recovered": False}
            assert await request(ws, {"type": "history", "channel": channel}) == {"type": "history", "channel": channel, "messages": []}

    run(go())


def test_history_request(server, issue):
    channel = unique_channel()

    async def go():
        async with server.connect(issue(scope=ROOMS)) as ws, server.connect(issue(scope=ROOMS)) as reader, \
                server.connect(issue(scope="subscribe:other.*")) as outsider:
            for each in (ws, reader, outsider):
                await welcome(each)
            epoch = (await request(reader, {"type": "subscribe", "channel": channel}))["epoch"]
            await publish(ws, channel, "a", "b", "c", "d")
            sent = await messages(reader, 4)
            latest = await request(ws, {"type": "history", "channel": channel, "limit": 2, "id": 5})
            assert latest == {"type": "history", "channel": channel, "offset": 4, "epoch": epoch, "id": 5, "messages": sent[2:]}
            everything = await request(ws, {"type": "history", "channel": channel})
            assert everything["messages"] == sent  # exactly the objects subscribers received
            page = await request(ws, {"type": "history", "channel": channel, "since": {"offset": 1, "epoch": epoch}, "limit": 2})
            assert page["messages"] == sent[1:3] and page["recovered"] is True and page["offset"] == 4
            none = await request(ws, {"type": "history", "channel": channel, "limit": 0})
            assert none["messages"] == [] and none["offset"] == 4
            huge = await request(ws, {"type": "history", "channel": channel, "limit": 10**30})  # clamped to the size
            assert huge["messages"] == sent
            stale = await request(ws, {"type": "history", "channel": channel, "since": {"offset": 1, "epoch": "old"}})
            assert stale["messages"] == [] and stale["recovered"] is False and stale["epoch"] == epoch
            assert_error(await request(outsider, {"type": "history", "channel": channel, "id": 1}), "forbidden", 1)
            await nothing_more(ws)

    run(go())


SINCE_GARBAGE = [
    "5",
    5,
    None,
    [],
    {"offset": 1},
    {"epoch": "e"},
    {"offset": -1, "epoch": "e"},
    {"offset": 2**53 + 1, "epoch": "e"},
    {"offset": 10**400, "epoch": "e"},
    {"offset": 1.0, "epoch": "e"},
    {"offset": 1.5, "epoch": "e"},
    {"offset": True, "epoch": "e"},
    {"offset": "1", "epoch": "e"},
    {"offset": 1, "epoch": 5},
    {"offset": 1, "epoch": ""},
    {"offset": 1, "epoch": "e" * 10_000},
    {"offset": 1, "epoch": "e", "extra": 1},
]
LIMIT_GARBAGE = [-1, -(10**30), 1.5, 2.0, "3", None, True, [], {}]


def test_hostile_since_and_limit_get_bad_request_and_the_connection_stays(fast, issue):
    channel = unique_channel()

    async def go():
        async with fast.connect(issue(scope=ROOMS)) as ws:
            await welcome(ws)
            for n, since in enumerate(SINCE_GARBAGE):
                for kind in ("subscribe", "history"):
                    frame = json.dumps({"type": kind, "channel": channel, "since": since, "id": n})
                    reply = await request(ws, frame)
                    assert_error(reply, "bad_request", n)
                    assert "since" in reply["message"] and len(reply["message"]) < 200, reply
            for n, limit in enumerate(LIMIT_GARBAGE):
                reply = await request(ws, {"type": "history", "channel": channel, "limit": limit, "id": n})
                assert_error(reply, "bad_request", n)
                assert "limit" in reply["message"], reply
            # Refused subscribes left no subscription behind.
            assert (await request(ws, {"type": "unsubscribe", "channel": channel}))["type"] == "unsubscribed"
            await nothing_more(ws)

    run(go())
    assert "Traceback" not in fast.log()


def test_a_server_restart_changes_every_epoch(make_server, issue):
    srv = make_server()
    channel = unique_channel()
    token = issue(scope=ROOMS, ttl=600)

    async def subscribe_and_publish() -> str:
        async with srv.connect(token) as ws:
            await welcome(ws)
            epoch = (await request(ws, {"type": "subscribe", "channel": channel}))["epoch"]
            await publish(ws, channel, "before")
            await messages(ws, 1)
            return epoch

    async def after_restart(epoch: str) -> None:
        async with srv.connect(token) as ws:
            await welcome(ws)
            reply = await request(ws, {"type": "subscribe", "channel": channel, "since": {"offset": 1, "epoch": epoch}})
            assert reply["recovered"] is False and reply["epoch"] != epoch and reply["offset"] == 0, reply

    epoch = run(subscribe_and_publish())
    srv.stop()
    srv.start()
    run(after_restart(epoch))


def test_publishing_during_recovery_leaves_no_gap_and_no_duplicate(fast, issue):
    """A publisher hammering the channel while a client recovers: the client sees every offset exactly once."""
    channel = unique_channel()
    token = issue(scope=ROOMS)

    async def go():
        async with fast.connect(issue(scope=ROOMS)) as pub:
            await welcome(pub)
            async with fast.connect(token) as sub:
                await welcome(sub)
                epoch = (await request(sub, {"type": "subscribe", "channel": channel}))["epoch"]
            await publish(pub, channel, *range(10))
            stop = asyncio.Event()

            async def hammer() -> int:
                sent = 0
                while not stop.is_set() and sent < 300:
                    await pub.send(json.dumps({"type": "publish", "channel": channel, "data": "live"}))
                    sent += 1
                    await asyncio.sleep(0)
                    if sent % 10 == 0:
                        await asyncio.sleep(0.005)
                return sent

            async with fast.connect(token) as sub:
                await welcome(sub)
                task = asyncio.create_task(hammer())  # publishing before, during and after the recovery
                await sub.send(json.dumps({"type": "subscribe", "channel": channel, "since": {"offset": 0, "epoch": epoch}}))
                reply = await recv_json(sub)
                assert reply["type"] == "subscribed" and reply["recovered"] is True, reply
                await asyncio.sleep(0.3)
                stop.set()
                sent = await task
                total = 10 + sent
                offsets = [m["offset"] for m in await messages(sub, total)]
                assert offsets == list(range(1, total + 1))

    run(go())


# -- the Python side: Service.publish and Service.history (what the server API answers) ----------------------


def test_service_publish_and_history_answer_plain_objects(keydir):
    from secure_ws.service import Service
    from secure_ws.settings import load_settings

    async def go():
        for size, expect_positions in (("100", True), ("0", False)):
            service = Service(load_settings(keydir_env(keydir, SECURE_WS_HISTORY_SIZE=size), env_file=None))
            async with service.lifespan():
                first = await service.publish("room.api", {"n": 1})
                second = await service.publish("room.api", {"n": 2}, sender="backend")
                found = await service.history("room.api")
                if not expect_positions:
                    assert first == second == {} and found == {"messages": []}
                    continue
                assert first["offset"] == 1 and second == {"offset": 2, "epoch": first["epoch"]}
                assert found == {"offset": 2, "epoch": first["epoch"], "messages": [
                    {"type": "message", "channel": "room.api", "data": {"n": 1}, "offset": 1, "epoch": first["epoch"]},
                    {"type": "message", "channel": "room.api", "from": "backend", "data": {"n": 2}, "offset": 2,
                     "epoch": first["epoch"]},
                ]}
                page = await service.history("room.api", since={"offset": 1, "epoch": first["epoch"]}, limit=5)
                assert [m["offset"] for m in page["messages"]] == [2] and page["recovered"] is True
                assert (await service.history("room.api", since={"offset": 1, "epoch": "x"}))["recovered"] is False
                for bad in ({"channel": "no spaces"}, {"channel": "room.api", "limit": -1},
                            {"channel": "room.api", "since": {"offset": "1", "epoch": "e"}}):
                    with pytest.raises(ValueError):
                        await service.history(**bad)
                with pytest.raises(ValueError):
                    await service.publish("bad channel", 1)

    run(go())


# -- the memory backend's bounds (a unit: no wire needed to count bytes) ----------------------------------------


def test_memory_history_stays_under_its_byte_bound_evicting_the_least_recently_published_channels():
    head = '{"type":"message","channel":"c","data":"' + "x" * 200 + '"'
    history = MemoryHistory(HistoryLimits(size=10, ttl=300, max_bytes=20_000))
    last: dict[str, Position] = {}
    for n in range(200):
        channel = f"c{n % 40}"
        _, last[channel] = history.append(channel, head)
        assert history.bytes <= 20_000
    # The bytes counted are the bytes held.
    held = history._live | history._idle
    assert history.bytes == sum(
        record_cost(name) + sum(sys.getsizeof(t) + ENTRY_COST for t in r.texts) for name, r in held.items()
    )
    # The most recent channel kept its history and its epoch; the oldest were evicted whole: a read answers
    # (creating nothing) a new epoch, so a subscriber from before learns its history was lost.
    assert history.read("c39", Position(last["c39"].offset - 1, last["c39"].epoch), 10).recovered
    lost = history.read("c0", Position(last["c0"].offset - 1, last["c0"].epoch), 10)
    assert not lost.recovered and lost.epoch != last["c0"].epoch and lost.offset == 0


def test_memory_history_keeps_one_oversized_channel_by_dropping_its_oldest_messages():
    history = MemoryHistory(HistoryLimits(size=1000, ttl=300, max_bytes=10_000))
    for n in range(100):
        text, position = history.append("big", '{"data":"' + "y" * 1000 + '"')
        assert history.bytes <= 10_000 and position.offset == n + 1
    found = history.read("big", None, 1000)
    assert 1 <= len(found.messages) < 10 and found.messages[-1] == text
    assert history.read("big", Position(90, position.epoch), 1000).recovered is False  # fell out


def test_memory_history_expires_messages_after_the_ttl_but_keeps_the_position():
    now = [1000.0]
    with mock.patch("secure_ws.state.memory_history.time.monotonic", lambda: now[0]):
        history = MemoryHistory(HistoryLimits(size=10, ttl=60))
        for _ in range(3):
            _, position = history.append("c", '{"data":1')
        now[0] += 61  # idle past the TTL: the messages go, the epoch and offset stay
        assert history.read("c", None, 10).messages == []
        assert history.read("c", position, 10).recovered  # up to date: nothing was missed
        assert not history.read("c", Position(1, position.epoch), 10).recovered  # 2 and 3 are gone
        assert history.bytes == record_cost("c")
        now[0] += 3600  # past the record's own TTL: forgotten, a new epoch
        fresh = history.read("c", position, 10)
        assert not fresh.recovered and fresh.epoch != position.epoch and fresh.offset == 0


def test_memory_history_counts_what_its_records_and_texts_really_take():
    """The bytes counted are at least what tracemalloc sees allocated: records of channels with one message each
    (names as long as they may be), and texts of emoji, which take 4 bytes a character."""
    history = MemoryHistory(HistoryLimits(size=100, ttl=300, max_bytes=1 << 40))
    names = [f"room.{i:06d}." + "n" * 116 for i in range(5000)]
    heads = ['{"type":"message","channel":"c","data":"' + "\U0001f600" * (i % 300) + '"' for i in range(5000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name, head in zip(names, heads, strict=True):
            history.append(name, head)
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    names_size = sum(sys.getsizeof(name) for name in names)  # allocated before: the records hold these very names
    assert taken + names_size <= history.bytes <= 1.5 * (taken + names_size), (taken, names_size, history.bytes)


def test_reading_a_channel_creates_nothing_and_its_first_publication_takes_the_epoch_read():
    history = MemoryHistory(HistoryLimits(size=10, ttl=60, max_bytes=1 << 20))
    empty = history.read("never", None, 10)
    assert (empty.offset, empty.messages, empty.recovered) == (0, [], True) and history.bytes == 0
    assert history.read("never", Position(0, empty.epoch), 10).recovered
    assert not history.read("never", Position(0, "other"), 10).recovered
    _, position = history.append("never", '{"data":1')
    assert position == Position(1, empty.epoch)
    assert history.read("never", Position(0, empty.epoch), 10).messages == [f'{{"data":1,"offset":1,"epoch":"{empty.epoch}"}}']


def test_a_channel_lost_between_a_read_and_its_next_publication_gets_another_epoch():
    """Read empty (epoch E), then a generation is born under E and lost (evicted): the next generation must not
    take E, or a reader of the first one recovering from it would be told nothing was missed."""
    history = MemoryHistory(HistoryLimits(size=10, ttl=60, max_bytes=65536))
    told = history.read("c", None, 10).epoch
    _, first = history.append("c", '{"data":"' + "x" * 60000 + '"')
    assert first.epoch == told
    for n in range(3):  # other channels push "c" out
        history.append(f"other{n}", '{"data":"' + "y" * 30000 + '"')
    assert history.read("c", None, 10).offset == 0
    _, reborn = history.append("c", '{"data":2')
    assert reborn.offset == 1 and reborn.epoch != told
    assert not history.read("c", Position(1, told), 10).recovered


@pytest.mark.parametrize("entry", [Server, Serve], ids=["uvicorn", "serve"])
def test_reading_the_history_of_26000_new_channels_costs_no_memory(keydir, issue, entry):
    """Each history read of a new name once left a record (about 1.1 KiB, counted as 400 bytes) for an hour:
    26,000 names grew the server by about 28 MiB, three times SECURE_WS_HISTORY_MAX_BYTES here."""
    srv = entry(keydir, base_env(keydir, SECURE_WS_RATE_LIMIT="100000/second", SECURE_WS_HISTORY_MAX_BYTES="8388608")).start()
    try:
        async def go() -> float:
            async with srv.connect(issue(scope=ROOMS)) as ws:
                await welcome(ws)
                await request(ws, {"type": "history", "channel": "room.warm"})
                base = rss_kb(srv.proc.pid)
                for batch in range(52):
                    for i in range(500):
                        await ws.send(json.dumps({"type": "history", "channel": f"room.{batch}.{i}.{'n' * 100}"}))
                    for _ in range(500):
                        reply = await recv_json(ws, 10)
                        assert reply["type"] == "history" and reply["offset"] == 0 and reply["messages"] == []
                return (rss_kb(srv.proc.pid) - base) / 1024

        grown = run(go())
        assert grown < 8, f"server RSS grew {grown:.1f} MiB"
    finally:
        srv.stop()


def test_history_counts_bytes_not_characters(make_server, issue):
    """16,000 emoji a message: 64 KB each in UTF-8 and in memory. Counted as characters, a 1 MiB bound held 65
    of them (4 MiB); counted as bytes it holds what fits in 1 MiB."""
    srv = make_server(SECURE_WS_HISTORY_MAX_BYTES=str(1 << 20), SECURE_WS_RATE_LIMIT="1000/second")
    channel = unique_channel()

    async def go() -> list[str]:
        async with srv.connect(issue(scope=ROOMS)) as ws:
            await welcome(ws)
            for _ in range(100):
                frame = json.dumps({"type": "publish", "channel": channel, "data": "\U0001f600" * 16000}, ensure_ascii=False)
                assert (await request(ws, frame))["type"] == "published"
            return (await request(ws, {"type": "history", "channel": channel}, timeout=10))["messages"]

    held = run(go())
    assert 1 <= len(held) <= (1 << 20) // (4 * 16000), len(held)

"""Streamed replies and cancellation over the real wire (uvicorn + TLS, `websockets`), under both entry points:
``uvicorn streams_app:app`` and ``secure-ws serve streams_app:api``.

The application is tests/apps/streams_app.py; every behaviour has a message type there.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ROOT,
    AppServer,
    ServeApp,
    Server,
    assert_error,
    base_env,
    metric,
    recv_json,
    request,
    run,
    running_pair,
    scrape,
    unique_sub,
    wait_until,
    welcome,
)

import stress  # scripts/stress.py (on sys.path through helpers)

# A handler timeout long enough that a call a test means to cancel is never ended by it first on a loaded machine.
ENV = {"SECURE_WS_HANDLER_TIMEOUT": "3s", "SECURE_WS_MAX_INFLIGHT": "3", "SECURE_WS_STREAM_TIMEOUT": "6s",
       "SECURE_WS_RATE_LIMIT": "2000/second"}


@pytest.fixture(scope="module", params=["uvicorn", "serve"])
def streams(request: pytest.FixtureRequest, keydir: Path) -> Any:
    if request.param == "uvicorn":
        srv: Server = AppServer(keydir, base_env(keydir, **ENV), app="streams_app:app")
    else:
        srv = ServeApp(keydir, base_env(keydir, **ENV), app="streams_app:api")
    srv.start()
    yield srv
    srv.stop()


async def until_terminal(ws: Any, id: Any, timeout: float = 10.0, seq: int = 0) -> tuple[list[Any], dict[str, Any]]:
    """The chunks' data of call ``id`` in order (their seq checked, from ``seq``), and its one terminal frame."""
    chunks: list[Any] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await recv_json(ws, timeout)
            if frame.get("id") != id:
                continue
            if frame["type"] == "chunk":
                assert frame["seq"] == seq + len(chunks), frame
                assert set(frame) == {"type", "id", "seq", "data"}, frame
                chunks.append(frame["data"])
            else:
                return chunks, frame


async def nothing_for(ws: Any, id: Any, seconds: float) -> None:
    """No frame of call ``id`` arrives within ``seconds`` (other frames are passed over)."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                frame = json.loads(await ws.recv())
                assert frame.get("id") != id, f"a frame after the terminal one: {frame}"
    except TimeoutError:
        pass


async def events(ws: Any, tag: Any) -> list[str]:
    reply = await request(ws, {"type": "events", "id": "ev", "data": tag})
    while reply.get("id") != "ev":
        reply = await recv_json(ws)
    return [what for what, _, _ in reply["data"]]


# -- chunks and the one terminal frame ---------------------------------------------------------------


def test_chunks_in_order_then_one_result(streams: Server, issue: Any) -> None:
    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            for id, n in ((7, 5), ("s", 0), (8, 200)):
                await ws.send(json.dumps({"type": "count", "id": id, "data": {"n": n}}))
                chunks, end = await until_terminal(ws, id)
                assert chunks == list(range(n))
                assert end == {"type": "result", "id": id, "data": {"chunks": n}}
                await nothing_for(ws, id, 0.2)
            assert (await request(ws, {"type": "ping", "id": 1})) == {"type": "pong", "id": 1}

    run(go())


def test_a_stream_without_id_is_bad_request(streams: Server, issue: Any) -> None:
    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            assert_error(await request(ws, {"type": "count", "data": {"n": 3}}), "bad_request")
            assert (await request(ws, {"type": "ping", "id": 2})) == {"type": "pong", "id": 2}

    run(go())


def test_generator_that_raises_after_chunks_gives_chunks_then_one_error(streams: Server, issue: Any) -> None:
    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "raises.after", "id": 1}))
            chunks, end = await until_terminal(ws, 1)
            assert chunks == [1, 2]
            assert end == {"type": "error", "id": 1, "code": "internal_error", "message": "internal error"}
            await ws.send(json.dumps({"type": "rejects.after", "id": 2}))
            chunks, end = await until_terminal(ws, 2)
            assert chunks == ["first"]
            assert end == {"type": "error", "id": 2, "code": "sold_out", "message": "no more"}
            await ws.send(json.dumps({"type": "not.json.chunk", "id": 3}))
            chunks, end = await until_terminal(ws, 3)
            assert chunks == ["fine"]
            assert_error(end, "internal_error", 3)
            await nothing_for(ws, 3, 0.2)

    run(go())
    log = streams.log()
    assert "RuntimeError: stream bug with secret detail" in log  # the traceback in the log only


def test_scope_and_per_type_rate_limit_count_the_call_once(streams: Server, issue: Any) -> None:
    async def go() -> None:
        async with streams.connect(issue(unique_sub())) as ws:
            await welcome(ws)
            assert_error(await request(ws, {"type": "scoped", "id": 1}), "forbidden", 1)
        sub = unique_sub()
        async with streams.connect(issue(sub, scope="ai:use")) as ws:
            await welcome(ws)
            for id in (1, 2):  # 2/minute: each call counts once, whatever its chunks
                await ws.send(json.dumps({"type": "scoped", "id": id}))
                chunks, end = await until_terminal(ws, id)
                assert chunks == [{"sub": sub}] and end["type"] == "result"
            refused = await request(ws, {"type": "scoped", "id": 3})
            assert_error(refused, "rate_limited", 3)
            assert refused["retry_after_ms"] > 0

    run(go())


# -- timeouts ---------------------------------------------------------------------------------------


def test_a_generator_that_never_yields_times_out_and_is_closed(streams: Server, issue: Any) -> None:
    tag = unique_sub("silent")

    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            started = time.monotonic()
            await ws.send(json.dumps({"type": "silent", "id": 1, "data": tag}))
            chunks, end = await until_terminal(ws, 1)
            assert chunks == [] and time.monotonic() - started >= 3.0
            assert_error(end, "timeout", 1)
            assert await events(ws, tag) == ["silent.finally"]

    run(go())


def test_the_stream_timeout_bounds_a_stream_whose_chunks_come_in_time(streams: Server, issue: Any) -> None:
    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            started = time.monotonic()
            await ws.send(json.dumps({"type": "slow.chunks", "id": 1, "data": 0.5}))  # each chunk within 3 s
            chunks, end = await until_terminal(ws, 1, timeout=15)
            took = time.monotonic() - started
            assert 6.0 <= took < 10.0 and len(chunks) >= 7  # past the per-chunk timeout, ended by the 6 s stream one
            assert_error(end, "timeout", 1)
            assert "stream" in end["message"]

    run(go())


# -- cancellation --------------------------------------------------------------------------------------


def test_cancel_closes_the_generator_and_cancels_what_it_awaits(streams: Server, issue: Any) -> None:
    tag = unique_sub("waits")

    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "waits", "id": "w", "data": tag}))
            assert (await recv_json(ws)) == {"type": "chunk", "id": "w", "seq": 0, "data": "ready"}
            await ws.send(json.dumps({"type": "cancel", "id": "w"}))
            chunks, end = await until_terminal(ws, "w")
            assert chunks == [] and end == {"type": "error", "id": "w", "code": "cancelled", "message": "cancelled"}
            assert await events(ws, tag) == ["waits.start", "waits.cancelled", "waits.finally"]
            # A second cancel, one for a call that never was, and one for a finished call: ignored, no frame.
            await ws.send(json.dumps({"type": "cancel", "id": "w"}))
            await ws.send(json.dumps({"type": "cancel", "id": 424242}))
            await nothing_for(ws, "w", 0.3)
            assert (await request(ws, {"type": "ping", "id": 9})) == {"type": "pong", "id": 9}

    run(go())


def test_cancel_of_a_fast_stream_and_of_a_plain_call(streams: Server, issue: Any) -> None:
    fast, plain = unique_sub("forever"), unique_sub("hang")

    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "forever", "id": 1, "data": fast}))
            assert (await recv_json(ws))["seq"] == 0
            await ws.send(json.dumps({"type": "cancel", "id": 1}))
            frame = await recv_json(ws)
            while frame["type"] == "chunk":  # those sent before the cancel arrived
                frame = await recv_json(ws)
            assert_error(frame, "cancelled", 1)
            await ws.send(json.dumps({"type": "hang", "id": 2, "data": plain}))
            await wait_until(lambda: events(ws, plain), 5, "the plain call started")
            await ws.send(json.dumps({"type": "cancel", "id": 2}))
            chunks, end = await until_terminal(ws, 2)
            assert chunks == [] and end == {"type": "error", "id": 2, "code": "cancelled", "message": "cancelled"}
            assert await events(ws, plain) == ["hang.start", "hang.finally"]
            assert "forever.finally" in await events(ws, fast)

    run(go())


def test_a_generator_that_swallows_its_cancellation_still_ends_once(streams: Server, issue: Any) -> None:
    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "stubborn", "id": 1}))
            assert (await recv_json(ws))["type"] == "chunk"
            await ws.send(json.dumps({"type": "cancel", "id": 1}))
            chunks, end = await until_terminal(ws, 1)
            assert chunks == [] and end["code"] == "cancelled"
            await nothing_for(ws, 1, 0.3)

    run(go())


def test_bad_cancels_get_a_clear_answer(streams: Server, issue: Any) -> None:
    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            assert_error(await request(ws, {"type": "cancel"}), "bad_request")
            assert_error(await request(ws, {"type": "cancel", "id": [1]}), "bad_request")
            assert_error(await request(ws, {"type": "cancel", "id": {"x": 1}}), "bad_request")
            assert_error(await request(ws, {"type": "cancel", "id": "x" * 500}), "bad_request")
            assert (await request(ws, {"type": "ping", "id": 1})) == {"type": "pong", "id": 1}

    run(go())


def test_another_connections_id_cannot_be_cancelled(streams: Server, issue: Any) -> None:
    sub = unique_sub()

    async def go() -> None:
        async with streams.connect(issue(sub)) as a, streams.connect(issue(sub)) as b:
            await welcome(a)
            await welcome(b)
            await a.send(json.dumps({"type": "count", "id": 5, "data": {"n": 4, "delay": 0.1}}))
            await b.send(json.dumps({"type": "cancel", "id": 5}))  # same sub, other connection: not its call
            chunks, end = await until_terminal(a, 5)
            assert chunks == [0, 1, 2, 3] and end["type"] == "result"
            await nothing_for(b, 5, 0.2)

    run(go())


def test_a_thousand_cancels_stay_bounded_and_count_on_the_rate_limit(streams: Server, issue: Any) -> None:
    before = metric(scrape(streams), "secure_ws_messages_total")

    async def go() -> None:
        async with streams.connect(issue()) as ws:
            hello = await welcome(ws)
            assert hello["rate_limit"] == "2000/second"
            await ws.send(json.dumps({"type": "waits", "id": "keep", "data": unique_sub()}))
            assert (await recv_json(ws))["type"] == "chunk"
            for i in range(1000):
                await ws.send(json.dumps({"type": "cancel", "id": i}))
            assert (await request(ws, {"type": "ping", "id": "p"})) == {"type": "pong", "id": "p"}  # no reply to any
            await ws.send(json.dumps({"type": "cancel", "id": "keep"}))
            assert_error((await until_terminal(ws, "keep"))[1], "cancelled", "keep")

    run(go())
    assert metric(scrape(streams), "secure_ws_messages_total") - before >= 1003  # each cancel a frame on the limit


def test_closing_the_connection_cancels_its_calls(streams: Server, issue: Any) -> None:
    tags = [unique_sub("waits"), unique_sub("hang")]

    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "waits", "id": 1, "data": tags[0]}))
            await ws.send(json.dumps({"type": "hang", "id": 2, "data": tags[1]}))
            assert (await recv_json(ws))["type"] == "chunk"
            await wait_until(lambda: events(ws, tags[1]), 5, "the plain call started")
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            await wait_until(lambda: _finalized(ws, tags), 5, "both calls closed with their connection")

    async def _finalized(ws: Any, tags: list[str]) -> bool:
        return "waits.finally" in await events(ws, tags[0]) and "hang.finally" in await events(ws, tags[1])

    run(go())


def test_a_stream_counts_on_max_inflight_until_it_ends(streams: Server, issue: Any) -> None:
    async def go() -> None:
        async with streams.connect(issue()) as ws:
            await welcome(ws)
            for id in (1, 2, 3):
                await ws.send(json.dumps({"type": "waits", "id": id, "data": unique_sub()}))
            for _ in range(3):
                assert (await recv_json(ws))["type"] == "chunk"
            assert_error(await request(ws, {"type": "count", "id": 4, "data": {"n": 1}}), "busy", 4)
            await ws.send(json.dumps({"type": "cancel", "id": 2}))
            assert_error((await until_terminal(ws, 2))[1], "cancelled", 2)
            await ws.send(json.dumps({"type": "count", "id": 5, "data": {"n": 2}}))
            chunks, end = await until_terminal(ws, 5)
            assert chunks == [0, 1] and end["type"] == "result"

    run(go())


# -- backpressure -----------------------------------------------------------------------------------


def test_a_reader_that_stops_pauses_its_stream_instead_of_being_cut(streams: Server, issue: Any) -> None:
    tag, n = unique_sub("big"), 2000  # 2000 chunks of 16 KiB: 32 MiB, far more than the buffers on the way hold

    async def produced(ws: Any) -> int:
        reply = await request(ws, {"type": "produced", "id": "p", "data": tag})
        return int(reply["data"])

    async def go() -> None:
        async with streams.connect(issue()) as reader, streams.connect(issue()) as other:
            await welcome(reader)
            await welcome(other)
            await reader.send(json.dumps({"type": "big", "id": 1, "data": {"tag": tag, "size": 16384, "n": n}}))
            seen: list[int] = []

            async def paused() -> bool:
                seen.append(await produced(other))
                return len(seen) >= 4 and seen[-4] == seen[-1] > 0

            await wait_until(paused, 20, "the generator stopped being advanced", every=0.2)
            assert seen[-1] < n / 2, seen
            assert (await request(other, {"type": "ping", "id": 2})) == {"type": "pong", "id": 2}  # others not held up
            chunks, end = await until_terminal(reader, 1, timeout=60)  # reading again resumes it, to the end
            assert len(chunks) == n and end == {"type": "result", "id": 1, "data": {"chunks": n}}

    run(go())


def test_a_generator_that_never_awaits_does_not_hold_up_other_connections(streams: Server, issue: Any) -> None:
    """``count`` yields without ever awaiting: the stream still lets the worker serve others between chunks
    (without that, a ping here waited ~300 ms behind the burst that fills the socket's buffers)."""

    async def go() -> None:
        async with streams.connect(issue()) as busy, streams.connect(issue()) as other:
            await welcome(busy)
            await welcome(other)
            await busy.send(json.dumps({"type": "count", "id": 1, "data": {"n": 300_000}}))
            worst = 0.0
            for i in range(40):
                started = time.perf_counter()
                assert (await request(other, {"type": "ping", "id": i})) == {"type": "pong", "id": i}
                worst = max(worst, time.perf_counter() - started)
            busy.transport.abort()  # rather than read what is queued for it before the closing handshake
            assert worst < 0.15, f"a ping waited {worst * 1e3:.0f} ms behind another connection's stream"

    run(go())


def test_a_client_that_never_reads_a_1_gib_stream_costs_bounded_memory(keydir: Path, issue: Any) -> None:
    """scripts/stress.py's stream-unread against scripts/bench_app.py: the generator pauses within a few MiB of
    its 1 GiB, the server grows by less than 16 MiB, and another client on the same worker is still answered."""
    srv = AppServer(keydir, base_env(keydir, SECURE_WS_RATE_LIMIT="100000/second"), app="bench_app:app", app_dir=ROOT / "scripts").start()
    try:
        assert srv.proc is not None
        result = stress.measure("stream-unread", srv.proc.pid, srv.port, srv.ssl_context(), issue(), 1 << 20)
    finally:
        srv.stop()
    assert result["paused"] and result["produced_mib"] < 64, result
    assert result["peak_growth_mib"] < 16, result
    assert "Traceback" not in srv.log()


# -- across workers, on Redis ---------------------------------------------------------------------------


def test_across_two_workers_on_redis(keydir: Path, issue: Any, own_redis: Any) -> None:
    """One worker under uvicorn, one under ``secure-ws serve``, sharing a Redis: a stream's per-type rate limit is
    counted once per call across both, and what a stream publishes reaches a subscriber on the other worker."""
    redis_server = own_redis()
    env = base_env(keydir, **ENV, SECURE_WS_STORAGE_URL=redis_server.url)
    servers = iter([AppServer(keydir, env, app="streams_app:app"), ServeApp(keydir, env, app="streams_app:api")])
    sub = unique_sub()
    with running_pair(lambda: next(servers)) as (a, b):

        async def go() -> None:
            async with a.connect(issue(sub, scope=f"ai:use subscribe:job.{sub}")) as on_a, \
                    b.connect(issue(sub, scope=f"ai:use subscribe:job.{sub}")) as on_b:
                await welcome(on_a)
                await welcome(on_b)
                assert (await request(on_b, {"type": "subscribe", "channel": f"job.{sub}"}))["type"] == "subscribed"
                await on_a.send(json.dumps({"type": "job.run", "id": 1, "data": {"steps": 3}}))
                chunks, end = await until_terminal(on_a, 1)
                assert chunks == [{"step": 0}, {"step": 1}, {"step": 2}] and end["data"] == {"chunks": 3}
                published = [await recv_json(on_b) for _ in range(3)]
                assert [m["data"] for m in published] == chunks and {m["from"] for m in published} == {sub}
                for ws, id in ((on_a, 2), (on_b, 3)):  # 2/minute for this sub, whichever worker
                    await ws.send(json.dumps({"type": "scoped", "id": id}))
                    assert (await until_terminal(ws, id))[1]["type"] == "result"
                assert_error(await request(on_a, {"type": "scoped", "id": 4}), "rate_limited", 4)

        run(go())

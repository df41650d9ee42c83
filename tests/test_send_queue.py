"""The outbound queue is bounded in bytes (SECURE_WS_SEND_QUEUE_BYTES), over the real wire.

A client's own replies past the bound pause the reading of its frames (``test_scaleout.py`` and
``test_hostile.py`` show a client that never reads: it stalls, memory stays flat); deliveries past it cut
the client as a slow consumer (``test_scaleout.py``). Here: a recovering client with several replays larger
than the bound, with publications arriving meanwhile, is paced and never cut; ``Session.writable()``, the
backpressure a producer that can wait uses; the setting itself.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ROOMS,
    AppServer,
    Serve,
    Server,
    base_env,
    messages,
    nothing_more,
    recv_json,
    request,
    run,
    subscribe,
    unique_channel,
    wait_until,
    welcome,
)
from test_settings import assert_one_clear_line, start_failure

from secure_ws.settings import load_settings

MIB = 1 << 20
CHANNELS = 5
REPLAYED = 100  # publications per channel before the recovery: each channel's replay
LIVE = 20  # publications per channel while the recovering client has not read its replays
DATA = "r" * 20_000  # 100 of them, 2 MB a replay: each alone twice the 1 MiB bound


async def _small_window(srv: Server, token: str) -> Any:
    """A client whose socket takes little and whose library reads nothing ahead: what it has not read, the server
    holds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", srv.port))
    sock.setblocking(False)
    return await srv.connect(token, sock=sock, server_hostname="localhost", max_queue=1, compression=None)


@pytest.fixture(params=["uvicorn", "serve"])
def tight(request: pytest.FixtureRequest, keydir: Path) -> Iterator[Server]:
    """A server of either entry point whose connections may leave 1 MiB unread (the least the setting takes), and
    whose channels keep the replayed and the live publications (a subscribe read late still recovers all)."""
    env = base_env(keydir, SECURE_WS_SEND_QUEUE_BYTES=str(MIB), SECURE_WS_RATE_LIMIT="100000/second",
                   SECURE_WS_HISTORY_SIZE=str(REPLAYED + LIVE))
    srv = (Serve if request.param == "serve" else Server)(keydir, env).start()
    yield srv
    srv.stop()


def test_a_recovery_of_several_histories_larger_than_the_bound_is_paced_not_cut(tight: Server, issue: Any) -> None:
    channels = [unique_channel() for _ in range(CHANNELS)]
    token = issue(scope=ROOMS)

    async def go() -> None:
        async with tight.connect(issue(scope=ROOMS)) as pub:
            await welcome(pub)
            epochs = [(await request(pub, {"type": "history", "channel": c, "limit": 0}))["epoch"] for c in channels]
            for channel in channels:
                for n in range(REPLAYED):
                    await pub.send(json.dumps({"type": "publish", "channel": channel, "data": DATA, "id": n}))
                for _ in range(REPLAYED):
                    assert (await recv_json(pub, 10))["type"] == "published"
            sub = await _small_window(tight, token)
            await welcome(sub)
            for channel, epoch in zip(channels, epochs, strict=True):
                await sub.send(json.dumps({"type": "subscribe", "channel": channel, "since": {"offset": 0, "epoch": epoch}}))
            # Publications while the replays wait unread: deliveries past a bound the replies already fill.
            for channel in channels:
                for n in range(LIVE):
                    await pub.send(json.dumps({"type": "publish", "channel": channel, "data": n}))
            for _ in range(CHANNELS * LIVE):
                assert (await recv_json(pub, 10))["type"] == "published"
            offsets: dict[str, list[int]] = {c: [] for c in channels}
            subscribed = []
            async with asyncio.timeout(60):
                while sum(map(len, offsets.values())) < CHANNELS * (REPLAYED + LIVE):
                    frame = json.loads(await sub.recv())
                    if frame["type"] == "subscribed":
                        subscribed.append(frame["recovered"])
                    else:
                        assert frame["type"] == "message", frame
                        offsets[frame["channel"]].append(frame["offset"])
            assert subscribed == [True] * CHANNELS
            for channel in channels:  # each channel: its whole history, then the live ones, no gap, no duplicate
                assert offsets[channel] == list(range(1, REPLAYED + LIVE + 1)), channel
            assert await request(sub, {"type": "ping", "id": "after"}) == {"type": "pong", "id": "after"}
            await sub.close()

    run(go())
    assert "slow consumer" not in tight.log()


@pytest.fixture()
def filling_app(keydir: Path) -> Iterator[Server]:
    srv = AppServer(keydir, base_env(keydir, SECURE_WS_SEND_QUEUE_BYTES=str(MIB), SECURE_WS_RATE_LIMIT="1000/second")).start()
    yield srv
    srv.stop()


def test_writable_is_none_until_half_the_bound_is_unread_then_a_future_that_resolves_when_read(
    filling_app: Server, issue: Any,
) -> None:
    """The ``fill`` handler pushes 100,000 characters at a time while ``Session.writable()`` is None, then awaits
    the future it returns. The client reads nothing until the handler waits (seen from another connection), then
    reads everything: the future resolves, and no push was cut as a slow consumer."""

    async def go() -> None:
        async with filling_app.connect(issue()) as observer:
            await welcome(observer)
            ws = await _small_window(filling_app, issue())
            await welcome(ws)
            await ws.send(json.dumps({"type": "fill", "id": 1, "data": 100_000}))

            async def waiting() -> Any:
                state = await request(observer, {"type": "fill.state", "id": "s"})
                return state["data"] if state["data"].get("waiting") else None

            state = await wait_until(waiting, 20, "the fill handler waiting on writable()")
            assert state["first"] is True  # a fresh connection is writable
            # It stopped at half the bound (512 KiB) plus what the sockets and the transport took, not at the bound.
            assert 5 <= state["pushed"] < 5 + 64, state
            pushes = 0
            async with asyncio.timeout(30):
                while True:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "result":
                        break
                    assert frame == {"type": "push", "data": "x" * 100_000}
                    pushes += 1
            assert frame == {"type": "result", "id": 1, "data": {"pushed": state["pushed"], "writable": True}}
            assert pushes == state["pushed"]
            await ws.close()

    run(go())
    assert "slow consumer" not in filling_app.log()


BURST = 300  # publications sent at once: most of them fan out in the same loop turns


def test_a_burst_of_publications_arrives_whole_and_in_order_around_the_publishers_replies(keydir: Path, issue: Any) -> None:
    """A subscriber's publications of one loop turn go out as one write: each still arrives as its own message, in
    order, once; the publisher, subscribed too, reads each publication after the reply to its publish (held while
    the publish waits on storage), and nothing else."""
    srv = Server(keydir, base_env(keydir, SECURE_WS_RATE_LIMIT="100000/second")).start()
    channel = unique_channel()

    async def go() -> None:
        async with srv.connect(issue(scope=ROOMS)) as reader, srv.connect(issue(scope=ROOMS)) as writer:
            for ws in (reader, writer):
                await welcome(ws)
                await subscribe(ws, channel)
            for i in range(BURST):
                await writer.send(json.dumps({"type": "publish", "channel": channel, "data": i, "id": i}))
            assert [frame["data"] for frame in await messages(reader, BURST)] == list(range(BURST))
            # The publisher's own copy is held while its publish waits on storage, and follows the reply.
            frames = [await recv_json(writer) for _ in range(2 * BURST)]
            assert [(f["type"], f.get("data", f.get("id"))) for f in frames] == [
                pair for i in range(BURST) for pair in (("published", i), ("message", i))]
            assert frames[0] == {"type": "published", "channel": channel, "id": 0}
            for ws in (reader, writer):
                await nothing_more(ws)

    try:
        run(go())
    finally:
        srv.stop()


def test_send_queue_bytes_is_read_from_the_environment() -> None:
    assert load_settings({}, env_file=None).send_queue_bytes == 4 * MIB
    assert load_settings({"SECURE_WS_SEND_QUEUE_BYTES": str(8 * MIB)}, env_file=None).send_queue_bytes == 8 * MIB


@pytest.mark.parametrize("value", ["lots", "4MiB", "1048575", "-1"])
def test_a_bad_send_queue_bytes_stops_startup_with_one_line(keydir: Path, tmp_path: Path, value: str) -> None:
    code, output = start_failure(keydir, tmp_path, base_env(keydir, SECURE_WS_SEND_QUEUE_BYTES=value))
    assert_one_clear_line(code, output, "SECURE_WS_SEND_QUEUE_BYTES")

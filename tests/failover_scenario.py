"""Traffic through a Redis failover, for the Sentinel and Cluster tests (SPEC §15).

Every server has a subscriber on every channel and a publisher publishing round the channels as fast as its
replies come; a client with a revoked token tries to get in throughout, on every server. Then ``kill`` (which
kills a Redis master and returns once the topology named its replacement: the failover time) runs in the
middle of it. What :func:`failover_under_traffic` checks:

* every publisher is answered ``published`` again within the failover time + 2 s of the kill;
* each subscriber's stream holds every acknowledged publication, with offsets 1, 2, 3… — no gap, no duplicate;
* a subscribe with ``since`` (the position before the traffic) after the failover is ``recovered:true`` and
  replays exactly that stream: history survived the failover;
* the revoked token is never welcomed, on any server, at any moment: it is closed 1008 ``token revoked``, or
  1013 ``service unavailable`` while the storage cannot be checked; a valid token trying throughout is welcomed
  or closed 1013, nothing else.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import websockets
from helpers import Server, recv_json, welcome

SCOPE = "subscribe:* publish:*"
RESUME_SLACK = 2.0  # SPEC §15: within the failover time plus 2 s


async def _subscriber(server: Server, token: str, channels: list[str]) -> tuple[Any, dict[str, dict[str, Any]]]:
    ws = await server.connect(token).__aenter__()
    await welcome(ws)
    positions = {}
    for channel in channels:
        await ws.send(json.dumps({"type": "subscribe", "channel": channel}))
        reply = await recv_json(ws, 10)
        assert reply["type"] == "subscribed", reply
        positions[channel] = {"offset": reply["offset"], "epoch": reply["epoch"]}
    return ws, positions


async def messages_until(ws: Any, stop: asyncio.Event) -> AsyncIterator[dict[str, Any]]:
    """The ``message`` frames ``ws`` receives until ``stop`` is set (looked at every 0.2 s)."""
    while not stop.is_set():
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 0.2))
        except TimeoutError:
            continue
        if frame.get("type") == "message":
            yield frame


async def _collect(ws: Any, into: dict[str, list[dict[str, Any]]], stop: asyncio.Event) -> None:
    async for frame in messages_until(ws, stop):
        into.setdefault(frame["channel"], []).append(frame)


async def _publisher(server: Server, token: str, name: str, channels: list[str], stop: asyncio.Event,
                     acked: dict[str, list[str]], ack_times: list[float]) -> None:
    async with server.connect(token) as ws:
        await welcome(ws)
        for i in itertools.count():
            if stop.is_set():
                return
            channel = channels[i % len(channels)]
            data = f"{name}-{i}"
            await ws.send(json.dumps({"type": "publish", "channel": channel, "data": data, "id": i}))
            reply = await recv_json(ws, 10)
            if reply.get("type") == "published":
                acked.setdefault(channel, []).append(data)
                ack_times.append(time.monotonic())
                await asyncio.sleep(0.01)  # about 100 a second: the whole run fits in history
            else:
                assert reply.get("code") == "unavailable", reply
                await asyncio.sleep(0.05)


async def _prober(servers: list[Server], token: str, stop: asyncio.Event, outcomes: list[Any]) -> None:
    """Handshakes with ``token`` round the servers until ``stop``: ("welcome", frame) or ("closed", code, reason)."""
    for server in itertools.cycle(servers):
        if stop.is_set():
            return
        try:
            async with server.connect(token) as ws:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
                outcomes.append(("welcome", frame))
        except websockets.ConnectionClosed as exc:
            outcomes.append(("closed", exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else ("dropped",))
        except (OSError, websockets.InvalidStatus, TimeoutError) as exc:
            outcomes.append(("failed", type(exc).__name__))
        await asyncio.sleep(0.02)


async def failover_under_traffic(
    servers: list[Server], issue: Callable[..., str], revoked: str, channels: list[str], kill: Callable[[], float],
) -> dict[str, float]:
    stop, drained = asyncio.Event(), asyncio.Event()
    subscribers = [await _subscriber(server, issue(scope=SCOPE), channels) for server in servers]
    received: list[dict[str, list[dict[str, Any]]]] = [{} for _ in servers]
    acked: dict[str, list[str]] = {}
    publishers_acks: list[list[float]] = [[] for _ in servers]
    outcomes: list[Any] = []
    valid_outcomes: list[Any] = []
    collectors = [asyncio.create_task(_collect(ws, into, drained)) for (ws, _), into in zip(subscribers, received, strict=True)]
    tasks = [
        asyncio.create_task(_publisher(server, issue(scope=SCOPE), f"p{n}", channels, stop, acked, publishers_acks[n]))
        for n, server in enumerate(servers)
    ]
    tasks.append(asyncio.create_task(_prober(servers, revoked, stop, outcomes)))
    tasks.append(asyncio.create_task(_prober(servers, issue(scope=SCOPE), stop, valid_outcomes)))
    try:
        await asyncio.sleep(1.0)
        assert all(publishers_acks), "publishing did not work before the failover"
        killed_at = time.monotonic()
        failover = await asyncio.to_thread(kill)
        deadline = killed_at + failover + RESUME_SLACK
        while time.monotonic() < deadline + 3 and not all(acks[-1] > killed_at + failover for acks in publishers_acks):
            await asyncio.sleep(0.05)
        resumed = [next((t for t in acks if t > killed_at + failover), float("inf")) for acks in publishers_acks]
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:  # what was acknowledged last is still on its way to the subscribers
            until = time.monotonic() + 5
            while time.monotonic() < until and not all(
                len(streams.get(c, [])) >= len(acked.get(c, [])) for streams in received for c in channels
            ):
                await asyncio.sleep(0.05)
        finally:
            drained.set()
            await asyncio.gather(*collectors, return_exceptions=True)
    for task in tasks + collectors:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    timings = {"failover": failover, "resumed after kill": max(resumed) - killed_at}
    assert max(resumed) <= deadline, (
        f"publishing resumed {timings['resumed after kill']:.2f}s after the kill (failover {failover:.2f}s + {RESUME_SLACK}s allowed)"
    )
    welcomed = [o for o in outcomes if o[0] == "welcome"]
    assert not welcomed, f"a revoked token was let in: {welcomed[:3]}"
    assert outcomes, "the revoked client never tried"
    refusals = {o for o in outcomes if o[0] != "welcome"}
    assert refusals <= {("closed", 1008, "token revoked"), ("closed", 1013, "service unavailable")}, refusals
    odd = {o[:3] for o in valid_outcomes if o[0] != "welcome"} - {("closed", 1013, "service unavailable")}
    assert not odd, f"a valid token met something else than a welcome or 1013: {odd}"
    timings["valid handshakes refused 1013"] = sum(1 for o in valid_outcomes if o[0] == "closed")

    for (ws, positions), streams in zip(subscribers, received, strict=True):
        for channel in channels:
            stream = streams.get(channel, [])
            start = positions[channel]
            offsets = [m["offset"] for m in stream]
            assert offsets == list(range(start["offset"] + 1, start["offset"] + 1 + len(stream))), (
                f"{channel}: gap or duplicate in the live stream: {offsets}"
            )
            got = [m["data"] for m in stream]
            missing = [d for d in acked.get(channel, []) if d not in got]
            assert not missing, f"{channel}: acknowledged publications never delivered: {missing[:5]}"
        await ws.close()
    # Recovery after the failover, on a fresh connection to each server: history kept every publication.
    for server, (_, positions), streams in zip(servers, subscribers, received, strict=True):
        async with server.connect(issue(scope=SCOPE)) as ws:
            await welcome(ws)
            for channel in channels:
                await ws.send(json.dumps({"type": "subscribe", "channel": channel, "since": positions[channel]}))
                reply = await recv_json(ws, 10)
                assert reply["type"] == "subscribed" and reply["recovered"] is True, reply
                replay = [await recv_json(ws, 10) for _ in streams.get(channel, [])]
                assert [m["offset"] for m in replay] == [m["offset"] for m in streams.get(channel, [])]
    timings["acknowledged publications"] = sum(len(v) for v in acked.values())
    timings["revoked handshakes tried"] = len(outcomes)
    return timings

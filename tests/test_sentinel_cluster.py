"""SPEC §15 on real Redis topologies started by the test on loopback.

Sentinel: one master, one replica, three sentinels; two server processes on ``redis+sentinel://``. Cluster:
three masters and three replicas; two server processes on ``redis+cluster://``, channels spread over the
masters. A master killed under traffic (see :mod:`failover_scenario` for what is checked through it); and on
the Cluster, what spans the nodes — presence and join/leave, the channel list, rate limits, connection caps,
revocations — works with every key of one operation in one slot.
"""

from __future__ import annotations

import asyncio

import jwt
import pytest
import websockets
from failover_scenario import SCOPE, failover_under_traffic
from helpers import AppServer, Server, base_env, cli, recv_json, request, run, unique_sub, wait_until, welcome
from redis_topologies import ClusterSet, SentinelSet

ENV = {"SECURE_WS_RATE_LIMIT": "1000/second", "SECURE_WS_HISTORY_SIZE": "5000"}


@pytest.fixture
def sentinel_set(tmp_path):
    topology = SentinelSet(tmp_path)
    yield topology
    topology.stop()


@pytest.fixture
def cluster_set(tmp_path):
    topology = ClusterSet(tmp_path)
    yield topology
    topology.stop()


def _servers(keydir, url: str, count: int = 2) -> list[Server]:
    return [Server(keydir, base_env(keydir, SECURE_WS_STORAGE_URL=url, **ENV)).start() for _ in range(count)]


def _revoked(keydir, issue, url: str) -> str:
    token = issue(scope=SCOPE)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    cli(keydir, "token", "revoke", "--jti", jti, env=base_env(keydir, SECURE_WS_STORAGE_URL=url))
    return token


def test_sentinel_failover_under_traffic(keydir, issue, sentinel_set):
    servers = _servers(keydir, sentinel_set.url)
    try:
        revoked = _revoked(keydir, issue, sentinel_set.url)
        timings = run(failover_under_traffic(servers, issue, revoked, ["news", "sport"], sentinel_set.kill_master))
        print("\nsentinel failover: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    finally:
        for server in servers:
            server.stop()


CLUSTER_CHANNELS = ["news", "sport", "weather", "markets", "chat.1", "chat.2"]


def test_cluster_failover_under_traffic(keydir, issue, cluster_set):
    masters = {cluster_set.master_of("sws:h:{" + channel + "}").port for channel in CLUSTER_CHANNELS}
    assert len(masters) >= 2, "the channels should spread over the masters"
    servers = _servers(keydir, cluster_set.url)
    try:
        revoked = _revoked(keydir, issue, cluster_set.url)
        victim = cluster_set.master_of("sws:h:{news}")
        timings = run(failover_under_traffic(servers, issue, revoked, CLUSTER_CHANNELS, lambda: cluster_set.kill(victim)))
        print("\ncluster failover: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    finally:
        for server in servers:
            server.stop()


def test_cluster_slot_migrated_under_traffic(keydir, issue, cluster_set):
    """A resharding: the slot of one channel's keys moves to another master (ASK, then MOVED) under traffic."""
    servers = _servers(keydir, cluster_set.url)
    try:
        revoked = _revoked(keydir, issue, cluster_set.url)
        timings = run(failover_under_traffic(servers, issue, revoked, CLUSTER_CHANNELS,
                                             lambda: cluster_set.migrate("sws:h:{news}")))
        print("\ncluster slot migration: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    finally:
        for server in servers:
            server.stop()


async def _joined(ws, channel: str, **extra) -> None:  # type: ignore[no-untyped-def]
    answer = await request(ws, {"type": "subscribe", "channel": channel, **extra})
    assert answer["type"] == "subscribed", answer


async def _presence(ws, channel: str) -> dict:  # type: ignore[type-arg,no-untyped-def]
    answer = await request(ws, {"type": "presence", "channel": channel})
    assert answer["type"] == "presence", answer
    return answer["clients"]


async def _channels(ws) -> dict:  # type: ignore[type-arg,no-untyped-def]
    answer = await request(ws, {"type": "admin.channels", "id": 1})
    assert answer["type"] == "result", answer
    return answer["data"]


def test_cluster_spans_presence_limits_caps_and_revocations(keydir, issue, cluster_set):
    env = base_env(keydir, SECURE_WS_STORAGE_URL=cluster_set.url, SECURE_WS_RATE_LIMIT="20/second",
                   SECURE_WS_MAX_CONNECTIONS_PER_CLIENT="2")
    a, b = (AppServer(keydir, env, "presence_app:app").start() for _ in range(2))
    scope = "subscribe:* publish:* admin"

    async def go() -> None:
        async with a.connect(issue(scope=scope)) as listener, b.connect(issue(scope=scope)) as other:
            listener_id = (await welcome(listener))["connection_id"]
            other_id = (await welcome(other))["connection_id"]
            rooms = [f"room.{n}" for n in range(8)]  # several slots, on every master
            for room in rooms:
                await _joined(listener, room, join_leave=True)
            for room in rooms:
                await _joined(other, room)
                event = await recv_json(listener)
                assert event == {"type": "join", "channel": room, "sub": event["sub"], "connection_id": other_id}, event
            for room in rooms:
                assert set(await _presence(other, room)) == {listener_id, other_id}
            listed = await _channels(listener)
            assert all(listed.get(room) == {"subscribers": 2} for room in rooms), listed

            # The rate limit is shared: hits on A and B count in one window (limits' keys carry a hash tag).
            answers = []
            for n in range(30):
                answers.append(await request(listener if n % 2 else other, {"type": "ping", "id": n}))
            limited = [x for x in answers if x.get("type") == "error"]
            assert limited, "30 pings in well under a second passed a 20/second limit"
            assert limited[0]["code"] == "rate_limited", limited[0]

        # The connection cap holds across the servers (leases in the sub's slot).
        sub = unique_sub("capped")
        async with a.connect(issue(sub, scope=scope)) as one, b.connect(issue(sub, scope=scope)) as two:
            await welcome(one)
            await welcome(two)
            async with a.connect(issue(sub, scope=scope)) as three:
                try:
                    frame = await recv_json(three)
                    raise AssertionError(f"a third connection of one sub was let in: {frame}")
                except websockets.ConnectionClosed as exc:
                    assert exc.rcvd is not None and exc.rcvd.reason == "too many connections", exc.rcvd

        # A revocation through the Cluster closes the live connection on the other server.
        token = issue(scope=scope)
        async with b.connect(token) as victim:
            await welcome(victim)
            jti = jwt.decode(token, options={"verify_signature": False})["jti"]
            await asyncio.to_thread(
                cli, keydir, "token", "revoke", "--jti", jti, env=base_env(keydir, SECURE_WS_STORAGE_URL=cluster_set.url)
            )

            async def closed() -> bool:
                try:
                    await request(victim, {"type": "ping"}, 0.2)
                    return False
                except websockets.ConnectionClosed:
                    return True

            await wait_until(closed, 5, "the revoked connection closed")

    try:
        run(go())
    finally:
        a.stop()
        b.stop()

"""SPEC §9 across processes on the real Redis: per-type windows shared by two workers, and
``api.send`` / ``api.disconnect`` reaching a ``sub``'s connections on the other worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import (
    AppServer,
    assert_error,
    base_env,
    closed_with,
    flushed_test_redis,
    recv_json,
    request,
    run,
    running_pair,
    sans_position,
    shared_redis_url,
    unique_sub,
    welcome,
)

REDIS_URL = shared_redis_url(1)  # the database after SECURE_WS_TEST_REDIS_URL's (default redis://127.0.0.1:6379/8)


@pytest.fixture(scope="module")
def pair(keydir: Path) -> Any:
    client = flushed_test_redis(REDIS_URL)
    env = base_env(keydir, SECURE_WS_STORAGE_URL=REDIS_URL)
    with running_pair(lambda: AppServer(keydir, env)) as servers:
        yield servers
    client.close()


def test_per_type_window_is_shared_by_workers(pair: Any, issue: Any) -> None:
    a, b = pair
    sub = unique_sub()

    async def go() -> None:
        async with a.connect(issue(sub, scope="orders:write")) as on_a, b.connect(issue(sub, scope="orders:write")) as on_b:
            await welcome(on_a)
            await welcome(on_b)
            for i, ws in enumerate((on_a, on_b, on_a)):  # 3/minute in all, whichever worker takes them
                assert_error(await request(ws, {"type": "orders.create", "id": i, "data": {}}), "empty_order", i)
            for ws in (on_b, on_a):
                limited = await request(ws, {"type": "orders.create", "id": "over", "data": {}})
                assert_error(limited, "rate_limited", "over")
                assert limited["retry_after_ms"] > 0

    run(go())


def test_send_and_disconnect_reach_the_other_worker(pair: Any, issue: Any) -> None:
    a, b = pair
    target = unique_sub()

    async def go() -> None:
        async with b.connect(issue(target)) as t1, a.connect(issue(target)) as t2, a.connect(issue(scope="admin")) as admin:
            for ws in (t1, t2, admin):
                await welcome(ws)
            assert (await request(admin, {"type": "admin.send", "data": {"sub": target, "data": {"n": 1}}}))["data"] == "sent"
            assert await recv_json(t1) == {"type": "push", "data": {"n": 1}}  # on worker B
            assert await recv_json(t2) == {"type": "push", "data": {"n": 1}}  # on worker A
            for ws in (t1, t2):  # exactly once: the next frame is the reply
                assert await request(ws, {"type": "ping"}) == {"type": "pong"}
            await request(admin, {"type": "admin.disconnect", "data": {"sub": target}})
            assert await closed_with(t1) == (1008, "disconnected")
            assert await closed_with(t2) == (1008, "disconnected")
        async with b.connect(issue(target)) as again:
            await welcome(again)

    run(go())


def test_api_publish_reaches_subscribers_on_both_workers(pair: Any, issue: Any) -> None:
    a, b = pair
    channel = f"news.{unique_sub()}"

    async def go() -> None:
        async with a.connect(issue(scope=f"subscribe:{channel}")) as s1, b.connect(issue(scope=f"subscribe:{channel}")) as s2, \
                b.connect(issue(scope="admin")) as admin:
            for ws in (s1, s2, admin):
                await welcome(ws)
            for ws in (s1, s2):
                assert (await request(ws, {"type": "subscribe", "channel": channel}))["type"] == "subscribed"
            await request(admin, {"type": "admin.publish", "data": {"channel": channel, "data": "hi"}})
            for ws in (s1, s2):
                assert sans_position(await recv_json(ws)) == {"type": "message", "channel": channel, "data": "hi"}

    run(go())

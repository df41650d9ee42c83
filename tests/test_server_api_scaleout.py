"""SPEC §10 across processes on a real Redis: the server API on one worker reaching clients on the other,
``secure_ws.Publisher`` and ``secure-ws publish`` from outside the server, and Redis down (503, nothing applied)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    RedisProcess,
    Server,
    api_acall,
    api_call,
    api_env,
    api_error,
    cli,
    closed_with,
    create_api_key,
    no_traceback,
    recv_json,
    refusal_lines,
    request,
    run,
    running_pair,
    sans_position,
    subscribe,
    unique_sub,
    wait_for,
    welcome,
)

from secure_ws import Publisher


@pytest.fixture
def redis_pair(keydir: Path, tmp_path: Path, own_redis: Callable[..., RedisProcess]) -> Iterator[tuple[Any, ...]]:
    """Two workers sharing a throw-away Redis and one API keys file: (a, b, redis, api key, env)."""
    redis = own_redis()
    keys_file = tmp_path / "api-keys.json"
    key = create_api_key(keydir, keys_file, "backend")
    env = api_env(keydir, keys_file, SECURE_WS_STORAGE_URL=redis.url)
    with running_pair(lambda: Server(keydir, env)) as (a, b):
        yield a, b, redis, key, env
        no_traceback(a)
        no_traceback(b)


def test_the_api_on_one_worker_reaches_clients_on_both(redis_pair: Any, issue: Any) -> None:
    a, b, _, key, _ = redis_pair
    sub, channel = unique_sub(), f"news.{unique_sub()}"

    async def go() -> None:
        async with a.connect(issue(sub)) as on_a, b.connect(issue(sub)) as on_b, \
                a.connect(issue(scope=f"subscribe:{channel}")) as s_a, b.connect(issue(scope=f"subscribe:{channel}")) as s_b:
            for ws in (on_a, on_b, s_a, s_b):
                await welcome(ws)
            for ws in (s_a, s_b):
                await subscribe(ws, channel)

            response = await api_acall(a, "publish", {"channel": channel, "data": {"n": 1}}, key)
            assert response.status_code == 200, response.text
            for ws in (s_a, s_b):
                assert sans_position(await recv_json(ws)) == {"type": "message", "channel": channel, "data": {"n": 1}}

            assert (await api_acall(a, "send", {"sub": sub, "data": "hello"}, key)).status_code == 200
            for ws in (on_a, on_b):
                assert await recv_json(ws) == {"type": "push", "data": "hello"}
                assert await request(ws, {"type": "ping"}) == {"type": "pong"}  # exactly once

            assert (await api_acall(b, "disconnect", {"sub": sub}, key)).status_code == 200
            for ws in (on_a, on_b):
                assert await closed_with(ws, timeout=2) == (1008, "disconnected")

    run(go())


def test_publisher_from_url_reaches_clients_of_running_servers(redis_pair: Any, issue: Any) -> None:
    a, b, redis, _, _ = redis_pair
    sub, channel = unique_sub(), f"news.{unique_sub()}"

    async def go() -> None:
        async with a.connect(issue(scope=f"subscribe:{channel}")) as s_a, b.connect(issue(scope=f"subscribe:{channel}")) as s_b, \
                b.connect(issue(sub)) as target:
            for ws in (s_a, s_b, target):
                await welcome(ws)
            for ws in (s_a, s_b):
                await subscribe(ws, channel)
            async with Publisher.from_url(redis.url) as publisher:
                answer = await publisher.publish(channel, {"from_celery": True})
                assert set(answer) <= {"offset", "epoch"}
                for ws in (s_a, s_b):
                    assert sans_position(await recv_json(ws)) == {"type": "message", "channel": channel, "data": {"from_celery": True}}
                await publisher.send(sub, [1, 2])
                assert await recv_json(target) == {"type": "push", "data": [1, 2]}
                with pytest.raises(ValueError):
                    await publisher.publish("not a channel!", 1)
                await publisher.disconnect(sub)
                assert await closed_with(target, timeout=2) == (1008, "disconnected")

    run(go())
    with pytest.raises(ValueError, match="memory://"):
        Publisher.from_url("memory://")


def test_secure_ws_publish_command(redis_pair: Any, keydir: Path, issue: Any) -> None:
    a, _, _, _, env = redis_pair
    channel = f"news.{unique_sub()}"

    async def go() -> None:
        async with a.connect(issue(scope=f"subscribe:{channel}")) as ws:
            await welcome(ws)
            await subscribe(ws, channel)
            result = cli(keydir, "publish", channel, '{"text": "from a shell"}', env=env)
            assert set(json.loads(result.stdout)) <= {"offset", "epoch"}
            assert sans_position(await recv_json(ws)) == {"type": "message", "channel": channel, "data": {"text": "from a shell"}}

    run(go())
    for args in ((channel, "{not json"), ("bad channel!", "1")):
        refused = cli(keydir, "publish", *args, env=env, check=False)
        assert refused.returncode != 0 and len(refusal_lines(refused.stderr)) == 1 and "Traceback" not in refused.stderr, refused.stderr
    memory = cli(keydir, "publish", channel, "1", env={**env, "SECURE_WS_STORAGE_URL": "memory://"}, check=False)
    assert memory.returncode == 2 and len(refusal_lines(memory.stderr)) == 1 and "memory://" in memory.stderr, memory.stderr


def test_redis_down_is_503_and_recovers(redis_pair: Any, own_redis: Callable[..., RedisProcess]) -> None:
    a, _, redis, key, env = redis_pair
    redis.kill()
    for method, body in (
        ("publish", {"channel": "room.a", "data": 1}),
        ("broadcast", {"channels": ["room.a", "room.b"], "data": 1}),
        ("send", {"sub": "alice", "data": 1}),
        ("disconnect", {"sub": "alice"}),
    ):
        api_error(api_call(a, method, body, key), 503, "unavailable")
    assert api_call(a, "publish", {"channel": "room.a", "data": 1}, "swk_wrong").status_code == 401  # keys still checked
    refused = cli(a.keydir, "publish", "room.a", "1", env=env, check=False)
    assert refused.returncode == 2 and "does not answer" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    own_redis(redis.port)
    wait_for(lambda: api_call(a, "publish", {"channel": "room.a", "data": 1}, key).status_code == 200, 15, "API back with Redis")

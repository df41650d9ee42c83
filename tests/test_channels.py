"""Channel options by pattern, subscribe and publish hooks, server-side subscriptions and the WebSocket path, over
the real wire: tests/apps/channels_app.py under plain uvicorn and under ``secure-ws serve MODULE:ATTR``, the
service without Python code on a channels file, the RPC proxy's events, and two servers sharing a Redis."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from helpers import (
    AppServer,
    ServeApp,
    Server,
    assert_error,
    base_env,
    closed_with,
    free_port,
    nothing_more,
    recv_json,
    refusal_lines,
    request,
    run,
    running_pair,
    unique_sub,
    welcome,
)
from test_rpc_proxy import SECRET, Backend, running_backend

from secure_ws import SecureWS
from secure_ws.core.handlers import RegistrationError

ALL = "subscribe:* publish:*"
PATH = "/ws/acme"
APP_ENV = {"SECURE_WS_HANDLER_TIMEOUT": "1s", "SECURE_WS_RATE_LIMIT": "1000/second"}


def tag() -> str:
    return secrets.token_hex(4)


@pytest.fixture(scope="module", params=[AppServer, ServeApp], ids=["uvicorn", "secure-ws-serve"])
def srv(request: Any, keydir: Path) -> Iterator[Server]:
    server = request.param(keydir, base_env(keydir, **APP_ENV), app="channels_app:app").start()
    yield server
    server.stop()


async def published_all(ws: Any, channel: str, count: int) -> None:
    for n in range(count):
        reply = await request(ws, {"type": "publish", "channel": channel, "data": n})
        assert reply == {"type": "published", "channel": channel}, reply


async def history(ws: Any, channel: str, **extra: Any) -> dict[str, Any]:
    reply = await request(ws, {"type": "history", "channel": channel, **extra})
    assert reply["type"] == "history", reply
    return reply


def test_history_size_comes_from_the_first_matching_pattern(srv: Server, issue: Any) -> None:
    t = tag()

    async def go() -> None:
        async with srv.connect(issue(scope=ALL), path=PATH) as ws:
            await welcome(ws)
            # room.vip.* (3) is declared before room.* (5); room.vip.never (7) comes after room.vip.* and never wins.
            expected = {f"room.vip.{t}": 3, f"room.{t}": 5, "room.vip.never": 3, f"other.{t}": 8}
            for channel, kept in expected.items():
                await published_all(ws, channel, 8)
                found = await history(ws, channel)
                assert [m["data"] for m in found["messages"]][-kept:] == list(range(8 - kept, 8)), (channel, found)
                assert len(found["messages"]) == kept, (channel, found)
            await published_all(ws, f"nohist.{t}", 2)
            assert await history(ws, f"nohist.{t}") == {"type": "history", "channel": f"nohist.{t}", "messages": []}
            # Recovery reads the channel's own size: after offset 4 of room.vip (3 kept: 6, 7, 8), 5 has fallen out; after 6, nothing has.
            position = await history(ws, f"room.vip.{t}", limit=0)
            since = {"offset": 4, "epoch": position["epoch"]}
            lost = await request(ws, {"type": "subscribe", "channel": f"room.vip.{t}", "since": since})
            assert lost["recovered"] is False
            await request(ws, {"type": "unsubscribe", "channel": f"room.vip.{t}"})
            since["offset"] = 6
            kept = await request(ws, {"type": "subscribe", "channel": f"room.vip.{t}", "since": since})
            assert kept["recovered"] is True
            assert [(await recv_json(ws))["offset"] for _ in range(2)] == [7, 8]
            await nothing_more(ws)

    run(go())


def test_presence_join_leave_and_client_publish_off(srv: Server, issue: Any) -> None:
    t = tag()

    async def go() -> None:
        async with srv.connect(issue(scope=ALL), path=PATH) as ws, srv.connect(issue(scope=ALL), path=PATH) as listener:
            await welcome(ws)
            await welcome(listener)
            assert_error(await request(ws, {"type": "presence", "channel": f"quiet.{t}", "id": 1}), "forbidden", 1)
            refused = await request(ws, {"type": "subscribe", "channel": f"quiet.{t}", "join_leave": True, "id": 2})
            assert_error(refused, "forbidden", 2)
            assert (await request(ws, {"type": "presence", "channel": f"room.{t}"}))["type"] == "presence"
            # The token grants publish:*, the channel refuses clients; the server side still publishes.
            await request(listener, {"type": "subscribe", "channel": f"feed.{t}"})
            assert_error(await request(ws, {"type": "publish", "channel": f"feed.{t}", "data": 1, "id": 3}), "forbidden", 3)
            shout = await request(ws, {"type": "shout", "id": 4, "data": {"channel": f"feed.{t}", "data": "news"}})
            assert shout["type"] == "result" and shout["data"]["offset"] == 1
            delivered = await recv_json(listener)
            assert (delivered["channel"], delivered["data"], "from" in delivered) == (f"feed.{t}", "news", False)
            await nothing_more(listener)

    run(go())


def test_on_subscribe_allows_with_data_refuses_faults_and_times_out(srv: Server, issue: Any) -> None:
    t = tag()

    async def go() -> None:
        async with srv.connect(issue(scope=ALL), path=PATH) as ws, srv.connect(issue(scope=ALL), path=PATH) as other:
            await welcome(ws)
            await welcome(other)
            joined = await request(ws, {"type": "subscribe", "channel": f"room.{t}", "id": 1})
            assert joined["data"] == {"topic": t, "tenant": "acme"}  # the hook sees the path's parameters
            silent = await request(ws, {"type": "subscribe", "channel": "room.silent", "id": 2})
            assert silent["type"] == "subscribed" and "data" not in silent
            assert_error(await request(ws, {"type": "subscribe", "channel": "room.closed", "id": 3}), "room_closed", 3)
            assert_error(await request(ws, {"type": "subscribe", "channel": "room.boom", "id": 4}), "internal_error", 4)
            assert_error(await request(ws, {"type": "subscribe", "channel": "room.hang", "id": 5}), "timeout", 5)
            assert_error(await request(ws, {"type": "subscribe", "channel": "room.stubborn", "id": 7}), "timeout", 7)
            # No refusal left a subscription behind: the server's publications to them do not arrive; the connection stays.
            for channel in ("room.closed", "room.boom", "room.hang", "room.stubborn"):
                await request(other, {"type": "shout", "data": {"channel": channel, "data": 1}})
            await nothing_more(ws)
            # The scope is checked first: without subscribe:room.*, the hook's data never shows.
        async with srv.connect(issue(scope="subscribe:news.*"), path=PATH) as narrow:
            await welcome(narrow)
            assert_error(await request(narrow, {"type": "subscribe", "channel": f"room.{t}", "id": 6}), "forbidden", 6)

    run(go())
    assert "on_subscribe is broken" in srv.log()  # the traceback in the server's log, never in the frame


def test_on_publish_rewrites_refuses_faults_and_times_out(srv: Server, issue: Any) -> None:
    t = tag()
    channel = f"room.{t}"

    async def go() -> None:
        async with srv.connect(issue(scope=ALL), path=PATH) as ws, srv.connect(issue(scope=ALL), path=PATH) as listener:
            await welcome(ws)
            await welcome(listener)
            await request(listener, {"type": "subscribe", "channel": channel})
            assert await request(ws, {"type": "publish", "channel": channel, "data": "hello"}) == {"type": "published", "channel": channel}
            assert (await recv_json(listener))["data"] == "HELLO"  # what the hook returned
            await request(ws, {"type": "publish", "channel": channel, "data": {"n": 1}})
            assert (await recv_json(listener))["data"] == {"n": 1}  # None returned: published as sent
            for data, code in (("bad word", "bad_word"), ("boom", "internal_error"), ("hang", "timeout")):
                assert_error(await request(ws, {"type": "publish", "channel": channel, "data": data, "id": code}), code, code)
            await nothing_more(listener)  # nothing refused was published
            assert (await history(ws, channel))["offset"] == 2

    run(go())


def test_server_side_subscriptions(srv: Server, issue: Any) -> None:
    sub = unique_sub()
    t = tag()

    async def go() -> None:
        async with srv.connect(issue(sub, personal=True), path=PATH) as ws, srv.connect(issue(scope=ALL), path=PATH) as admin:
            await welcome(ws)
            await welcome(admin)
            told = await recv_json(ws)  # subscribed by on_connect, after the welcome, as if it had asked
            assert told["type"] == "subscribed" and told["channel"] == f"user.{sub}" and "id" not in told
            await request(admin, {"type": "shout", "data": {"channel": f"user.{sub}", "data": "for you"}})
            assert (await recv_json(ws))["data"] == "for you"
            # From a handler, with `since`: subscribed with recovered, then what it missed (no scope was asked).
            for n in range(3):
                await request(admin, {"type": "shout", "data": {"channel": f"news.{t}", "data": n}})
            epoch = (await history(admin, f"news.{t}"))["epoch"]
            await ws.send(f'{{"type":"follow","id":9,"data":{{"channel":"news.{t}","since":{{"offset":1,"epoch":"{epoch}"}}}}}}')
            frames = [await recv_json(ws) for _ in range(4)]
            result = next(f for f in frames if f["type"] == "result")
            assert result == {"type": "result", "id": 9, "data": "following"}
            rest = [f for f in frames if f is not result]
            assert rest[0]["type"] == "subscribed" and rest[0]["recovered"] is True and rest[0]["offset"] == 3
            assert [(m["type"], m["offset"]) for m in rest[1:]] == [("message", 2), ("message", 3)]
            bad = await request(ws, {"type": "follow", "id": 10, "data": {"channel": "bad channel!"}})
            assert_error(bad, "internal_error", 10)  # the handler's ValueError: its fault, the connection stays
            # A refresh keeps what the server subscribed, whatever the new token's scope says.
            refreshed = await request(ws, {"type": "refresh", "id": 11, "token": issue(sub, personal=True)})
            assert refreshed["type"] == "refreshed", refreshed
            await request(admin, {"type": "shout", "data": {"channel": f"user.{sub}", "data": "still yours"}})
            assert (await recv_json(ws))["data"] == "still yours"

    run(go())


def test_path_parameters_and_paths_that_do_not_match(srv: Server, issue: Any) -> None:
    async def go() -> None:
        async with srv.connect(issue(), path="/ws/globex") as ws:
            await welcome(ws)
            assert (await request(ws, {"type": "where", "id": 1}))["data"] == {"tenant": "globex"}
        for path in ("/ws", "/ws/a/b", "/other"):
            with pytest.raises(websockets.InvalidStatus) as info:
                async with srv.connect(issue(), path=path):
                    pass
            assert info.value.response.status_code == 404, path

    run(go())


def test_path_parameters_when_mounted(keydir: Path, issue: Any) -> None:
    srv = AppServer(keydir, base_env(keydir, **APP_ENV), app="channels_app:host").start()
    try:
        async def go() -> None:
            async with srv.connect(issue(), path="/realtime/ws/initech") as ws:
                await welcome(ws)
                assert (await request(ws, {"type": "where", "id": 1}))["data"] == {"tenant": "initech"}
            # Below the mount point a path that does not match is ours to refuse (404); outside it, the host's (403).
            for path, status in (("/realtime/ws", 404), ("/realtime/ws/a/b", 404), ("/ws/initech", 403)):
                with pytest.raises(websockets.InvalidStatus) as info:
                    async with srv.connect(issue(), path=path):
                        pass
                assert info.value.response.status_code == status, path

        run(go())
    finally:
        srv.stop()


# -- the service without Python code: SECURE_WS_CHANNELS_FILE -------------------------------------------------------

CHANNELS_TOML = """
[[channels]]
pattern = "room.*"
history_size = 2
history_ttl = "10m"

[[channels]]
pattern = "feed.*"
client_publish = false

[[channels]]
pattern = "quiet.*"
presence = false
"""


def channels_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "channels.toml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_the_service_reads_its_channels_file(make_server: Any, issue: Any, tmp_path: Path) -> None:
    srv = make_server(SECURE_WS_CHANNELS_FILE=str(channels_file(tmp_path, CHANNELS_TOML)))
    t = tag()

    async def go() -> None:
        async with srv.connect(issue(scope=ALL)) as ws:
            await welcome(ws)
            await published_all(ws, f"room.{t}", 5)
            assert [m["data"] for m in (await history(ws, f"room.{t}"))["messages"]] == [3, 4]
            assert len((await history(ws, f"other.{t}"))["messages"]) == 0  # never published: the default, 100
            assert_error(await request(ws, {"type": "publish", "channel": f"feed.{t}", "data": 1, "id": 1}), "forbidden", 1)
            assert_error(await request(ws, {"type": "presence", "channel": f"quiet.{t}", "id": 2}), "forbidden", 2)

    run(go())


@pytest.mark.parametrize(
    ("text", "mode", "said"),
    [
        ('[[channels]]\npattern = "room.*"\nhistory_sise = 5\n', 0o600, "#1 ('room.*'): unknown key 'history_sise'"),
        ('[[channels]]\npattern = "room.*"\nhistory_size = "big"\n', 0o600, "history_size must be an integer from 0 to 10000"),
        ('[[channels]]\npattern = "room.*"\nhistory_size = -1\n', 0o600, "history_size must be an integer from 0 to 10000, got -1"),
        ('[[channels]]\npattern = "a.*"\n[[channels]]\npattern = "room.*"\nhistory_size = 1000000000\n', 0o600,
         "#2 ('room.*'): history_size must be an integer from 0 to 10000, got 1000000000"),
        ('[[channels]]\npattern = "room.*"\npresence = "yes"\n', 0o600, "presence must be true or false"),
        ('[[channels]]\npattern = "room/*"\n', 0o600, "pattern 'room/*' matches no channel"),
        ('[[channels]]\npattern = "room.*"\nhistory_ttl = "soon"\n', 0o600, "not a duration: 'soon'"),
        ('[[channels]\npattern = "room.*"\n', 0o600, "not TOML"),
        ('[[channels]]\npattern = "room.*"\n', 0o666, "writable by others"),
        ("x" * (1 << 20 | 1), 0o600, "larger than 1048576 bytes"),
    ],
    ids=["unknown-key", "wrong-type", "minus-one", "billion", "not-bool", "matches-nothing", "bad-ttl", "not-toml",
         "world-writable", "too-big"],
)
def test_a_bad_channels_file_stops_start_up_with_one_line(keydir: Path, tmp_path: Path, text: str, mode: int, said: str) -> None:
    import subprocess
    import sys

    env = base_env(keydir, SECURE_WS_CHANNELS_FILE=str(channels_file(tmp_path, text, mode)))
    result = subprocess.run(
        [sys.executable, "-m", "secure_ws", "serve", "--port", str(free_port())],
        env=env, cwd=keydir, capture_output=True, text=True, timeout=60,
    )
    lines = refusal_lines(result.stderr)
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("secure-ws: configuration error: SECURE_WS_CHANNELS_FILE: ") and said in lines[0], lines


def test_bad_channel_declarations_fail_at_import() -> None:
    api = SecureWS()
    for pattern, options, said in (
        ("room.*", {"history_size": -1}, "from 0 to 10000"),
        ("room.*", {"history_size": 10**9}, "from 0 to 10000"),
        ("room.*", {"history_ttl": 3.5}, "history_ttl must be a duration"),
        ("room.*", {"presence": 1}, "presence must be true or false"),
        ("room #1", {}, "matches no channel"),
        ("", {}, "matches no channel"),
    ):
        with pytest.raises(RegistrationError, match=said):
            api.channels(pattern, **options)

    async def hook(ctx: Any) -> None: ...

    with pytest.raises(RegistrationError, match=r"taking \(ctx, channel\)"):
        api.on_subscribe("room.*")(hook)
    with pytest.raises(RegistrationError, match=r"taking \(ctx, channel, data\)"):
        api.on_publish("room.*")(hook)
    with pytest.raises(RegistrationError, match="path starting with"):
        SecureWS(path="ws/{tenant}")


# -- the RPC proxy's events -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with running_backend() as server:
        yield server


def proxied(keydir: Path, backend: Backend, path: str, events: str = "subscribe,publish,connect") -> Server:
    env = base_env(keydir, SECURE_WS_RPC_PROXY_URL=backend.url(path), SECURE_WS_RPC_PROXY_SECRET=SECRET.decode(),
                   SECURE_WS_HANDLER_TIMEOUT="1s", SECURE_WS_RPC_PROXY_EVENTS=events)
    return Server(keydir, env).start()


def test_proxy_events_allow_and_pass_data(keydir: Path, backend: Backend, issue: Any) -> None:
    import json

    srv = proxied(keydir, backend, "/data")
    t = tag()
    try:
        async def go() -> None:
            async with srv.connect(issue(scope=ALL)) as ws, srv.connect(issue(scope=ALL)) as listener:
                await welcome(ws)
                await welcome(listener)
                joined = await request(listener, {"type": "subscribe", "channel": f"room.{t}"})
                assert joined["data"]["echo"] == {"channel": f"room.{t}"}
                await request(ws, {"type": "publish", "channel": f"room.{t}", "data": "hi"})
                # The backend's data is what is published.
                assert (await recv_json(listener))["data"]["echo"] == {"channel": f"room.{t}", "data": "hi"}

        run(go())
    finally:
        srv.stop()
    kinds = [json.loads(body)["type"] for _, _, body in backend.requests]
    assert kinds.count("$connect") == 2 and kinds.count("$subscribe") == 1 and kinds.count("$publish") == 1
    connect = next(json.loads(body) for _, _, body in backend.requests if json.loads(body)["type"] == "$connect")
    assert connect["data"] == {}


def test_proxy_event_errors_refuse(keydir: Path, backend: Backend, issue: Any) -> None:
    srv = proxied(keydir, backend, "/error", events="subscribe,publish")
    try:
        async def go() -> None:
            async with srv.connect(issue(scope=ALL)) as ws:
                await welcome(ws)
                assert_error(await request(ws, {"type": "subscribe", "channel": "room.x", "id": 1}), "empty_order", 1)
                assert_error(await request(ws, {"type": "publish", "channel": "room.x", "data": 1, "id": 2}), "empty_order", 2)
                await nothing_more(ws)

        run(go())
    finally:
        srv.stop()
    connect = proxied(keydir, backend, "/error", events="connect")
    try:
        async def refused() -> None:
            async with connect.connect(issue()) as ws:
                assert await closed_with(ws) == (1008, "connection refused")

        run(refused())
    finally:
        connect.stop()


def test_proxy_events_null_data_allows_as_sent(keydir: Path, backend: Backend, issue: Any) -> None:
    srv = proxied(keydir, backend, "/fixed/null-data", events="subscribe,publish")
    t = tag()
    try:
        async def go() -> None:
            async with srv.connect(issue(scope=ALL)) as ws:
                await welcome(ws)
                joined = await request(ws, {"type": "subscribe", "channel": f"room.{t}"})
                assert joined["type"] == "subscribed" and "data" not in joined
                await request(ws, {"type": "publish", "channel": f"room.{t}", "data": {"as": "sent"}})
                assert (await recv_json(ws))["data"] == {"as": "sent"}

        run(go())
    finally:
        srv.stop()


def test_proxy_garbage_to_connect_is_a_close_to_retry(keydir: Path, backend: Backend, issue: Any) -> None:
    srv = proxied(keydir, backend, "/fixed/text", events="connect")
    try:
        async def go() -> None:
            async with srv.connect(issue()) as ws:
                assert await closed_with(ws) == (1013, "service unavailable")  # never a welcome

        run(go())
    finally:
        srv.stop()


@pytest.mark.parametrize("path", ["/fixed/text", "/fixed/array", "/fixed/neither", "/fixed/500", "/hang"])
def test_proxy_garbage_to_subscribe_is_unavailable_and_never_subscribes(keydir: Path, backend: Backend, issue: Any, path: str) -> None:
    srv = proxied(keydir, backend, path, events="subscribe")
    t = tag()
    try:
        async def go() -> None:
            async with srv.connect(issue(scope=ALL)) as ws:
                await welcome(ws)
                reply = await request(ws, {"type": "subscribe", "channel": f"room.{t}", "id": 1}, timeout=10)
                assert_error(reply, "unavailable", 1)
                assert await request(ws, {"type": "publish", "channel": f"room.{t}", "data": 1}) == {
                    "type": "published", "channel": f"room.{t}"}
                await nothing_more(ws)  # not subscribed: its own publication does not come back

        run(go())
    finally:
        backend.end_test()
        srv.stop()


# -- two servers on one Redis: the same options everywhere ------------------------------------------------------------


def test_options_agree_across_servers_on_redis(keydir: Path, own_redis: Any, issue: Any) -> None:
    redis = own_redis()
    env = base_env(keydir, SECURE_WS_STORAGE_URL=redis.url, **APP_ENV)
    t = tag()
    with running_pair(lambda: AppServer(keydir, env, app="channels_app:app")) as (a, b):
        async def go() -> None:
            async with a.connect(issue(scope=ALL), path=PATH) as on_a, b.connect(issue(scope=ALL), path=PATH) as on_b:
                await welcome(on_a)
                await welcome(on_b)
                await published_all(on_a, f"room.vip.{t}", 4)
                await published_all(on_b, f"room.vip.{t}", 4)
                for ws in (on_a, on_b):  # 8 published through both, 3 kept, read from either
                    assert [m["data"] for m in (await history(ws, f"room.vip.{t}"))["messages"]] == [1, 2, 3]
                    assert_error(await request(ws, {"type": "publish", "channel": f"feed.{t}", "data": 1, "id": 1}), "forbidden", 1)
                    assert_error(await request(ws, {"type": "presence", "channel": f"quiet.{t}", "id": 2}), "forbidden", 2)
                await request(on_b, {"type": "subscribe", "channel": f"feed.{t}"})
                await request(on_a, {"type": "shout", "data": {"channel": f"feed.{t}", "data": "both"}})
                assert (await recv_json(on_b))["data"] == "both"

        run(go())


def test_proxy_events_setting_is_checked() -> None:
    from secure_ws.settings import ConfigError, load_settings

    proxy = {"SECURE_WS_RPC_PROXY_URL": "http://127.0.0.1:9/x", "SECURE_WS_RPC_PROXY_SECRET": "s" * 32}
    settings = load_settings(environ={**proxy, "SECURE_WS_RPC_PROXY_EVENTS": " subscribe, connect "}, env_file=None)
    assert settings.rpc_proxy_events == {"subscribe", "connect"}
    with pytest.raises(ConfigError, match="SECURE_WS_RPC_PROXY_EVENTS: use a comma-separated list of subscribe, publish, connect"):
        load_settings(environ={**proxy, "SECURE_WS_RPC_PROXY_EVENTS": "subscribe,unsubscribe"}, env_file=None)
    with pytest.raises(ConfigError, match="SECURE_WS_RPC_PROXY_EVENTS: is set but SECURE_WS_RPC_PROXY_URL is not"):
        load_settings(environ={"SECURE_WS_RPC_PROXY_EVENTS": "publish"}, env_file=None)


def test_publisher_keeps_the_servers_history_sizes(own_redis: Any, tmp_path: Path) -> None:
    """secure_ws.Publisher reads the same channels file (and rules declared in code) as the server."""
    from secure_ws import Publisher
    from secure_ws.settings import load_settings
    from secure_ws.state.channel_options import Rule

    redis = own_redis()
    path = channels_file(tmp_path, CHANNELS_TOML)
    settings = load_settings(environ={"SECURE_WS_CHANNELS_FILE": str(path)}, env_file=None)

    async def go() -> None:
        async with Publisher.from_url(redis.url, settings, rules=[Rule("news.*", history_size=3)]) as publisher:
            for channel, kept in (("room.p", 2), ("news.p", 3), ("other.p", 6)):
                for n in range(6):
                    await publisher.publish(channel, n)
                found = await publisher.storage.history(channel, None, 100)
                assert found is not None and len(found.messages) == kept, (channel, found)

    run(go())

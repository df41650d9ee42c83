"""SPEC §10 over the real wire: ``POST /api/<method>`` on uvicorn over TLS, clients on ``websockets``.

Every method end to end, the throttle, and hostile requests: missing and odd keys, bad bodies, bodies far
too large. The key commands and their live pickup are in test_server_api_keys.py; two workers on Redis,
``Publisher`` and ``secure-ws publish`` in test_server_api_scaleout.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from helpers import (
    AppServer,
    Server,
    api_acall,
    api_call,
    api_env,
    api_error,
    closed_with,
    no_traceback,
    recv_json,
    refusal,
    request,
    rss_kb,
    run,
    sans_position,
    subscribe,
    unique_sub,
    welcome,
)

MIB = 1 << 20


@pytest.fixture(scope="module")
def api(keydir: Path, keys_file: Path, api_key: str) -> Iterator[Server]:
    srv = Server(keydir, api_env(keydir, keys_file)).start()
    yield srv
    no_traceback(srv)
    srv.stop()


# -- no key, no API ----------------------------------------------------------------------------------


def test_without_api_keys_every_api_path_is_the_plain_404(server: Server) -> None:
    _, _, not_found = server.get("/no-such-path")
    for method in ("publish", "nope", ""):
        response = api_call(server, method, {"channel": "a", "data": 1}, key="swk_whatever")
        assert (response.status_code, response.content) == (404, not_found)
    response = api_call(server, "publish", http_method="GET")
    assert (response.status_code, response.content) == (404, not_found)


# -- every method ------------------------------------------------------------------------------------


def test_publish_reaches_subscribers_with_no_from(api: Server, api_key: str, issue: Any) -> None:
    channel = f"news.{unique_sub()}"

    async def go() -> None:
        async with api.connect(issue(scope=f"subscribe:{channel}")) as ws:
            await welcome(ws)
            await subscribe(ws, channel)
            response = await api_acall(api, "publish", {"channel": channel, "data": {"n": [1, "two"]}}, api_key)
            assert response.status_code == 200, response.text
            assert set(response.json()) <= {"offset", "epoch"}  # {} with history off
            assert sans_position(await recv_json(ws)) == {"type": "message", "channel": channel, "data": {"n": [1, "two"]}}

    run(go())


def test_broadcast_reaches_every_channel_and_a_bad_list_publishes_nothing(api: Server, api_key: str, issue: Any) -> None:
    channels = [f"bc.{unique_sub()}" for _ in range(3)]

    async def go() -> None:
        async with api.connect(issue(scope="subscribe:bc.*")) as ws:
            await welcome(ws)
            for channel in channels:
                await subscribe(ws, channel)
            # One bad name among good ones, a name twice, too many, none: refused whole, before anything is published.
            for bad in ([*channels[:2], "not a channel!"], [channels[0], channels[0]], [channels[0]] * 101, [], channels[0]):
                api_error(await api_acall(api, "broadcast", {"channels": bad, "data": 1}, api_key), 400, "bad_request")
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}  # nothing arrived before the pong

            response = await api_acall(api, "broadcast", {"channels": channels, "data": "hi"}, api_key)
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert [r["channel"] for r in results] == channels
            got = [sans_position(await recv_json(ws)) for _ in channels]
            assert sorted(got, key=lambda m: m["channel"]) == [
                {"type": "message", "channel": c, "data": "hi"} for c in sorted(channels)
            ]

    run(go())


def test_send_pushes_to_every_connection_of_the_sub_only(api: Server, api_key: str, issue: Any) -> None:
    sub = unique_sub()

    async def go() -> None:
        async with api.connect(issue(sub)) as one, api.connect(issue(sub)) as two, api.connect(issue()) as other:
            for ws in (one, two, other):
                await welcome(ws)
            response = await api_acall(api, "send", {"sub": sub, "data": {"unread": 3}}, api_key)
            assert (response.status_code, response.json()) == (200, {})
            for ws in (one, two):
                assert await recv_json(ws) == {"type": "push", "data": {"unread": 3}}
            assert await request(other, {"type": "ping"}) == {"type": "pong"}

    run(go())


def test_disconnect_closes_every_connection_within_2s_and_they_may_reconnect(api: Server, api_key: str, issue: Any) -> None:
    sub = unique_sub()
    token = issue(sub)

    async def go() -> None:
        async with api.connect(token) as one, api.connect(token) as two:
            for ws in (one, two):
                await welcome(ws)
            response = await api_acall(api, "disconnect", {"sub": sub}, api_key)
            assert (response.status_code, response.json()) == (200, {})
            for ws in (one, two):
                assert await closed_with(ws, timeout=2) == (1008, "disconnected")
        async with api.connect(token) as again:
            await welcome(again)

    run(go())


def test_revoke_by_jti_and_by_sub_as_the_command_does(api: Server, api_key: str, issue: Any) -> None:
    sub, jti = unique_sub(), f"jti-{unique_sub()}"
    one_token = issue(jti=jti)
    every_token = issue(sub)

    async def go() -> None:
        async with api.connect(one_token) as ws:
            await welcome(ws)
            response = await api_acall(api, "revoke", {"jti": jti}, api_key)
            assert (response.status_code, response.json()) == (200, {})
            assert await closed_with(ws, timeout=2) == (1008, "token revoked")
        assert await refusal(api, one_token) == (1008, "token revoked")

        async with api.connect(every_token) as ws:
            await welcome(ws)
            response = await api_acall(api, "revoke", {"sub": sub}, api_key)
            assert (response.status_code, response.json()) == (200, {})
            assert await closed_with(ws, timeout=2) == (1008, "token revoked")
        assert await refusal(api, every_token) == (1008, "token revoked")
        async with api.connect(issue(sub)) as fresh:  # issued after the call returned: unaffected
            await welcome(fresh)

    run(go())
    for body in ({}, {"jti": jti, "sub": sub}, {"jti": 5}, {"sub": ""}, {"sub": "x" * 300}, {"jti": None}, {"who": "x"}):
        api_error(api_call(api, "revoke", body, api_key), 400, "bad_request")


def test_channels_presence_and_info_answer_across_the_node(api: Server, api_key: str, issue: Any) -> None:
    channel = f"room.{unique_sub('api-presence')}"

    async def go() -> None:
        async with api.connect(issue(scope=f"subscribe:{channel}")) as ws:
            hello = await welcome(ws)
            await subscribe(ws, channel)
            answer = api_call(api, "channels", {}, api_key)
            assert answer.status_code == 200 and answer.json()["channels"][channel] == {"subscribers": 1}, answer.text
            answer = api_call(api, "presence", {"channel": channel}, api_key)
            assert answer.status_code == 200, answer.text
            assert answer.json()["clients"] == {hello["connection_id"]: {"sub": hello["sub"]}}
            answer = api_call(api, "info", {}, api_key)
            assert answer.status_code == 200, answer.text
            nodes = answer.json()["nodes"]
            assert len(nodes) == 1 and nodes[0]["connections"] >= 1, nodes

    run(go())


def test_history_answers_what_subscribers_received(api: Server, api_key: str, issue: Any) -> None:
    channel = f"room.{unique_sub('api-history')}"
    first = api_call(api, "publish", {"channel": channel, "data": 1}, api_key).json()
    second = api_call(api, "publish", {"channel": channel, "data": 2}, api_key).json()
    assert second == {"offset": first["offset"] + 1, "epoch": first["epoch"]}
    answer = api_call(api, "history", {"channel": channel}, api_key)
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert (document["offset"], document["epoch"]) == (second["offset"], second["epoch"])
    assert [m["data"] for m in document["messages"]] == [1, 2]
    assert document["messages"][-1] == {"type": "message", "channel": channel, "data": 2, **second}
    since = {"offset": first["offset"], "epoch": first["epoch"]}
    answer = api_call(api, "history", {"channel": channel, "since": since, "limit": 10}, api_key).json()
    assert [m["data"] for m in answer["messages"]] == [2] and answer["recovered"] is True
    answer = api_call(api, "history", {"channel": channel, "since": {**since, "epoch": "other"}}, api_key).json()
    assert answer["messages"] == [] and answer["recovered"] is False


def test_bodies_of_the_read_methods_are_checked(api: Server, api_key: str) -> None:
    for method, body in (
        ("channels", {"all": True}),
        ("presence", {}),
        ("presence", {"channel": "bad channel"}),
        ("history", {"channel": "room.a", "limit": -1}),
        ("history", {"channel": "room.a", "limit": True}),
        ("history", {"channel": "room.a", "since": {"offset": 3}}),
        ("history", {"channel": "room.a", "since": {"offset": "3", "epoch": "e"}}),
        ("info", {"node": 1}),
    ):
        api_error(api_call(api, method, body, api_key), 400, "bad_request")


# -- who may call ------------------------------------------------------------------------------------


def test_a_missing_or_wrong_key_is_401_with_no_detail(api: Server, api_key: str) -> None:
    body = {"channel": "room.a", "data": 1}
    basic = base64.b64encode(f"user:{api_key}".encode()).decode()
    answers = set()
    for headers in (
        {},
        {"Authorization": "Bearer swk_" + "A" * 43},
        {"Authorization": f"Bearer {api_key}x"},
        {"Authorization": f"Bearer {api_key[:-1]}"},
        {"Authorization": f"Basic {basic}"},
        {"Authorization": api_key},
        {"Authorization": "Bearer"},
        {"Authorization": f"Token {api_key}"},
        {"X-Api-Key": api_key},
    ):
        response = api_call(api, "publish", body, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        answers.add(response.content)
    assert len(answers) == 1 and json.loads(answers.pop()) == {"error": {"code": "unauthorized", "message": "unauthorized"}}
    # Two Authorization headers, one of them right: ambiguous, refused.
    with httpx.Client(verify=api.ssl_context(), timeout=10) as client:
        response = client.post(f"{api.https}/api/publish", content=json.dumps(body),
                               headers=[("Authorization", f"Bearer {api_key}"), ("Authorization", "Bearer nope")])
    assert response.status_code == 401
    # Odd bytes, only spaces: a 401 like any other.
    for value in (b"Bearer \xff\xfe", b"Bearer     ", b"Bearer\t" + api_key.encode(), b"\xc3\xa9 " + api_key.encode()):
        status, _ = raw_request(api, b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: " + value
                                + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        assert status == 401, value
    # The scheme is case-insensitive; spaces around the key do not matter.
    assert api_call(api, "publish", body, headers={"Authorization": f"bEaReR   {api_key}"}).status_code == 200
    status, _ = raw_request(api, b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + api_key.encode()
                            + b"   \r\nContent-Length: 32\r\nConnection: close\r\n\r\n" + json.dumps(body).encode())
    assert status == 200
    log = api.log()
    assert api_key not in log and "swk_AAAA" not in log


def test_unknown_method_is_404_and_get_is_405(api: Server, api_key: str) -> None:
    for method in ("nope", "publish/extra", "Publish", "", "%00"):
        message = api_error(api_call(api, method, {}, api_key), 404, "not_found")
        assert "publish" in message  # names the methods there are
    response = api_call(api, "publish", key=api_key, http_method="GET")
    api_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert api_call(api, "nope", {}).status_code == 401  # without a key nothing says which methods exist


# -- hostile bodies ----------------------------------------------------------------------------------


BAD_BODIES = [
    b"",
    b"not json",
    b"\xff\xfe{}",
    b"[1, 2]",
    b'"a string"',
    b"null",
    b"{",
    b'{"channel": "room.a"}',
    b'{"data": 1}',
    b'{"channel": 5, "data": 1}',
    b'{"channel": ["room.a"], "data": 1}',
    b'{"channel": "", "data": 1}',
    b'{"channel": "' + b"x" * 129 + b'", "data": 1}',
    b'{"channel": "room.a", "data": 1, "extra": true}',
    b'{"channel": "room.a", "data": NaN}',
    b'{"channel": "room.a", "data": 1e400}',
    b'{"channel": "room.a", "data": "\\ud800"}',
    b'{"channel": "room.a", "data": {"\\udfff": 1}}',
    b'{"channel": "room.a", "data": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    b"[" * 500_000,
    b'{"channel": "room.a", "channel": 1, "data": 1}',
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_a_bad_body_is_400_and_echoes_nothing(api: Server, api_key: str, body: bytes) -> None:
    api_error(api_call(api, "publish", raw=body, key=api_key), 400, "bad_request")


def test_error_messages_never_echo_values(api: Server, api_key: str) -> None:
    secret = "S3CR3T-VALUE"
    for method, body in (
        ("publish", {"channel": f"{secret} !", "data": 1}),
        ("publish", {"channel": "room.a", "data": 1, secret: 1}),
        ("broadcast", {"channels": ["room.a", f"{secret}!"], "data": 1}),
        ("send", {"sub": {secret: 1}, "data": 1}),
        ("revoke", {"jti": secret, "sub": secret}),
        ("history", {"channel": "room.a", "since": {"offset": secret, "epoch": secret}}),
    ):
        response = api_call(api, method, body, api_key)
        api_error(response, 400, "bad_request")
        assert secret not in response.text


def test_deep_but_parseable_data_is_answered_never_500(api: Server, api_key: str) -> None:
    for depth in (100, 300, 600, 900, 990):
        raw = b'{"channel": "room.a", "data": ' + b"[" * depth + b"]" * depth + b"}"
        response = api_call(api, "publish", raw=raw, key=api_key)
        assert response.status_code in (200, 400), (depth, response.status_code)
    no_traceback(api)


def test_huge_channel_lists_are_refused(api: Server, api_key: str) -> None:
    names = [f"c.{i}" for i in range(100_000)]  # ~1 MB of names
    response = api_call(api, "broadcast", {"channels": names[:60_000], "data": 1}, api_key)
    api_error(response, 400, "bad_request")
    response = api_call(api, "broadcast", {"channels": names, "data": 1}, api_key)
    api_error(response, 413, "too_large")


# -- bodies too large ------------------------------------------------------------------------------


def raw_request(srv: Server, head: bytes, chunks: Any = (), timeout: float = 20) -> tuple[int, bytes]:
    """Send ``head`` then each of ``chunks`` over TLS, reading whatever the server answers between chunks;
    stop sending once it answered or closed; (status, all bytes read).

    One thread does both: an SSL socket must not be read in one thread while it is written in another
    (OpenSSL's connection object is not thread-safe; such a reader can fail and miss the answer)."""
    context = srv.ssl_context()
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=timeout), server_hostname="localhost")
    received = bytearray()

    def read(block: bool) -> bool:
        """Read what has arrived (with ``block``: until the server closes); True once it has closed."""
        sock.settimeout(timeout if block else 0.0)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return True
                received.extend(data)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False  # nothing more yet
        except (OSError, ssl.SSLError):
            return True  # reset or timed out: whatever came before it has been read
        finally:
            sock.settimeout(timeout)

    try:
        sock.sendall(head)
        for chunk in chunks:
            if received or read(block=False):
                break  # the server has answered: the rest is not sent
            try:
                sock.sendall(chunk)
            except (OSError, ssl.SSLError):
                break  # the server answered and closed while we were still sending: expected
        read(block=True)
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 "), bytes(received[:200])
    return int(received[9:12]), bytes(received)


def test_bodies_over_1_mib_are_413_and_never_buffered(keydir: Path, keys_file: Path, api_key: str, tmp_path: Path) -> None:
    srv = Server(keydir, api_env(keydir, keys_file)).start()
    try:
        auth = f"Authorization: Bearer {api_key}\r\n".encode()
        api_call(srv, "publish", {"channel": "warm.up", "data": "x" * 1000}, api_key)
        base = rss_kb(srv.proc.pid, "VmHWM")  # type: ignore[union-attr]

        # Content-Length says too much: refused before a byte of the body is read.
        status, answer = raw_request(srv, b"POST /api/publish HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 10485760\r\n\r\n")
        assert status == 413 and b'"too_large"' in answer

        # Just over the bound, honestly announced.
        status, _ = raw_request(srv, b"POST /api/publish HTTP/1.1\r\nHost: x\r\n" + auth + f"Content-Length: {MIB + 1}\r\n\r\n".encode(),
                                [b"x" * (MIB + 1)])
        assert status == 413

        # Chunked, 10 MB: no length to check first, so it is counted while read.
        chunk = b"10000\r\n" + b"[" * 0x10000 + b"\r\n"
        status, _ = raw_request(srv, b"POST /api/publish HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n",
                                [chunk] * 160 + [b"0\r\n\r\n"])
        assert status == 413

        # A lying Content-Length: 100 bytes announced, 10 MB sent. What follows the 100 bytes is not a request:
        # 400 (ours for the body, or the parser's for the rest, whichever is first), and the connection is dropped.
        status, _ = raw_request(srv, b"POST /api/publish HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 100\r\n\r\n",
                                [b"x" * 0x10000] * 160)
        assert status == 400

        # A body announced short and sent long with chunked framing too: refused by the parser, nothing read.
        status, _ = raw_request(srv, b"POST /api/publish HTTP/1.1\r\nHost: x\r\n" + auth
                                + b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n", [chunk] * 160)
        assert status == 400

        growth_mb = (rss_kb(srv.proc.pid, "VmHWM") - base) / 1024  # type: ignore[union-attr]
        assert growth_mb < 8, f"server peak memory grew {growth_mb:.1f} MB on 40 MB of refused bodies"
        assert api_call(srv, "publish", {"channel": "still.up", "data": 1}, api_key).status_code == 200
        no_traceback(srv)
    finally:
        srv.stop()


# -- the throttle ------------------------------------------------------------------------------------


def test_bad_keys_count_on_the_handshake_throttle_then_429_before_any_key_check(
    keydir: Path, keys_file: Path, api_key: str, issue: Any
) -> None:
    srv = Server(keydir, api_env(keydir, keys_file, SECURE_WS_HANDSHAKE_RATE_LIMIT="10/minute")).start()
    try:
        body = {"channel": "room.a", "data": 1}
        for _ in range(15):  # good keys do not count
            assert api_call(srv, "publish", body, api_key).status_code == 200
        for i in range(10):
            assert api_call(srv, "publish", body, f"swk_wrong{i}").status_code == 401
        limited = api_call(srv, "publish", body, "swk_wrong")
        api_error(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        api_error(api_call(srv, "publish", body, api_key), 429, "rate_limited")  # the right key, unchecked: no oracle

        async def handshake_refused() -> None:  # the same throttle as the WebSocket handshakes
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with srv.connect(issue()):
                    pass
            assert refused.value.response.status_code == 429

        run(handshake_refused())

        async def flood() -> list[int]:
            async with httpx.AsyncClient(verify=srv.ssl_context(), timeout=20) as client:
                async def one(i: int) -> int:
                    headers = {"Authorization": f"Bearer swk_flood{i}"} if i % 3 else {}
                    response = await client.post(f"{srv.https}/api/publish", content=b"{}", headers=headers)
                    return response.status_code
                return await asyncio.gather(*(one(i) for i in range(300)))

        started = time.monotonic()
        statuses = run(flood())
        assert time.monotonic() - started < 30
        # The sliding window lets a hit through now and then as the past minute's weight fades; never more.
        assert set(statuses) <= {401, 429} and statuses.count(401) <= 5, statuses
        no_traceback(srv)
        assert api_key not in srv.log() and "swk_flood" not in srv.log()
    finally:
        srv.stop()


# -- mounted in a host application ---------------------------------------------------------------


@pytest.mark.parametrize("host", ["starlette_host", "fastapi_host"])
def test_the_api_follows_the_mount_point(keydir: Path, keys_file: Path, api_key: str, issue: Any, host: str) -> None:
    srv = AppServer(keydir, api_env(keydir, keys_file), app=f"mounted_app:{host}").start()
    channel = f"news.{unique_sub()}"
    try:
        async def go() -> None:
            async with srv.connect(issue(scope=f"subscribe:{channel}"), path="/realtime/ws") as ws:
                await welcome(ws)
                await subscribe(ws, channel)
                with httpx.Client(verify=srv.ssl_context(), timeout=10) as client:
                    response = await asyncio.to_thread(
                        client.post, f"{srv.https}/realtime/api/publish", json={"channel": channel, "data": 7},
                        headers={"Authorization": f"Bearer {api_key}"},
                    )
                assert response.status_code == 200, response.text
                assert sans_position(await recv_json(ws)) == {"type": "message", "channel": channel, "data": 7}

        run(go())
        no_traceback(srv)
    finally:
        srv.stop()

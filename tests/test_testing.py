"""secure_ws.testing.TestServer: an application's real handshake, scopes, limits, dispatch and channels in process.

The application is tests/apps/client_app.py, imported here without certs/ or any SECURE_WS_* variable (the module
only registers; its settings and keys are read when it starts serving).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
from apps import client_app
from helpers import ROOT, run, wait_until

from secure_ws import Context, Reject, SecureWS
from secure_ws.client import AuthenticationFailed, ConnectionLost, ConnectionRefused, Overflow, RateLimited, RequestError
from secure_ws.client.inbox import MAX_UNREAD
from secure_ws.testing import TestServer

api = client_app.api


def test_an_application_module_imports_and_is_tested_without_certs_or_variables(tmp_path):
    """In an empty folder, with no SECURE_WS_* variable: the chat example imports, and a TestServer serves it."""
    script = (
        "import asyncio\n"
        "from examples.chat.app import api\n"
        "from secure_ws.testing import TestServer\n"
        "async def go():\n"
        "    async with TestServer(api) as server:\n"
        "        async with server.connect(sub='alice', scope='chat:write') as ws:\n"
        "            print(await ws.call('chat.who'))\n"
        "asyncio.run(go())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURE_WS_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'online': ['alice'], 'count': 1}"
    assert list(tmp_path.iterdir()) == []  # no certs/, no key file left behind


def test_call_reject_scope_claims_and_its_own_token():
    async def go():
        async with TestServer(api) as server:
            async with server.connect(sub="alice", scope="admin", role="owner") as ws:
                assert ws.sub == "alice" and ws.welcome["type"] == "welcome"
                assert await ws.call("add", {"a": 1, "b": 2}) == {"sum": 3, "sub": "alice", "role": "owner"}
                with pytest.raises(RequestError) as info:
                    await ws.call("add", {"a": "x"})
                assert (info.value.code, info.value.message) == ("bad_numbers", "a and b must be integers")
                assert await ws.call("admin.only") == "yes"
                assert await ws.echo({"x": [1]}) == {"x": [1]}
            async with server.connect(sub="bob") as ws:
                with pytest.raises(RequestError) as info:
                    await ws.call("admin.only")
                assert info.value.code == "forbidden"
                with pytest.raises(RequestError) as info:
                    await ws.call("no.such.type")
                assert info.value.code == "unknown_type"
            token = server.issue_token("carol", scope="admin")
            async with server.connect(token=token) as ws:
                assert (await ws.call("add", {"a": 2, "b": 2}))["sub"] == "carol"
        # Outside the block the application is not served by the test server any more.
        assert api._service is None

    run(go())


def test_a_refused_handshake_raises_with_its_close_code_and_reason():
    refusing = SecureWS()

    @refusing.on_connect
    async def gate(ctx: Context) -> None:
        if ctx.claims.get("banned"):
            raise Reject("banned", "no")

    async def go():
        async with TestServer(refusing, env={"SECURE_WS_MAX_CONNECTIONS_PER_CLIENT": "1"}) as server:
            with pytest.raises(AuthenticationFailed) as fatal:
                await server.connect(token="not-a-jwt")
            assert (fatal.value.code, fatal.value.reason) == (1008, "invalid token")
            with pytest.raises(ConnectionRefused) as info:
                await server.connect(sub="eve", banned=True)
            assert (info.value.code, info.value.reason) == (1008, "connection refused")
            assert not isinstance(info.value, AuthenticationFailed)  # a retryable refusal
            async with server.connect(sub="dave"):
                with pytest.raises(ConnectionRefused) as info:
                    await server.connect(sub="dave")
                assert (info.value.code, info.value.reason) == (1008, "too many connections")

    run(go())


def test_expired_token_is_refused_as_over_the_wire():
    from secure_ws.auth.signing import issue_token

    async def go():
        async with TestServer(api, env={"SECURE_WS_JWT_LEEWAY_SECONDS": "0"}) as server:
            token = issue_token("old", ttl=60, settings=server.settings, now=time.time() - 3600)
            with pytest.raises(ConnectionRefused) as info:
                await server.connect(token=token)
            assert (info.value.code, info.value.reason) == (1008, "token expired")
            assert not isinstance(info.value, AuthenticationFailed)  # a fresh token fixes it

    run(go())


def test_limits_apply_in_process():
    async def go():
        async with TestServer(api, env={"SECURE_WS_RATE_LIMIT": "5/second", "SECURE_WS_RATE_LIMIT_CLOSE_AFTER": "100"}) as server:
            async with server.connect(sub="busy") as ws:
                results = await asyncio.gather(*(ws.echo(n) for n in range(9)), return_exceptions=True)
                limited = [r for r in results if isinstance(r, RateLimited)]
                assert limited and all(r.code == "rate_limited" and r.retry_after_ms > 0 for r in limited), results
            async with server.connect(sub="scarce") as ws:  # its own per-sub window; the type's is 2/minute
                assert [await ws.call("scarce"), await ws.call("scarce")] == ["ok", "ok"]
                with pytest.raises(RateLimited) as info:
                    await ws.call("scarce")
                assert info.value.retry_after_ms > 1000  # a 2/minute window

    run(go())


def test_channels_pushes_history_presence_and_the_server_side():
    async def go():
        async with TestServer(api) as server:
            scope = "subscribe:room.* publish:room.*"
            async with server.connect(sub="alice", scope=scope) as alice, server.connect(sub="bob", scope=scope) as bob:
                subscribed = await alice.subscribe("room.a", join_leave=True)
                assert subscribed["offset"] == 0 and isinstance(subscribed["epoch"], str)
                frames = alice.messages("room.a")
                await bob.subscribe("room.a")
                join = await asyncio.wait_for(anext(frames), 5)
                assert (join["type"], join["sub"], join["connection_id"]) == ("join", "bob", bob.connection_id)
                await bob.publish("room.a", {"text": "hi"})
                message = await asyncio.wait_for(anext(frames), 5)
                assert (message["from"], message["data"], message["offset"]) == ("bob", {"text": "hi"}, 1)
                assert await server.publish("room.a", "from the backend") == {"offset": 2, "epoch": subscribed["epoch"]}
                backend = await asyncio.wait_for(anext(frames), 5)
                assert "from" not in backend and backend["data"] == "from the backend"
                history = await alice.history("room.a", limit=1)
                assert [m["data"] for m in history["messages"]] == ["from the backend"] and history["offset"] == 2
                assert set((await alice.presence("room.a"))["clients"]) == {alice.connection_id, bob.connection_id}
                assert alice.position("room.a") == {"offset": 2, "epoch": subscribed["epoch"]}
                # Pushes: from a handler, from the server side; each push's data, in order.
                pushes = alice.pushes()
                await alice.call("push.me", 1)
                await server.send("alice", 2)
                await bob.call("notify", {"sub": "alice", "data": 3})
                assert [await asyncio.wait_for(anext(pushes), 5) for _ in range(3)] == [1, 2, 3]
                # Resume from a position: what came after it, in order, then live.
                await bob.unsubscribe("room.a")
                leave = await asyncio.wait_for(anext(frames), 5)
                assert (leave["type"], leave["sub"]) == ("leave", "bob")
                for n in (3, 4):
                    await server.publish("room.a", n)
                resumed = bob.messages("room.a")
                reply = await bob.subscribe("room.a", since={"offset": 2, "epoch": subscribed["epoch"]})
                assert reply["recovered"] is True
                assert [(await asyncio.wait_for(anext(resumed), 5))["data"] for _ in range(2)] == [3, 4]
                # Disconnect from the server side: 1008 `disconnected`; the connection's iterators end with it.
                await server.disconnect("alice")
                assert await alice.wait_closed() == (1008, "disconnected")
                with pytest.raises(ConnectionLost):
                    while True:
                        await asyncio.wait_for(anext(pushes), 5)
                with pytest.raises(ConnectionLost) as lost:
                    await alice.echo(1)
                assert (lost.value.code, lost.value.reason) == (1008, "disconnected")
                assert await bob.echo("still here") == "still here"

    run(go())


@pytest.mark.anyio
async def test_any_async_runner_anyio():
    async with TestServer(api) as server:
        async with server.connect(sub="anyio") as ws:
            assert await ws.call("add", {"a": 40, "b": 2}) == {"sum": 42, "sub": "anyio", "role": None}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_an_unread_push_iterator_ends_with_overflow_instead_of_growing():
    async def go():
        async with TestServer(api) as server:
            async with server.connect(sub="sleepy") as ws:
                pushes = ws.pushes()
                for n in range(MAX_UNREAD + 50):
                    await server.send("sleepy", n)
                    await asyncio.sleep(0)  # the server's sender runs: its queue never fills (else: slow consumer)
                await wait_until(lambda: pushes._done, 10, "the bound to be reached")
                got = []
                with pytest.raises(Overflow):
                    while True:
                        got.append(await anext(pushes))
                assert got == list(range(MAX_UNREAD))  # what it held, in order, then a clear error
                assert await ws.echo("alive") == "alive"

    run(go())


def test_streamed_call_and_cancel_in_process():
    async def go():
        async with TestServer(api) as server:
            async with server.connect(sub="streamer") as ws:
                assert [c async for c in ws.stream("count", {"to": 3, "tag": "t1"})] == [{"n": 0}, {"n": 1}, {"n": 2}]
                assert await ws.call("stream.end", "t1") == "done"
                async for chunk in ws.stream("count", {"to": 1000, "every": 0.01, "tag": "t2"}):
                    if chunk["n"] == 2:
                        break
                await wait_until(lambda: client_app.stream_ends.get("t2") == "closed", 5, "the generator's finally")
                got = []
                with pytest.raises(RequestError) as info:
                    async for chunk in ws.stream("count", {"to": 2, "fail": True, "tag": "t3"}):
                        got.append(chunk)
                assert got == [{"n": 0}, {"n": 1}] and info.value.code == "stream_failed"
                assert await ws.echo("after") == "after"

    run(go())


def test_issue_token_is_the_documented_way_to_sign_one():
    """secure_ws.issue_token: durations or seconds, extra claims (never the issuer's own), clear errors."""
    import jwt

    from secure_ws import issue_token
    from secure_ws.auth.signing import SigningError

    async def go():
        async with TestServer(api) as server:
            token = issue_token("grace", scope="admin", ttl="2m", claims={"role": "auditor"}, settings=server.settings)
            claims = jwt.decode(token, options={"verify_signature": False})
            assert claims["exp"] - claims["iat"] == 120 and claims["scope"] == "admin" and claims["role"] == "auditor"
            async with server.connect(token=token) as ws:
                assert (await ws.call("add", {"a": 0, "b": 0}))["role"] == "auditor"
                assert await ws.call("admin.only") == "yes"
            for bad, message in (({"ttl": "soon"}, "ttl"), ({"ttl": 0}, "ttl"), ({"claims": {"sub": "root"}}, "may not set sub"),
                                 ({"ttl": 10**9}, "SECURE_WS_JWT_MAX_TTL")):
                with pytest.raises(SigningError, match=message):
                    issue_token("grace", settings=server.settings, **bad)
            with pytest.raises(SigningError, match="sub"):
                issue_token("", settings=server.settings)

    run(go())

"""secure_ws.client against real servers: uvicorn over TLS in a subprocess, real tokens."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from helpers import ROOMS, AppServer, Server, base_env, cli, run, sans_position, unique_channel, unique_sub, wait_until, welcome

from secure_ws.client import (
    AuthenticationFailed,
    Client,
    ClientClosed,
    ProtocolViolation,
    RateLimited,
    RequestError,
    backoff_delay,
)


class Tokens:
    """A token provider that counts its calls; ``ttls`` gives the lifetime of each successive token."""

    def __init__(self, issue: Any, sub: str | None = None, ttls: list[int] | None = None, scope: str | None = None,
                 fixed: str | None = None) -> None:
        self.issue, self.sub, self.ttls, self.scope, self.fixed = issue, sub or unique_sub("client"), ttls or [900], scope, fixed
        self.issued: list[str] = []

    @property
    def calls(self) -> int:
        return len(self.issued)

    def __call__(self) -> str:
        ttl = self.ttls[min(len(self.issued), len(self.ttls) - 1)]
        token = self.fixed or self.issue(sub=self.sub, ttl=ttl, scope=self.scope)
        self.issued.append(token)
        return token

    def exp(self, index: int) -> int:
        return jwt.decode(self.issued[index], options={"verify_signature": False})["exp"]


def client_for(server: Server, provider: Any, **kwargs: Any) -> Client:
    kwargs.setdefault("backoff_initial", 0.05)
    kwargs.setdefault("backoff_max", 0.5)
    kwargs.setdefault("request_timeout", 5.0)
    return Client(server.url, provider, ssl=server.ssl_context(), **kwargs)


# -- units -----------------------------------------------------------------------------------


def test_backoff_is_full_jitter_exponential_and_bounded():
    rng = random.Random(1234)
    for attempt in range(12):
        ceiling = min(5.0, 0.5 * 2**attempt)
        draws = [backoff_delay(attempt, 0.5, 5.0, rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in draws), attempt
        assert max(draws) > 0.8 * ceiling  # it uses the whole window…
        assert min(draws) < 0.2 * ceiling  # …from near zero: full jitter, not "ceiling ± a bit"
        assert len(set(draws)) > 250  # jittered, not a constant
    assert backoff_delay(10_000, 0.5, 30.0, rng) <= 30.0  # no overflow for huge attempt numbers
    # Seeded: reproducible.
    assert [backoff_delay(3, 0.5, 30.0, random.Random(7)) for _ in range(2)] == [backoff_delay(3, 0.5, 30.0, random.Random(7))] * 2


def test_plain_ws_url_is_refused():
    with pytest.raises(ValueError, match="wss://"):
        Client("ws://localhost:1/ws", lambda: "t")


# -- requests --------------------------------------------------------------------------------


def test_request_reply_matched_by_id(server, issue):
    tokens = Tokens(issue)

    async def go():
        async with client_for(server, tokens) as client:
            assert client.sub == tokens.sub
            assert client.connection_id and isinstance(client.expires_at, int)
            assert client.welcome["type"] == "welcome"
            reply = await client.request({"type": "echo", "id": "mine", "data": 1})
            assert reply == {"type": "echo", "id": "mine", "data": 1}
            auto = await client.request({"type": "ping"})
            assert auto["type"] == "pong" and isinstance(auto["id"], int)
            # Many in flight at once: each gets its own reply back.
            data = [{"n": n, "s": "x" * n} for n in range(10)]
            assert await asyncio.gather(*(client.echo(d) for d in data)) == data
            assert await client.ping() > 0
            # An error frame carries the request's id and becomes an exception for that request only.
            with pytest.raises(RequestError) as info:
                await client.request({"type": "nope", "id": 41})
            assert info.value.code == "unknown_type" and info.value.frame["id"] == 41
            with pytest.raises(RequestError) as info:
                await client.publish("room.x", 1)  # no publish scope
            assert info.value.code == "forbidden"
            assert await client.echo("still fine") == "still fine"
            assert tokens.calls == 1 and client.connections == 1

    run(go())


def test_rate_limited_errors_without_id_fail_the_right_requests(make_server, issue):
    srv = make_server(SECURE_WS_RATE_LIMIT="3/second", SECURE_WS_RATE_LIMIT_CLOSE_AFTER="100")

    async def go():
        async with client_for(srv, Tokens(issue)) as client:
            results = await asyncio.gather(*(client.echo(n) for n in range(8)), return_exceptions=True)
            passed = [r for r in results if not isinstance(r, BaseException)]
            limited = [r for r in results if isinstance(r, RateLimited)]
            assert len(passed) + len(limited) == 8, results  # nothing hangs or times out
            assert passed and limited
            # Sent in order and answered in order: the first ones pass, later ones are dropped,
            # and each passing request got its own data back.
            assert passed == list(range(len(passed)))
            assert all(r.retry_after > 0 for r in limited)

    run(go())


# -- channels --------------------------------------------------------------------------------


def test_subscribe_and_publish_between_two_clients(server, issue):
    channel = f"room.{unique_sub('c')}"
    reader_tokens = Tokens(issue, scope="subscribe:room.*")
    writer_tokens = Tokens(issue, scope="publish:room.*")
    seen: list[dict] = []

    async def on_message(message: dict) -> None:
        seen.append(message)

    async def go():
        async with client_for(server, reader_tokens, on_message=on_message) as reader, \
                client_for(server, writer_tokens) as writer:
            await reader.subscribe(channel)
            assert reader.channels == {channel}
            stream = reader.messages(channel)
            everything = reader.messages()
            await writer.publish(channel, {"hello": 1})
            expected = {"type": "message", "channel": channel, "from": writer_tokens.sub, "data": {"hello": 1}}
            assert sans_position(await asyncio.wait_for(anext(stream), 5)) == expected
            assert sans_position(await asyncio.wait_for(anext(everything), 5)) == expected
            await wait_until(lambda: [sans_position(m) for m in seen] == [expected], 5, "on_message")
            # Refused subscriptions raise and are not remembered.
            with pytest.raises(RequestError) as info:
                await writer.subscribe(channel)
            assert info.value.code == "forbidden" and writer.channels == frozenset()
            await reader.unsubscribe(channel)
            assert reader.channels == frozenset()
            await writer.publish(channel, {"hello": 2})
            assert await reader.echo("sync") == "sync"  # the publication, if any, would have come first
            assert stream._queue.empty()
        # Closing ends the streams and later requests.
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), 1)
        with pytest.raises(ClientClosed):
            await reader.ping()

    run(go())


# -- refresh ---------------------------------------------------------------------------------


def test_refresh_keeps_the_connection_past_the_first_tokens_exp(make_server, issue, caplog):
    srv = make_server(SECURE_WS_JWT_LEEWAY_SECONDS="0")
    tokens = Tokens(issue, ttls=[3])
    caplog.set_level(logging.DEBUG)

    async def provider() -> str:  # an async provider, as a call to an identity provider would be
        await asyncio.sleep(0)
        return tokens()

    async def go():
        async with client_for(srv, provider, refresh_before=2.0) as client:
            first_id, first_exp = client.connection_id, client.expires_at
            assert first_exp == tokens.exp(0)
            await asyncio.sleep(max(0.0, first_exp - time.time()) + 2.5)  # well past the first token's exp
            assert await client.echo("alive") == "alive"
            assert client.connection_id == first_id and client.connections == 1
            assert tokens.calls >= 3  # the handshake, then one refresh per short-lived token
            assert client.expires_at > first_exp + 1
            # The newest token's exp (or the one before, if a refresh is in flight right now).
            assert client.expires_at in {tokens.exp(tokens.calls - 1), tokens.exp(tokens.calls - 2)}
            assert client.last_close is None

    run(go())
    assert tokens.issued and not any(token in caplog.text for token in tokens.issued)
    assert not any(token.split(".")[2] in caplog.text for token in tokens.issued)


# -- reconnecting ----------------------------------------------------------------------------


def test_reconnects_after_restart_with_a_fresh_token_and_resubscribes(make_server, keydir, issue):
    first = make_server()
    second = Server(keydir, first.env)
    second.port = first.port  # the same address, as after a deploy
    channel = f"room.{unique_sub('r')}"
    tokens = Tokens(issue, ttls=[600, 700], scope="subscribe:room.*")
    publisher = Tokens(issue, scope="publish:room.*")

    async def go():
        async with client_for(first, tokens) as client:
            await client.subscribe(channel)
            stream = client.messages(channel)
            old_id = client.connection_id
            assert tokens.calls == 1 and client.expires_at == tokens.exp(0)
            await asyncio.to_thread(first.stop)
            await wait_until(lambda: not client.connected, 10, "the drop to be seen")
            await asyncio.to_thread(second.start)
            await wait_until(lambda: client.connection_id not in (None, old_id), 15, "a new connection")
            await client.ping()  # returns once the new connection is re-subscribed
            assert client.connections == 2 and tokens.calls >= 2
            assert client.expires_at == tokens.exp(tokens.calls - 1) != tokens.exp(0)  # the fresh token
            assert client.last_close[0] in (1001, 1012, 1006)
            async with client_for(second, publisher) as other:
                await other.publish(channel, "after restart")
            message = await asyncio.wait_for(anext(stream), 5)
            assert message["data"] == "after restart" and message["from"] == publisher.sub

    try:
        run(go())
    finally:
        second.stop()


def test_token_expired_reconnects_with_a_fresh_token(make_server, issue):
    srv = make_server(SECURE_WS_JWT_LEEWAY_SECONDS="0")
    tokens = Tokens(issue, ttls=[2, 600])

    async def go():
        async with client_for(srv, tokens, refresh_before=None) as client:
            old_id = client.connection_id
            assert client.expires_at == tokens.exp(0)
            await wait_until(lambda: client.connection_id not in (None, old_id), 10, "a reconnect")
            assert await client.echo("back") == "back"
            assert client.last_close == (1008, "token expired")
            assert tokens.calls == 2 and client.connections == 2
            assert client.expires_at == tokens.exp(1)

    run(go())


def test_too_many_connections_backs_off_and_retries(make_server, issue):
    srv = make_server(SECURE_WS_MAX_CONNECTIONS_PER_CLIENT="1")
    sub = unique_sub("busy")
    tokens = Tokens(issue, sub=sub)

    async def go():
        async with srv.connect(issue(sub=sub)) as holder:
            await welcome(holder)
            client = client_for(srv, tokens, backoff_initial=0.05, backoff_max=0.2)
            starting = asyncio.create_task(client.start())
            await wait_until(lambda: tokens.calls >= 3, 10, "retries")
            assert not starting.done()
            assert client.last_close == (1008, "too many connections")
        await asyncio.wait_for(starting, 10)
        try:
            assert client.connected and client.sub == sub
            assert await client.echo(1) == 1
        finally:
            await client.close()

    run(go())


# -- stopping --------------------------------------------------------------------------------


def test_token_revoked_stops_with_a_clear_error_and_no_retry(server, keydir, issue):
    tokens = Tokens(issue)

    async def go():
        client = client_for(server, tokens)
        await client.start()
        await asyncio.to_thread(cli, keydir, "token", "revoke", "--sub", tokens.sub)
        with pytest.raises(AuthenticationFailed) as info:
            await asyncio.wait_for(client.run_forever(), 10)
        assert (info.value.code, info.value.reason) == (1008, "token revoked")
        await asyncio.sleep(1.0)  # several backoff windows: a retry would call the provider again
        assert tokens.calls == 1 and client.connections == 1 and not client.connected
        with pytest.raises(AuthenticationFailed):
            await client.ping()
        with pytest.raises(AuthenticationFailed):
            await anext(client.messages())
        await client.close()

    run(go())


def test_invalid_token_at_the_handshake_is_fatal(server, issue):
    tokens = Tokens(issue, fixed="not.a.jwt")

    async def go():
        client = client_for(server, tokens)
        with pytest.raises(AuthenticationFailed) as info:
            await asyncio.wait_for(client.start(), 10)
        assert info.value.reason == "invalid token"
        await asyncio.sleep(0.5)
        assert tokens.calls == 1
        await client.close()

    run(go())


# -- recovery (SPEC §11) -------------------------------------------------------------------------


def restarted(server: Server) -> Server:
    """A server for the same address and settings, not started: as after a deploy."""
    again = Server(server.keydir, server.env)
    again.port = server.port
    return again


def test_recovers_what_was_published_while_it_was_away(make_server, own_redis, issue):
    """Two workers on one Redis: the client's worker restarts, messages are published on the other meanwhile;
    the client comes back, re-subscribes with ``since`` by itself, and gets them all, in order, once."""
    redis_url = own_redis().url
    first = make_server(SECURE_WS_STORAGE_URL=redis_url)
    other = make_server(SECURE_WS_STORAGE_URL=redis_url)
    second = restarted(first)
    channel = unique_channel()
    failed: list[str] = []

    async def go():
        async with client_for(first, Tokens(issue, scope=ROOMS), on_recovery_failed=failed.append) as client, \
                client_for(other, Tokens(issue, scope=ROOMS)) as publisher:
            await client.subscribe(channel)
            stream = client.messages(channel)
            await publisher.publish(channel, 1)
            assert (await asyncio.wait_for(anext(stream), 5))["data"] == 1
            await asyncio.to_thread(first.stop)
            await wait_until(lambda: not client.connected, 10, "the drop to be seen")
            for n in (2, 3, 4):
                await publisher.publish(channel, n)
            await asyncio.to_thread(second.start)
            await wait_until(lambda: client.connected, 15, "the reconnect")
            await publisher.publish(channel, 5)
            got = [await asyncio.wait_for(anext(stream), 5) for _ in range(4)]
            assert [(m["data"], m["offset"]) for m in got] == [(2, 2), (3, 3), (4, 4), (5, 5)]
            assert await client.echo("sync") == "sync" and stream._queue.empty()  # nothing twice
            assert failed == [] and client.recovery_failures == 0

    try:
        run(go())
    finally:
        second.stop()


def test_reports_when_it_could_not_recover(make_server, issue):
    """A restarted memory server has lost its history: the client says so, and goes on with live messages."""
    first = make_server()
    second = restarted(first)
    channel = unique_channel()
    failed: list[str] = []
    seen: list[Any] = []

    async def on_recovery_failed(lost: str) -> None:
        failed.append(lost)
        seen.append("reload")

    async def go():
        async with client_for(first, Tokens(issue, scope=ROOMS), on_recovery_failed=on_recovery_failed,
                              on_message=lambda m: seen.append(m["data"])) as client:
            await client.subscribe(channel)
            await client.publish(channel, "before")
            await wait_until(lambda: seen == ["before"], 5, "the first message")
            await asyncio.to_thread(first.stop)
            await wait_until(lambda: not client.connected, 10, "the drop to be seen")
            await asyncio.to_thread(second.start)
            await wait_until(lambda: client.connected, 15, "the reconnect")
            await client.publish(channel, "after")
            await wait_until(lambda: seen == ["before", "reload", "after"], 5, "the report, in order, then live messages")
            assert failed == [channel] and client.recovery_failures == 1

    try:
        run(go())
    finally:
        second.stop()


def test_a_duplicate_is_dropped_a_skip_waits_for_its_replay_and_a_new_epoch_is_reported():
    """The client's own bookkeeping, fed frames directly: what a server bug or a lost pub/sub connection
    would look like on the wire. (Disconnected, a skip is repaired by the reconnect's `since`.)"""

    async def go():
        client = Client("wss://localhost:1/ws", lambda: "t")
        client._channels["c"] = False
        stream = client.messages("c")
        frames = [
            {"type": "subscribed", "channel": "c", "offset": 4, "epoch": "e1"},
            *({"type": "message", "channel": "c", "data": n, "offset": n, "epoch": "e1"} for n in (5, 6, 6, 5, 9)),
            {"type": "message", "channel": "c", "data": "new", "offset": 1, "epoch": "e2"},
        ]
        for frame in frames:
            client._route(None, frame)  # type: ignore[arg-type]  # no reply is matched: no connection needed
        got = []
        while not stream._queue.empty():
            got.append((await anext(stream))["data"])
        assert got == [5, 6, "new"]  # 6 and 5 again dropped; 9 too: 7 and 8 are to be replayed before it
        assert client.recovery_failures == 1  # the new epoch
        assert client._positions["c"] == (1, "e2")

    run(go())


# -- the whole protocol: calls, pushes, join/leave, history, presence, resume (SPEC §14) ------------------------



@pytest.fixture(scope="module")
def app_server(keydir: Path) -> Iterator[Server]:
    srv = AppServer(keydir, base_env(keydir), app="client_app:app").start()
    yield srv
    srv.stop()


def test_call_pushes_join_leave_history_and_presence(app_server, issue):
    channel = unique_channel()
    alice, bob = Tokens(issue, scope=ROOMS + " admin"), Tokens(issue, scope=ROOMS)
    pushed: list[Any] = []

    async def go():
        async with client_for(app_server, alice, on_push=pushed.append) as a, client_for(app_server, bob) as b:
            assert await a.call("add", {"a": 1, "b": 2}, timeout=5) == {"sum": 3, "sub": alice.sub, "role": None}
            with pytest.raises(RequestError) as info:
                await a.call("add", {"a": "one"})
            assert (info.value.code, info.value.message) == ("bad_numbers", "a and b must be integers")
            with pytest.raises(RequestError) as info:
                await b.call("admin.only")
            assert info.value.code == "forbidden"
            assert [await b.call("scarce"), await b.call("scarce")] == ["ok", "ok"]
            with pytest.raises(RateLimited) as limited:
                await b.call("scarce")
            assert limited.value.code == "rate_limited" and 1000 < limited.value.retry_after_ms <= 60_000
            # Pushes: an iterator of each push's data, and the callback; in order.
            pushes = a.pushes()
            await a.call("push.me", {"n": 1})
            await b.call("notify", {"sub": alice.sub, "data": {"n": 2}})
            assert [await asyncio.wait_for(anext(pushes), 5) for _ in range(2)] == [{"n": 1}, {"n": 2}]
            await wait_until(lambda: pushed == [{"n": 1}, {"n": 2}], 5, "on_push")
            # join/leave where asked for, through messages(channel), with the channel's messages.
            subscribed = await a.subscribe(channel, join_leave=True)
            assert subscribed["type"] == "subscribed" and subscribed["offset"] == 0
            frames = a.messages(channel)
            await b.subscribe(channel)
            join = await asyncio.wait_for(anext(frames), 5)
            assert (join["type"], join["channel"], join["sub"], join["connection_id"]) == ("join", channel, bob.sub, b.connection_id)
            published = await b.publish(channel, "hello")
            assert published["type"] == "published"
            message = await asyncio.wait_for(anext(frames), 5)
            assert (message["type"], message["from"], message["data"], message["offset"]) == ("message", bob.sub, "hello", 1)
            assert set((await a.presence(channel))["clients"]) == {a.connection_id, b.connection_id}
            history = await b.history(channel, limit=10)
            assert [m["data"] for m in history["messages"]] == ["hello"] and history["offset"] == 1
            assert (await b.history(channel, since={"offset": 1, "epoch": history["epoch"]}))["messages"] == []
            await b.unsubscribe(channel)
            leave = await asyncio.wait_for(anext(frames), 5)
            assert (leave["type"], leave["sub"]) == ("leave", bob.sub)
            assert a.position(channel) == {"offset": 1, "epoch": history["epoch"]}

    run(go())


RESUMER = """
import asyncio, json, os, ssl, sys
from secure_ws.client import Client

async def main() -> None:
    channel, token = sys.argv[1], os.environ["RESUME_TOKEN"]
    tls = ssl.create_default_context(cafile=sys.argv[3])
    async with Client(sys.argv[2], lambda: token, ssl=tls) as client:
        await client.subscribe(channel)
        stream = client.messages(channel)
        print("ready", flush=True)
        seen = [(await asyncio.wait_for(anext(stream), 10))["data"] for _ in range(2)]
        with open(sys.argv[4], "w") as saved:
            json.dump({"seen": seen, "position": client.position(channel)}, saved)

asyncio.run(main())
"""


def test_resume_from_a_position_saved_by_a_process_that_has_gone(app_server, issue, tmp_path):
    """A process reads two messages, saves its position and exits; messages are published meanwhile; a new process
    subscribes with that position and gets exactly what it missed, in order, then live ones."""
    channel = unique_channel()
    saved = tmp_path / "position.json"
    script = tmp_path / "resumer.py"
    script.write_text(RESUMER)

    async def go():
        async with client_for(app_server, Tokens(issue, scope=ROOMS)) as publisher:
            await publisher.publish(channel, "before")
            child = await asyncio.create_subprocess_exec(
                sys.executable, str(script), channel, app_server.url, str(app_server.keydir / "ca.crt"), str(saved),
                env={**os.environ, "RESUME_TOKEN": issue(scope=ROOMS)}, stdout=asyncio.subprocess.PIPE,
            )
            assert child.stdout is not None
            assert await asyncio.wait_for(child.stdout.readline(), 20) == b"ready\n"
            for n in (1, 2):
                await publisher.publish(channel, n)
            assert await asyncio.wait_for(child.wait(), 20) == 0  # gone
            state = json.loads(saved.read_text())
            assert state["seen"] == [1, 2] and state["position"]["offset"] == 3
            for n in (3, 4, 5):
                await publisher.publish(channel, n)
            async with client_for(app_server, Tokens(issue, scope=ROOMS)) as again:
                stream = again.messages(channel)
                reply = await again.subscribe(channel, since=state["position"])
                assert reply["recovered"] is True
                await publisher.publish(channel, 6)
                got = [await asyncio.wait_for(anext(stream), 5) for _ in range(4)]
                assert [(m["data"], m["offset"]) for m in got] == [(3, 4), (4, 5), (5, 6), (6, 7)]
                assert await again.echo("sync") == "sync" and stream._queue.empty()  # nothing twice
                assert again.recovery_failures == 0
            # A position from another epoch cannot be honoured: said so, then live messages only.
            failed: list[str] = []
            async with client_for(app_server, Tokens(issue, scope=ROOMS), on_recovery_failed=failed.append) as other:
                reply = await other.subscribe(channel, since={"offset": 1, "epoch": "not-this-one"})
                assert reply["recovered"] is False
                await wait_until(lambda: failed == [channel], 5, "on_recovery_failed")

    run(go())


def test_pushes_keep_coming_across_a_reconnect(app_server, issue):
    """A backend pushes to a sub every few ms while that sub's client is disconnected (1008 `disconnected`) and
    reconnects: one pushes() iterator sees them before and after, in order, none twice, and never ends. (Pushes sent
    while no connection is up are not kept: they are not history.)"""
    target = Tokens(issue)
    got: list[int] = []

    async def go():
        async with client_for(app_server, target) as client, client_for(app_server, Tokens(issue)) as backend:
            pushes = client.pushes()
            sending = True

            async def send_forever() -> None:
                n = 0
                while sending:
                    await backend.call("notify", {"sub": target.sub, "data": n})
                    n += 1
                    await asyncio.sleep(0.01)

            sender = asyncio.create_task(send_forever())

            async def read() -> None:
                async for n in pushes:
                    got.append(n)

            reader = asyncio.create_task(read())
            try:
                await wait_until(lambda: len(got) >= 5, 10, "pushes before the drop")
                first_id = client.connection_id
                await client.call("kick.me")
                await wait_until(lambda: client.connection_id not in (None, first_id), 10, "the reconnect")
                after = len(got)
                await wait_until(lambda: len(got) >= after + 5, 10, "pushes after the reconnect")
                assert client.connections == 2 and client.last_close == (1008, "disconnected")
                assert not reader.done()  # the iterator lives on across connections
            finally:
                sending = False
                await sender
                reader.cancel()
            assert got == sorted(set(got))  # in order, none twice

    run(go())


def test_stream_yields_chunks_and_leaving_the_loop_cancels(app_server, issue):
    async def go():
        async with client_for(app_server, Tokens(issue)) as client:
            tag = unique_sub("t")
            assert [c async for c in client.stream("count", {"to": 3, "tag": tag})] == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert await client.call("stream.end", tag) == "done"
            tag = unique_sub("t")
            async for chunk in client.stream("count", {"to": 10_000, "every": 0.01, "tag": tag}):
                if chunk["n"] == 2:
                    break
            deadline = time.monotonic() + 5
            while await client.call("stream.end", tag) != "closed":
                assert time.monotonic() < deadline, "the generator was not closed by the cancel"
                await asyncio.sleep(0.02)
            got: list[Any] = []
            with pytest.raises(RequestError) as info:
                async for chunk in client.stream("count", {"to": 2, "fail": True, "tag": unique_sub("t")}):
                    got.append(chunk)
            assert got == [{"n": 0}, {"n": 1}] and info.value.code == "stream_failed"
            assert await client.echo("after") == "after"

    run(go())


def test_stream_and_cancel_frames_on_the_protocol():
    """The client's side of a streamed call, fed frames directly (the server side is tested above when present):
    chunks in order, the result ends it, an error raises, leaving early sends one cancel, a full buffer makes the
    reader wait (backpressure), and frames for a call nobody waits for are ignored."""
    from secure_ws.client import Link, Protocol
    from secure_ws.client.inbox import MAX_CHUNKS

    async def go():
        sent: list[dict] = []

        async def send(text: str) -> None:
            sent.append(json.loads(text))

        async def close(code: int, reason: str) -> None:
            pass

        link = Link(send, close, {"type": "welcome", "sub": "s", "connection_id": "c", "expires_at": 1})
        protocol = Protocol()

        async def ready() -> Link:
            return link

        protocol._wait_ready = ready  # type: ignore[method-assign]

        async def feed(*frames: dict) -> None:
            await asyncio.sleep(0)  # the stream's request is out
            for frame in frames:
                wait = protocol._route(link, frame)
                assert wait is None

        stream = protocol.stream("job", {"x": 1})
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        id = sent[-1]["id"]
        assert sent[-1] == {"type": "job", "data": {"x": 1}, "id": id}
        await feed({"type": "chunk", "id": id, "seq": 0, "data": "a"})
        assert await task == "a"
        await feed({"type": "chunk", "id": id, "seq": 1, "data": "b"}, {"type": "result", "id": id, "data": {"chunks": 2}})
        assert [c async for c in stream] == ["b"]
        assert not any(f["type"] == "cancel" for f in sent) and link.pending == {}

        stream = protocol.stream("job")
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        id = sent[-1]["id"]
        await feed({"type": "chunk", "id": id, "seq": 0, "data": 0})
        assert await task == 0
        waits = [protocol._route(link, {"type": "chunk", "id": id, "seq": n, "data": n}) for n in range(1, MAX_CHUNKS + 1)]
        assert waits[:-1] == [None] * (MAX_CHUNKS - 1) and waits[-1] is not None  # full: the reader waits
        assert await stream.__anext__() == 1
        await asyncio.wait_for(waits[-1], 1)  # read one: room again
        await stream.aclose()  # leaving early
        assert sent[-1] == {"type": "cancel", "id": id} and link.pending == {}
        assert protocol._route(link, {"type": "error", "id": id, "code": "cancelled"}) is None  # its end: ignored
        assert protocol._route(link, {"type": "chunk", "id": id, "seq": 99, "data": 1}) is None

        stream = protocol.stream("job")
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        id = sent[-1]["id"]
        await feed({"type": "error", "id": id, "code": "timeout", "message": "too slow"})
        with pytest.raises(RequestError) as info:
            await task
        assert info.value.code == "timeout" and sent[-1]["type"] == "job"  # ended by the server: no cancel

    run(go())


# -- garbage from a server (SPEC §14): ignored as documented, or a clear error; never a hang -------------------


class Hostile:
    """A WebSocket server on loopback that says what a test makes it say (the input here is the server)."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.connections = 0

    async def __aenter__(self) -> str:
        from websockets.asyncio.server import serve

        async def handler(ws: Any) -> None:
            self.connections += 1
            await self.script(ws, self.connections)

        self.server = await serve(handler, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close()
        await self.server.wait_closed()


WELCOME = json.dumps({"type": "welcome", "sub": "s", "connection_id": "c", "expires_at": 4102444800, "rate_limit": "20/second"})


def test_garbage_frames_are_ignored_and_an_unknown_close_code_is_retried():
    async def script(ws: Any, nth: int) -> None:
        await ws.send(WELCOME)
        for garbage in ("not json", "[1, 2]", "null", '{"type": "mystery"}', '{"type": "result", "id": [1]}',
                        '{"type": "chunk", "id": 999, "seq": 0}', '{"type": "message", "channel": ["x"], "offset": "y"}',
                        '{"type": "error", "code": "forbidden", "channel": {"a": 1}}', '{"type": "join"}'):
            await ws.send(garbage)
        await ws.send(json.dumps({"type": "push", "data": nth}))
        request = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "pong", "id": request["id"]}))  # a call answered by something else
        await ws.close(4999, "something new")

    async def go():
        hostile = Hostile(script)
        async with hostile as url:
            client = Client(url, lambda: "t.t.t", allow_insecure=True, backoff_initial=0.01, backoff_max=0.05)
            async with client:
                pushes = client.pushes()
                with pytest.raises(ProtocolViolation):
                    await client.call("anything")
                assert await asyncio.wait_for(anext(pushes), 5) == 1
                assert await asyncio.wait_for(anext(pushes), 5) == 2  # the unknown close: reconnected
                assert client.last_close == (4999, "something new") and client.connections == 2

    run(go())


def test_a_server_that_does_not_welcome_is_a_clear_error_not_a_hang():
    async def script(ws: Any, nth: int) -> None:
        await ws.send("HTTP/1.1 200 OK, this is not a secure_ws server")
        await ws.wait_closed()

    async def go():
        hostile = Hostile(script)
        async with hostile as url:
            client = Client(url, lambda: "t.t.t", allow_insecure=True, backoff_initial=0.01, backoff_max=0.05)
            with pytest.raises(ProtocolViolation):
                await asyncio.wait_for(client.start(), 5)
            assert hostile.connections == 1  # not retried
            with pytest.raises(ProtocolViolation):
                await client.ping()
            await client.close()

    run(go())

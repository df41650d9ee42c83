"""SPEC §9 over the real wire: an application's handlers and hooks on uvicorn + TLS, with `websockets`.

The application is tests/apps/handlers_app.py; every behaviour has a message type there.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import AppServer, Server, assert_error, base_env, closed_with, recv_json, request, run, sans_position, unique_sub, welcome


@pytest.fixture(scope="module")
def app_server(keydir: Path) -> Any:
    srv = AppServer(keydir, base_env(keydir, SECURE_WS_HANDLER_TIMEOUT="1s", SECURE_WS_MAX_INFLIGHT="3")).start()
    yield srv
    srv.stop()


# -- results, rejects, faults --------------------------------------------------------------


def test_result_reject_and_publish(app_server: Server, issue: Any) -> None:
    sub = unique_sub()

    async def go() -> None:
        async with app_server.connect(issue(sub, scope=f"orders:write subscribe:user.{sub}")) as ws:
            await welcome(ws)
            assert (await request(ws, {"type": "subscribe", "channel": f"user.{sub}"}))["type"] == "subscribed"
            await ws.send(json.dumps({"type": "orders.create", "id": 7, "data": {"items": [1]}}))
            frames = [await recv_json(ws), await recv_json(ws)]
            frames = [sans_position(f) if f["type"] == "message" else f for f in frames]
            assert {"type": "result", "id": 7, "data": {"order_id": 42}} in frames
            assert {"type": "message", "channel": f"user.{sub}", "from": sub, "data": {"created": 42}} in frames
            reply = await request(ws, {"type": "orders.create", "id": "x", "data": {"items": []}})
            assert reply == {"type": "error", "id": "x", "code": "empty_order", "message": "an order needs items"}
            assert (await request(ws, {"type": "ping", "id": 1})) == {"type": "pong", "id": 1}  # still open

    run(go())


def test_faults_answer_internal_error_and_keep_the_connection(app_server: Server, issue: Any) -> None:
    async def go() -> None:
        async with app_server.connect(issue()) as ws:
            await welcome(ws)
            for kind in ("boom", "not.json", "surrogate"):
                reply = await request(ws, {"type": kind, "id": kind, "data": None})
                assert reply == {"type": "error", "id": kind, "code": "internal_error", "message": "internal error"}
            assert (await request(ws, {"type": "ping"}))["type"] == "pong"

    run(go())
    log = app_server.log()
    assert "handler boom raised" in log and "RuntimeError: handler bug with secret detail" in log  # traceback: log only
    assert "handler not.json raised" in log
    assert "handler surrogate raised" in log and "Task exception was never retrieved" not in log


def test_hanging_handler_times_out(app_server: Server, issue: Any) -> None:
    async def go() -> None:
        async with app_server.connect(issue()) as ws:
            await welcome(ws)
            reply = await request(ws, {"type": "hang", "id": 3}, timeout=10)
            assert_error(reply, "timeout", 3)
            assert (await request(ws, {"type": "ping"}))["type"] == "pong"

    run(go())


def test_each_hanging_call_times_out_on_its_own_deadline(app_server: Server, issue: Any) -> None:
    """Calls started one after another each get their own full timeout (1 s here), whatever answers between them."""

    async def go() -> None:
        async with app_server.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "hang", "id": 1}))
            first_sent = time.monotonic()
            assert (await request(ws, {"type": "whoami", "id": "w"}))["type"] == "result"  # answered between them
            second_sent = time.monotonic()
            await ws.send(json.dumps({"type": "hang", "id": 2}))
            first = await recv_json(ws, 10)
            first_at = time.monotonic()
            second = await recv_json(ws, 10)
            second_at = time.monotonic()
            assert_error(first, "timeout", 1)
            assert_error(second, "timeout", 2)
            assert first_at - first_sent >= 1.0 and second_at - second_sent >= 1.0
            assert (await request(ws, {"type": "ping"}))["type"] == "pong"

    run(go())


def test_unknown_type_and_malformed_requests(app_server: Server, issue: Any) -> None:
    async def go() -> None:
        async with app_server.connect(issue()) as ws:
            await welcome(ws)
            assert_error(await request(ws, {"type": "no.such.type", "id": 1}), "unknown_type", 1)
            assert_error(await request(ws, {"type": "x" * 5000}), "unknown_type")
            assert_error(await request(ws, '{"type": "whoami", "data": '), "bad_request")
            assert_error(await request(ws, {"type": "whoami", "id": [1]}), "bad_request")
            assert (await request(ws, {"type": "whoami", "id": 2}))["type"] == "result"  # data is optional

    run(go())


def test_pydantic_mismatch_names_fields_never_values(app_server: Server, issue: Any) -> None:
    async def go() -> None:
        async with app_server.connect(issue()) as ws:
            await welcome(ws)
            good = await request(ws, {"type": "orders.typed", "id": 1, "data": {"items": [{"sku": "a", "qty": 2}]}})
            assert good == {"type": "result", "id": 1, "data": {"items": 1, "qty": 2}}
            bad = await request(ws, {"type": "orders.typed", "id": 2, "data": {"items": [{"sku": "a", "qty": "SECRET-VALUE"}]}})
            assert_error(bad, "bad_request", 2)
            assert "items.0.qty" in bad["message"] and "SECRET-VALUE" not in bad["message"]
            missing = await request(ws, {"type": "orders.typed", "id": 3, "data": {"\u0007evil\n": 1}})
            assert_error(missing, "bad_request", 3)
            assert "items" in missing["message"] and "evil" not in missing["message"]
            assert_error(await request(ws, {"type": "orders.typed", "id": 4, "data": "nope"}), "bad_request", 4)

    run(go())


# -- scope, limits, concurrency --------------------------------------------------------------


def test_scope_is_required_exactly_or_by_pattern(app_server: Server, issue: Any) -> None:
    async def go() -> None:
        for scope, granted in (("orders:write", True), ("orders:*", True), ("*", True), ("orders:read", False), (None, False)):
            async with app_server.connect(issue(scope=scope)) as ws:
                await welcome(ws)
                reply = await request(ws, {"type": "orders.create", "id": 1, "data": {"items": []}})
                if granted:
                    assert_error(reply, "empty_order", 1)
                else:
                    assert_error(reply, "forbidden", 1)

    run(go())


def test_per_type_window_and_the_per_sub_window(app_server: Server, issue: Any) -> None:
    sub = unique_sub()

    async def go() -> None:
        async with app_server.connect(issue(sub, scope="orders:write")) as ws:
            await welcome(ws)
            for i in range(3):
                assert_error(await request(ws, {"type": "orders.create", "id": i, "data": {}}), "empty_order", i)
            limited = await request(ws, {"type": "orders.create", "id": 9, "data": {}})
            assert_error(limited, "rate_limited", 9)
            assert 0 < limited["retry_after_ms"] <= 60_000
            assert (await request(ws, {"type": "whoami"}))["type"] == "result"  # other types are not limited by it
        async with app_server.connect(issue(sub, scope="orders:write")) as ws:  # reconnecting does not refill it
            await welcome(ws)
            assert_error(await request(ws, {"type": "orders.create", "id": 10, "data": {}}), "rate_limited", 10)

    run(go())


def test_inflight_cap_answers_busy_and_replies_overtake(app_server: Server, issue: Any) -> None:
    async def go() -> None:
        async with app_server.connect(issue()) as ws, app_server.connect(issue()) as other:
            await welcome(ws)
            await welcome(other)
            for i in range(3):  # SECURE_WS_MAX_INFLIGHT=3 for this server
                await ws.send(json.dumps({"type": "hold", "id": i}))
            assert_error(await request(ws, {"type": "whoami", "id": "over"}), "busy", "over")
            assert (await request(ws, {"type": "ping", "id": "p"})) == {"type": "pong", "id": "p"}  # built-ins still answer
            assert (await request(other, {"type": "release"}))["data"] == "ok"
            results = {(await recv_json(ws))["id"] for _ in range(3)}
            assert results == {0, 1, 2}
            # A slow call does not hold up a fast one behind it: its reply overtakes.
            await ws.send(json.dumps({"type": "hold", "id": "slow"}))
            fast = await request(ws, {"type": "whoami", "id": "fast"})
            assert fast["id"] == "fast"
            await request(other, {"type": "release"})
            assert (await recv_json(ws)) == {"type": "result", "id": "slow", "data": "released"}

    run(go())


# -- context ---------------------------------------------------------------------------------


def test_context_fields_push_and_close(app_server: Server, issue: Any) -> None:
    sub = unique_sub()

    async def go() -> None:
        async with app_server.connect(issue(sub, scope="a b", tier="gold")) as ws:
            hello = await welcome(ws)
            me = (await request(ws, {"type": "whoami", "id": 1}))["data"]
            assert me == {"sub": sub, "scopes": ["a", "b"], "connection_id": hello["connection_id"],
                          "claims_writable": False, "tier": "gold"}
            await ws.send(json.dumps({"type": "push.me", "id": 2, "data": {"n": 1}}))
            assert await recv_json(ws) == {"type": "push", "data": {"n": 1}}
            assert await recv_json(ws) == {"type": "result", "id": 2, "data": "pushed"}
            await ws.send(json.dumps({"type": "bye"}))
            assert await closed_with(ws) == (1008, "disconnected")

    run(go())


def test_on_connect_refuses_fails_and_greets(app_server: Server, issue: Any) -> None:
    async def go() -> None:
        async with app_server.connect(issue(refuse=True)) as ws:
            assert await closed_with(ws) == (1008, "connection refused")  # no welcome before the close
        async with app_server.connect(issue(hook_fault=True)) as ws:
            assert await closed_with(ws) == (1011, "internal error")
        sub = unique_sub()
        async with app_server.connect(issue(sub, greet=True)) as ws:
            await welcome(ws)  # first, though on_connect pushed before it
            assert await recv_json(ws) == {"type": "push", "data": {"hello": sub}}
        async with app_server.connect(issue()) as ws:
            await welcome(ws)
            deadline = asyncio.get_running_loop().time() + 5
            while sub not in (await request(ws, {"type": "disconnects"}))["data"]:  # on_disconnect ran
                assert asyncio.get_running_loop().time() < deadline, "on_disconnect never ran"

    run(go())
    assert "on_connect is broken" in app_server.log()


def test_api_send_disconnect_publish_in_one_worker(app_server: Server, issue: Any) -> None:
    target = unique_sub()

    async def go() -> None:
        async with app_server.connect(issue(target, scope="subscribe:news")) as a, app_server.connect(issue(target)) as b, \
                app_server.connect(issue(scope="admin")) as admin:
            for ws in (a, b, admin):
                await welcome(ws)
            await request(a, {"type": "subscribe", "channel": "news"})
            assert (await request(admin, {"type": "admin.publish", "data": {"channel": "news", "data": 1}}))["data"] == "published"
            assert sans_position(await recv_json(a)) == {"type": "message", "channel": "news", "data": 1}  # no "from"
            assert (await request(admin, {"type": "admin.send", "data": {"sub": target, "data": "hi"}}))["data"] == "sent"
            assert await recv_json(a) == {"type": "push", "data": "hi"}
            assert await recv_json(b) == {"type": "push", "data": "hi"}
            await request(admin, {"type": "admin.disconnect", "data": {"sub": target}})
            assert await closed_with(a) == (1008, "disconnected")
            assert await closed_with(b) == (1008, "disconnected")
            assert (await request(admin, {"type": "ping"}))["type"] == "pong"  # others stay
        async with app_server.connect(issue(target)) as again:  # the client may reconnect
            await welcome(again)

    run(go())


# -- mounting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["starlette_host", "fastapi_host"])
def test_mounted_in_a_host_app(keydir: Path, issue: Any, host: str) -> None:
    srv = AppServer(keydir, base_env(keydir), app=f"mounted_app:{host}").start()
    try:
        status, _, body = srv.get("/")
        assert status == 200 and b"host" in body
        assert srv.get("/realtime/healthz")[0] == 200
        assert srv.get("/realtime/readyz")[0] == 200

        async def go() -> None:
            sub = unique_sub()
            async with srv.connect(issue(sub), path="/realtime/ws") as ws:
                await welcome(ws)
                assert (await request(ws, {"type": "hello", "id": 1})) == {"type": "result", "id": 1, "data": f"hello {sub}"}
                assert (await request(ws, {"type": "echo", "data": [1]})) == {"type": "echo", "data": [1]}

        run(go())
    finally:
        srv.stop()


def test_mounted_without_the_lifespan_refuses(keydir: Path, issue: Any) -> None:
    """Without the lifespan nothing watches revocations or keys: never fail open."""
    srv = AppServer(keydir, base_env(keydir), app="mounted_app:forgot_lifespan").start()
    try:
        assert srv.get("/realtime/readyz")[0] == 503

        async def go() -> None:
            async with srv.connect(issue(), path="/realtime/ws") as ws:
                assert await closed_with(ws) == (1013, "service unavailable")

        run(go())
        assert "lifespan has not run" in srv.log()
    finally:
        srv.stop()

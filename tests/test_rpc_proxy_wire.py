"""SPEC §9's RPC proxy over the real wire: a client's unhandled type reaches a real local backend and its
answer comes back as a result, an error, or `unavailable`; the backend never sees the client's token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Server, assert_error, base_env, request, run, unique_sub, welcome
from test_rpc_proxy import SECRET, Backend, running_backend


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with running_backend() as server:
        yield server


def proxied(keydir: Path, backend: Backend, path: str) -> Server:
    env = base_env(keydir, SECURE_WS_RPC_PROXY_URL=backend.url(path), SECURE_WS_RPC_PROXY_SECRET=SECRET.decode(), SECURE_WS_HANDLER_TIMEOUT="1s")
    return Server(keydir, env).start()


def test_answers_and_what_the_backend_sees(keydir: Path, backend: Backend, issue: Any) -> None:
    srv = proxied(keydir, backend, "/data")
    sub = unique_sub()
    token = issue(sub, scope="orders:write", tier="gold")
    try:
        async def go() -> dict[str, Any]:
            async with srv.connect(token) as ws:
                hello = await welcome(ws)
                reply = await request(ws, {"type": "orders.create", "id": 5, "data": {"items": [1]}})
                assert reply["type"] == "result" and reply["id"] == 5 and reply["data"]["echo"] == {"items": [1]}
                assert (await request(ws, {"type": "echo", "data": 1})) == {"type": "echo", "data": 1}  # built-ins stay ours
                assert_error(await request(ws, {"type": "bad type!"}), "unknown_type")  # never forwarded
                return hello

        hello = run(go())
    finally:
        srv.stop()
    assert len(backend.requests) == 1
    path, headers, body = backend.requests[0]
    assert headers["authorization"] == f"Bearer {SECRET.decode()}"
    sent = json.loads(body)
    assert sent["type"] == "orders.create" and sent["sub"] == sub and sent["connection_id"] == hello["connection_id"]
    assert sent["claims"]["tier"] == "gold" and sent["claims"]["scope"] == "orders:write"
    for part in token.split("."):
        assert part not in body.decode() and all(part not in v for v in headers.values())


@pytest.mark.parametrize("path", ["/fixed/500", "/fixed/text", "/hang"])
def test_backend_failures_are_unavailable(keydir: Path, backend: Backend, issue: Any, path: str) -> None:
    srv = proxied(keydir, backend, path)
    try:
        async def go() -> None:
            async with srv.connect(issue()) as ws:
                await welcome(ws)
                assert_error(await request(ws, {"type": "orders.create", "id": 1, "data": {}}, timeout=10), "unavailable", 1)
                assert (await request(ws, {"type": "ping"}))["type"] == "pong"

        run(go())
    finally:
        backend.end_test()
        srv.stop()


def test_backend_error_is_an_error_frame(keydir: Path, backend: Backend, issue: Any) -> None:
    srv = proxied(keydir, backend, "/error")
    try:
        async def go() -> None:
            async with srv.connect(issue()) as ws:
                await welcome(ws)
                reply = await request(ws, {"type": "orders.create", "id": 2, "data": {}})
                assert reply == {"type": "error", "id": 2, "code": "empty_order", "message": "an order needs items"}

        run(go())
    finally:
        srv.stop()


def test_a_backend_answer_no_utf8_can_carry_is_internal_error(keydir: Path, backend: Backend, issue: Any) -> None:
    """A lone surrogate (a JSON escape the backend may send) cannot go out as UTF-8: the call is answered
    internal_error, once, and the connection stays."""
    srv = proxied(keydir, backend, "/fixed/surrogate")
    try:
        async def go() -> None:
            async with srv.connect(issue()) as ws:
                await welcome(ws)
                reply = await request(ws, {"type": "orders.create", "id": 3, "data": {}})
                assert reply == {"type": "error", "id": 3, "code": "internal_error", "message": "internal error"}
                assert await request(ws, {"type": "ping", "id": 4}) == {"type": "pong", "id": 4}

        run(go())
        assert "Task exception was never retrieved" not in srv.log()
    finally:
        srv.stop()

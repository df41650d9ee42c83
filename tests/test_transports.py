"""SPEC §3 transports and §4 welcome, over real uvicorn + TLS with a real client."""

from __future__ import annotations

import pytest
from helpers import AppServer, base_env, closed_with, refusal, request, run, sans_position, unique_sub, welcome


@pytest.mark.parametrize("transport", ["header", "subprotocol", "query", "token"])
def test_each_transport_is_welcomed(server, issue, transport):
    sub = unique_sub()

    async def go():
        async with server.connect(issue(sub=sub), transport) as ws:
            hello = await welcome(ws)
            assert hello["sub"] == sub
            assert hello["rate_limit"] == "20/second"
            assert isinstance(hello["connection_id"], str) and hello["connection_id"]
            assert isinstance(hello["expires_at"], int)
            if transport == "subprotocol":
                assert ws.subprotocol == "secure-ws.v1"  # selected, the token never echoed
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}

    run(go())


def test_subprotocol_response_never_echoes_token(server, issue):
    token = issue()

    async def go():
        async with server.connect(token, "subprotocol") as ws:
            await welcome(ws)
            echoed = ws.response.headers.get_all("Sec-WebSocket-Protocol")
            assert echoed == ["secure-ws.v1"]
            assert token not in str(ws.response.headers)

    run(go())


def test_missing_token(server):
    assert run(refusal(server, None)) == (1008, "missing token")


def test_missing_token_with_only_our_subprotocol(server):
    async def go():
        async with server.connect(None, subprotocols=["secure-ws.v1"]) as ws:
            assert ws.subprotocol == "secure-ws.v1"  # so a browser reaches the close frame
            return await closed_with(ws)

    assert run(go()) == (1008, "missing token")


def test_two_different_tokens_are_ambiguous(server, issue):
    a, b = issue(), issue()
    code = run(refusal(server, a, "header", query=f"access_token={b}"))
    assert code == (1008, "ambiguous credentials")
    code = run(refusal(server, a, "subprotocol", headers={"Authorization": f"Bearer {b}"}))
    assert code == (1008, "ambiguous credentials")
    code = run(refusal(server, None, query=f"access_token={a}&token={b}"))
    assert code == (1008, "ambiguous credentials")


def test_same_token_twice_is_fine(server, issue):
    token = issue()

    async def go():
        async with server.connect(token, "header", query=f"access_token={token}") as ws:
            await welcome(ws)

    run(go())


def test_other_websocket_paths_are_refused(server, issue):
    import websockets

    async def go():
        with pytest.raises(websockets.InvalidStatus) as info:
            async with server.connect(issue(), path="/other"):
                pass
        assert info.value.response.status_code == 404

    run(go())


# -- any ASGI WebSocket server, not only ours ---------------------------------------------------------


def test_the_protocol_holds_on_another_asgi_websocket_server(make_server, issue):
    """secure_ws.main installs its own WebSocket protocol for uvicorn's default; with ``--ws websockets``
    the session runs as a plain ASGI app (every reply through ASGI ``send``), with the same answers."""
    legacy = make_server(("--ws", "websockets"), SECURE_WS_MAX_MESSAGE_BYTES="1024")
    rooms = "subscribe:room.* publish:room.*"

    async def go():
        async with legacy.connect(issue(scope=rooms)) as ws:
            await welcome(ws)
            assert await request(ws, {"type": "echo", "data": [1, "é"], "id": 7}) == {
                "type": "echo", "data": [1, "é"], "id": 7,
            }
            assert (await request(ws, {"type": "nope"}))["code"] == "unknown_type"
            assert sans_position(await request(ws, {"type": "subscribe", "channel": "room.1"})) == {
                "type": "subscribed", "channel": "room.1",
            }
            assert await request(ws, {"type": "publish", "channel": "room.1", "data": 1}) == {
                "type": "published", "channel": "room.1",
            }
            assert (await request(ws, {"type": "ping"}))["type"] == "message"  # our own publication, then…
            assert (await request(ws, {"type": "ping"})) == {"type": "pong"}
        async with legacy.connect(issue()) as ws:
            await welcome(ws)
            await ws.send("x" * 1025)
            assert await closed_with(ws) == (1009, "message too big")
        async with legacy.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(b"\x00")
            assert (await closed_with(ws))[0] == 1003

    run(go())


def test_an_untested_uvicorn_version_falls_back_to_uvicorns_own_protocols(keydir, issue):
    """The pin (pyproject) matches the uvicorn versions the suite ran on; on any other version secure_ws says
    so once and leaves uvicorn's own protocol classes in place, with the same answers on the wire."""
    srv = AppServer(keydir, base_env(keydir, SECURE_WS_MAX_MESSAGE_BYTES="1024"), app="untested_uvicorn_app:app").start()
    try:

        async def go():
            async with srv.connect(issue()) as ws:
                await welcome(ws)
                assert await request(ws, {"type": "echo", "data": "é", "id": 1}) == {"type": "echo", "data": "é", "id": 1}
                await ws.send("x" * 1025)
                assert await closed_with(ws) == (1009, "message too big")
            assert await refusal(srv, "not.a.token") == (1008, "invalid token")

        run(go())
        log = srv.log()
        assert log.count("uvicorn 0.999.0 is not one secure_ws's protocols were tested with: using uvicorn's own") == 1, log
        assert "Traceback" not in log
    finally:
        srv.stop()

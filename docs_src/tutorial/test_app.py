"""The tutorial's tests: the application in process, through the real handshake, scopes and channels."""

import pytest

from secure_ws.client import RequestError
from secure_ws.testing import TestServer

from app import api  # app.py, next to this file


async def test_a_note_reaches_the_board() -> None:
    async with TestServer(api) as server:  # memory storage, its own fresh key, no TLS or port
        async with server.connect(sub="alice", scope="notes:write subscribe:notes.*") as ws:
            assert await anext(ws.pushes()) == {"hello": "alice"}
            await ws.subscribe("notes.board")
            board = ws.messages("notes.board")
            assert (await ws.call("notes.add", {"text": "buy milk"}))["saved"] is True
            assert (await anext(board))["data"] == {"text": "buy milk"}


async def test_a_bad_note_is_rejected_and_a_missing_scope_forbidden() -> None:
    async with TestServer(api) as server:
        async with server.connect(sub="alice", scope="notes:write") as ws:
            with pytest.raises(RequestError) as error:
                await ws.call("notes.add", {"text": ""})
            assert error.value.code == "bad_note"
        async with server.connect(sub="bob") as ws:
            with pytest.raises(RequestError) as error:
                await ws.call("notes.add", {"text": "hi"})
            assert error.value.code == "forbidden"


async def test_the_countdown_streams() -> None:
    async with TestServer(api) as server:
        async with server.connect(sub="alice") as ws:
            assert [chunk async for chunk in ws.stream("notes.countdown", {"from": 3})] == [{"n": 3}, {"n": 2}, {"n": 1}]

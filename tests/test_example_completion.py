"""The streaming example (examples/completion/app.py) over the real wire, served as the README documents it:
``secure-ws serve examples.completion.app:api`` from the repository root (here: ``--app-dir``-like PYTHONPATH,
the key directory being the working directory), TLS, the real `websockets` client.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, ServeApp, Server, assert_error, base_env, recv_json, request, run, unique_sub, welcome
from test_streams import until_terminal

AI = "ai:use"


@pytest.fixture(scope="module")
def completion(keydir: Path) -> Any:
    srv = ServeApp(keydir, base_env(keydir), app="examples.completion.app:api", app_dir=ROOT).start()
    yield srv
    srv.stop()


async def usage(ws: Any) -> dict[str, int]:
    reply = await request(ws, {"type": "ai.usage", "id": "u"})
    while reply.get("id") != "u":
        reply = await recv_json(ws)
    return reply["data"]


def test_a_completion_streams_word_by_word(completion: Server, issue: Any) -> None:
    async def go() -> None:
        async with completion.connect(issue(unique_sub(), scope=AI)) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "ai.complete", "id": 1, "data": {"prompt": "tell me about streams", "max_words": 5}}))
            chunks, end = await until_terminal(ws, 1)
            assert "".join(c["text"] for c in chunks) == "Streams carry an answer to"
            assert end == {"type": "result", "id": 1, "data": {"chunks": 5}}

    run(go())


def test_cancel_stops_the_model(completion: Server, issue: Any) -> None:
    async def go() -> None:
        async with completion.connect(issue(unique_sub(), scope=AI)) as ws:
            await welcome(ws)
            before = await usage(ws)
            await ws.send(json.dumps({"type": "ai.complete", "id": "c", "data": {"prompt": "go on", "max_words": 10_000}}))
            assert (await recv_json(ws))["data"] == {"text": "Streams"}
            await ws.send(json.dumps({"type": "cancel", "id": "c"}))
            frame = await recv_json(ws)
            while frame["type"] == "chunk":
                frame = await recv_json(ws)
            assert frame == {"type": "error", "id": "c", "code": "cancelled", "message": "cancelled"}
            after = await usage(ws)
            assert after["cancelled"] == before["cancelled"] + 1 and after["words"] - before["words"] < 10_000
            # stopped: no word is generated any more
            assert (await usage(ws))["words"] == after["words"]

    run(go())


def test_refusals_scope_and_bad_prompts(completion: Server, issue: Any) -> None:
    async def go() -> None:
        async with completion.connect(issue(unique_sub(), scope=AI)) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "ai.complete", "id": 1, "data": {"prompt": "forbidden topic"}}))
            assert await until_terminal(ws, 1) == ([], {"type": "error", "id": 1, "code": "refused", "message": "the model will not answer that"})
            bad = await request(ws, {"type": "ai.complete", "id": 2, "data": {"prompt": "", "max_words": 0}})
            assert_error(bad, "bad_request", 2)
            assert "prompt" in bad["message"] and "max_words" in bad["message"]
            assert_error(await request(ws, {"type": "ai.complete", "data": {"prompt": "hi"}}), "bad_request")  # no id
        async with completion.connect(issue(unique_sub())) as ws:
            await welcome(ws)
            assert_error(await request(ws, {"type": "ai.complete", "id": 3, "data": {"prompt": "hi"}}), "forbidden", 3)

    run(go())


# -- the same application in process, as its own test suite would drive it (secure_ws.testing) ----------------------


def test_in_process_a_completion_streams_and_leaving_the_loop_cancels_it() -> None:
    from examples.completion.app import TEXT, api
    from secure_ws.testing import TestServer

    async def go() -> None:
        async with TestServer(api) as server:
            async with server.connect(sub=unique_sub(), scope=AI) as ws:
                words = [chunk["text"] async for chunk in ws.stream("ai.complete", {"prompt": "hi", "max_words": 4})]
                assert "".join(words) == " ".join(TEXT[:4])
                before = await ws.call("ai.usage")
                async for _ in ws.stream("ai.complete", {"prompt": "hi", "max_words": 10_000}):
                    break  # leaving the loop sends cancel: the generator's finally counts it
                for _ in range(200):
                    now = await ws.call("ai.usage")
                    if now["cancelled"] > before["cancelled"]:
                        break
                assert now["cancelled"] == before["cancelled"] + 1
                assert now["words"] < before["words"] + 100  # stopped, not run to its 10,000 words

    run(go())


def test_in_process_refusals_scope_and_bad_prompts() -> None:
    from examples.completion.app import api
    from secure_ws.client import RequestError
    from secure_ws.testing import TestServer

    async def code_of(ws: Any, data: Any) -> str:
        with pytest.raises(RequestError) as info:
            async for _ in ws.stream("ai.complete", data):
                pass
        return info.value.code

    async def go() -> None:
        async with TestServer(api) as server:
            async with server.connect(sub=unique_sub(), scope=AI) as ws:
                assert await code_of(ws, {"prompt": "forbidden topic"}) == "refused"
                assert await code_of(ws, {"prompt": ""}) == "bad_request"
                assert await code_of(ws, {"prompt": "hi", "max_words": 0}) == "bad_request"
            async with server.connect(sub=unique_sub(), scope="subscribe:*") as ws:
                assert await code_of(ws, {"prompt": "hi"}) == "forbidden"

    run(go())

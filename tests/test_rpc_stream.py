"""The RPC proxy's streamed answers (``application/x-ndjson``) over the real wire: a client on ``websockets``, the
server under uvicorn and under ``secure-ws serve`` (TLS), and a real HTTP/1.1 backend on 127.0.0.1 (a plain
asyncio server in a thread, so that a test sees exactly what the backend could write and when its connection
closed).

The message's ``type`` chooses the backend's behaviour (``nd.*``); its ``data`` carries the parameters and the
tag under which the backend records what happened.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Serve, Server, assert_error, base_env, recv_json, request, run, unique_sub, wait_until, welcome
from test_streams import nothing_for, until_terminal

SECRET = "rpc-stream-secret-0123456789abcdef-0123456789"
LINE_LIMIT = 65536  # SECURE_WS_MAX_MESSAGE_BYTES, the bound on one NDJSON line


class NdjsonBackend:
    """An HTTP/1.1 backend that answers each POST with a chunked NDJSON body (or plain JSON for ``plain``)."""

    def __init__(self) -> None:
        self.written: dict[str, int] = {}  # tag → lines written (and drained into the socket) so far
        self.closed: set[str] = set()  # tags whose connection the proxy closed while lines were still owed
        self.loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        ready = threading.Event()

        async def main() -> None:
            self.server = await asyncio.start_server(self.serve, sock=sock)
            ready.set()
            try:
                await self.server.serve_forever()
            except asyncio.CancelledError:  # stop()
                pass

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.thread.join(10)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)  # little kernel slack
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(h.split(b":")[1]) for h in head.lower().split(b"\r\n") if h.startswith(b"content-length:"))
                body = json.loads(await reader.readexactly(length))
                if not await self.answer(body["type"], body["data"], reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def answer(self, kind: str, data: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Write the answer to one request; False when the connection must end after it."""
        if kind == "plain":
            body = json.dumps({"data": data}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")

        async def send(raw: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            await writer.drain()

        tag = data.get("tag", "") if isinstance(data, dict) else ""
        if kind == "nd.lines":
            for i in range(data["n"]):
                await send(b'{"data":%d}\n' % i)
        elif kind == "nd.blank":  # blank lines skipped, the last line without its newline, lines split across writes
            await send(b'{"data":"a"}\n\n  \n{"da')
            await send(b'ta":"b"}\n{"data":"c"}')
        elif kind == "nd.error":
            await send(b'{"data":"first"}\n{"error":{"code":"sold_out","message":"no more"}}\n{"data":"never sent on"}\n')
        elif kind == "nd.garbage":
            await send(b'{"data":1}\nthis is not json\n{"data":2}\n')
        elif kind == "nd.shape":
            await send(b'{"data":1}\n[1,2]\n')
        elif kind == "nd.long":
            await send(b'{"data":1}\n{"data":"' + b"x" * LINE_LIMIT + b'"}\n')
        elif kind == "nd.endless.line":  # one line that never ends: refused once past the bound
            await send(b'{"data":"')
            for _ in range(100):
                await send(b"x" * 8192)
        elif kind == "nd.dies":
            await send(b'{"data":1}\n{"data":2}\n')
            writer.transport.abort()  # no terminating chunk: the body breaks off
            return False
        elif kind == "nd.flood":
            line = b'{"data":"' + b"y" * data["size"] + b'"}\n'
            self.written[tag] = 0
            try:
                for _ in range(data["n"]):
                    await send(line)
                    self.written[tag] += 1
            except ConnectionError:
                self.closed.add(tag)
                return False
        elif kind == "nd.hold":  # one line, then nothing: only the proxy closing the connection ends it
            try:
                await send(b'{"data":"ready"}\n')
                self.written[tag] = 1
                closed = await reader.read(1) == b""
            except ConnectionError:  # closed before the line was out
                closed = True
            if closed:
                self.closed.add(tag)
            return False
        await send(b"")  # the terminating chunk
        return True


@pytest.fixture(scope="module")
def backend() -> Iterator[NdjsonBackend]:
    ndjson = NdjsonBackend()
    yield ndjson
    ndjson.stop()


@pytest.fixture(scope="module", params=["uvicorn", "serve"])
def proxied(request: pytest.FixtureRequest, keydir: Path, backend: NdjsonBackend) -> Iterator[Server]:
    env = base_env(
        keydir, SECURE_WS_RPC_PROXY_URL=f"http://127.0.0.1:{backend.port}/rpc", SECURE_WS_RPC_PROXY_SECRET=SECRET,
        SECURE_WS_HANDLER_TIMEOUT="5s", SECURE_WS_MAX_MESSAGE_BYTES=str(LINE_LIMIT),
    )
    srv = (Server if request.param == "uvicorn" else Serve)(keydir, env).start()
    yield srv
    srv.stop()


def call_stream(proxied: Server, issue: Any, kind: str, data: Any = None) -> tuple[list[Any], dict[str, Any]]:
    async def go() -> tuple[list[Any], dict[str, Any]]:
        async with proxied.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": kind, "id": 1, "data": data}))
            answer = await until_terminal(ws, 1)
            await nothing_for(ws, 1, 0.1)
            return answer

    result: tuple[list[Any], dict[str, Any]] = run(go())
    return result


def test_lines_become_chunks_then_one_result(proxied: Server, issue: Any) -> None:
    chunks, end = call_stream(proxied, issue, "nd.lines", {"n": 50})
    assert chunks == list(range(50)) and end == {"type": "result", "id": 1, "data": {"chunks": 50}}
    chunks, end = call_stream(proxied, issue, "nd.blank")
    assert chunks == ["a", "b", "c"] and end["data"] == {"chunks": 3}
    chunks, end = call_stream(proxied, issue, "plain", {"x": 1})  # a plain JSON answer on the same pool: one result
    assert chunks == [] and end == {"type": "result", "id": 1, "data": {"x": 1}}


def test_an_error_line_ends_the_call_with_its_code(proxied: Server, issue: Any) -> None:
    chunks, end = call_stream(proxied, issue, "nd.error")
    assert chunks == ["first"] and end == {"type": "error", "id": 1, "code": "sold_out", "message": "no more"}


@pytest.mark.parametrize("kind", ["nd.garbage", "nd.shape", "nd.long", "nd.endless.line", "nd.dies"])
def test_a_bad_or_broken_body_gives_its_chunks_then_unavailable(proxied: Server, issue: Any, kind: str) -> None:
    chunks, end = call_stream(proxied, issue, kind)
    assert chunks == ([1, 2] if kind == "nd.dies" else [] if kind == "nd.endless.line" else [1])
    assert_error(end, "unavailable", 1)


def test_a_streamed_answer_to_a_call_without_id_is_bad_request(proxied: Server, issue: Any, backend: NdjsonBackend) -> None:
    tag = unique_sub("noid")

    async def go() -> None:
        async with proxied.connect(issue()) as ws:
            await welcome(ws)
            assert_error(await request(ws, {"type": "nd.hold", "data": {"tag": tag}}), "bad_request")
            await wait_until(lambda: tag in backend.closed, 5, "the backend's connection closed")

    run(go())


def test_cancel_closes_the_backend_connection(proxied: Server, issue: Any, backend: NdjsonBackend) -> None:
    tag = unique_sub("hold")

    async def go() -> None:
        async with proxied.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "nd.hold", "id": "h", "data": {"tag": tag}}))
            assert (await recv_json(ws)) == {"type": "chunk", "id": "h", "seq": 0, "data": "ready"}
            assert tag not in backend.closed
            await ws.send(json.dumps({"type": "cancel", "id": "h"}))
            assert_error((await until_terminal(ws, "h"))[1], "cancelled", "h")
            await wait_until(lambda: tag in backend.closed, 5, "the backend's connection closed")

    run(go())


def test_a_slow_client_pauses_the_backend_read(proxied: Server, issue: Any, backend: NdjsonBackend) -> None:
    tag, n = unique_sub("flood"), 20000  # 20000 lines of 16 KiB: 320 MiB on offer

    async def go() -> None:
        async with proxied.connect(issue()) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "nd.flood", "id": 1, "data": {"tag": tag, "size": 16384, "n": n}}))
            seen: list[int] = []

            def paused() -> bool:
                seen.append(backend.written.get(tag, 0))
                return len(seen) >= 6 and seen[-6] == seen[-1] > 0

            await wait_until(paused, 20, "the backend stopped being read", every=0.1)
            assert seen[-1] < n / 4, seen
            for seq in range(300):  # reading again resumes the backend
                frame = await recv_json(ws)
                assert frame["type"] == "chunk" and frame["seq"] == seq
            await wait_until(lambda: backend.written[tag] > seen[-1], 10, "the backend read again")
            await ws.send(json.dumps({"type": "cancel", "id": 1}))
            _, end = await until_terminal(ws, 1, timeout=30, seq=300)
            assert_error(end, "cancelled", 1)
            await wait_until(lambda: tag in backend.closed, 10, "the backend's connection closed")

    run(go())

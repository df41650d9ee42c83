"""The RPC proxy (SPEC §9) against a real HTTP backend: uvicorn on 127.0.0.1, an ephemeral port, in a thread.

Each route plays one backend behaviour: an answer, an application error, a failure, a malformed or oversized
body, a hang, a drip. Hanging routes wait on an event the fixture sets when the test ends, so nothing outlives
its test and no test sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from secure_ws.core.reject import Reject
from secure_ws.core.rpc_proxy import ProxyUnavailable, RpcProxy

SECRET = b"proxy-secret-0123456789abcdef-0123456789"
CLAIMS = {"iss": "secure-ws", "aud": "secure-ws", "sub": "alice", "scope": "orders:write", "iat": 1700000000, "exp": 1700000900, "jti": "j-1"}
HEADERS_SENT = {"host", "accept", "accept-encoding", "connection", "user-agent", "content-length", "content-type", "authorization"}


class Backend:
    """A Starlette app served by uvicorn in its own thread and event loop."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.client_ports: list[int] = []
        self.hang_ended = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        self.app = Starlette(routes=[
            Route("/data", self.data, methods=["POST"]),
            Route("/error", self.error, methods=["POST"]),
            Route("/fixed/{name}", self.fixed, methods=["POST"]),
            Route("/redirect", lambda request: RedirectResponse("/data", status_code=307), methods=["POST"]),
            Route("/endless", self.endless, methods=["POST"]),
            Route("/drip", self.drip, methods=["POST"]),
            Route("/hang", self.hang, methods=["POST"]),
        ])

    # -- routes ------------------------------------------------------------------------------

    async def _record(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        self.requests.append((request.url.path, dict(request.headers), body))
        assert request.client is not None
        self.client_ports.append(request.client.port)
        return json.loads(body)

    async def data(self, request: Request) -> Response:
        sent = await self._record(request)
        return JSONResponse({"data": {"echo": sent["data"], "port": request.client.port if request.client else None}})

    async def error(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"error": {"code": "empty_order", "message": "an order needs items"}})

    FIXED: dict[str, tuple[int, bytes, dict[str, str]]] = {
        "500": (500, b'{"data": "ignored on a 500"}', {}),
        "404": (404, b'{"error": {"code": "nope", "message": "not honoured on a 404"}}', {}),
        "text": (200, b"hello, not json", {"content-type": "text/plain"}),
        "empty": (200, b"", {}),
        "array": (200, b'[{"data": 1}]', {}),
        "string": (200, b'"data"', {}),
        "nan": (200, b'{"data": NaN}', {}),
        "infinity": (200, b'{"data": -Infinity}', {}),
        "not-utf8": (200, b'{"data": "\xff\xfe"}', {}),
        "deep": (200, b"[" * 100_000 + b"]" * 100_000, {}),
        "neither": (200, b'{"result": 1}', {}),
        "both": (200, b'{"data": 1, "error": {"code": "x", "message": "y"}}', {}),
        "null-data": (200, b'{"data": null}', {}),
        "error-no-message": (200, b'{"error": {"code": "gone"}}', {}),
        "error-bad-code": (200, b'{"error": {"code": "Bad Code!", "message": "m"}}', {}),
        "error-int-code": (200, b'{"error": {"code": 7, "message": "m"}}', {}),
        "error-int-message": (200, b'{"error": {"code": "ok_code", "message": 7}}', {}),
        "error-not-object": (200, b'{"error": "boom"}', {}),
        "big": (200, b'{"data": "' + b"x" * 4096 + b'"}', {}),
        "surrogate": (200, b'{"data": "a\\ud800b"}', {}),  # a JSON escape of a lone surrogate
        "gzip": (200, gzip.compress(b'{"data": 1}'), {"content-encoding": "gzip"}),
    }

    async def fixed(self, request: Request) -> Response:
        await self._record(request)
        status, body, headers = self.FIXED[request.path_params["name"]]
        return Response(body, status_code=status, headers=headers, media_type=headers.get("content-type", "application/json"))

    async def endless(self, request: Request) -> Response:
        """Chunked (no content-length), valid JSON whitespace for as long as anyone reads, up to 64 MiB."""
        await self._record(request)
        release = self.release_event()

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(1024):
                if release.is_set():
                    return
                yield b" " * 65536
                await asyncio.sleep(0)

        return StreamingResponse(chunks(), media_type="application/json")

    async def drip(self, request: Request) -> Response:
        """A byte every 50 ms: no single read waits long, but the answer never completes."""
        await self._record(request)
        release = self.release_event()

        async def chunks() -> AsyncIterator[bytes]:
            while not release.is_set():
                yield b" "
                try:
                    await asyncio.wait_for(release.wait(), 0.05)
                except TimeoutError:
                    pass

        return StreamingResponse(chunks(), media_type="application/json")

    async def hang(self, request: Request) -> Response:
        await self._record(request)
        try:
            await self.release_event().wait()
            return JSONResponse({"data": "too late"})
        finally:
            self.hang_ended.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def release_event(self) -> asyncio.Event:
        assert self._release is not None
        return self._release

    def start(self) -> None:
        # Bound and listening before the thread starts: connections queue in the backlog until uvicorn accepts.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, lifespan="off", log_level="warning"))
        ready = threading.Event()

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._release = asyncio.Event()
            ready.set()
            await self.server.serve(sockets=[sock])

        self.thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def end_test(self) -> None:
        """Let every hanging route of this test finish, and arm a fresh event for the next test."""
        assert self.loop is not None

        def rearm() -> None:
            self.release_event().set()
            self._release = asyncio.Event()

        self.loop.call_soon_threadsafe(rearm)
        self.requests.clear()
        self.client_ports.clear()

    def stop(self) -> None:
        self.end_test()
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def running_backend() -> Iterator[Backend]:
    backend = Backend()
    backend.start()
    try:
        yield backend
    finally:
        backend.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[Backend]:
    with running_backend() as backend:
        yield backend


@pytest.fixture
def backend(server: Backend) -> Iterator[Backend]:
    yield server
    server.end_test()


async def _calls(url: str, n: int = 1, timeout: float = 2.0, max_bytes: int = 1 << 20, data: Any = None, concurrent: bool = False) -> list[Any]:
    proxy = RpcProxy(url, SECRET, timeout, max_bytes)
    await proxy.start()
    try:
        one = lambda i: proxy.call("order.create", data if data is not None else {"n": i}, "alice", f"conn-{i}", CLAIMS)  # noqa: E731
        if concurrent:
            return list(await asyncio.gather(*(one(i) for i in range(n))))
        return [await one(i) for i in range(n)]
    finally:
        await proxy.close()


def call(url: str, **kwargs: Any) -> Any:
    return asyncio.run(_calls(url, **kwargs))[0]


def unavailable(url: str, **kwargs: Any) -> str:
    with pytest.raises(ProxyUnavailable) as info:
        call(url, **kwargs)
    message = str(info.value)
    assert SECRET.decode() not in message and "Bearer" not in message
    return message


# -- answers ---------------------------------------------------------------------------------


def test_data_is_returned(backend: Backend) -> None:
    assert call(backend.url("/data"), data={"items": [1, 2]})["echo"] == {"items": [1, 2]}


def test_null_data_is_an_answer(backend: Backend) -> None:
    assert call(backend.url("/fixed/null-data")) is None


def test_error_becomes_reject(backend: Backend) -> None:
    with pytest.raises(Reject) as info:
        call(backend.url("/error"))
    assert (info.value.code, info.value.message) == ("empty_order", "an order needs items")


def test_error_without_message(backend: Backend) -> None:
    with pytest.raises(Reject) as info:
        call(backend.url("/fixed/error-no-message"))
    assert (info.value.code, info.value.message) == ("gone", "")


def test_request_carries_the_secret_and_the_fields_and_no_token(backend: Backend) -> None:
    call(backend.url("/data"), data={"qty": 3})
    [(path, headers, raw)] = backend.requests
    assert headers["authorization"] == "Bearer " + SECRET.decode()
    assert headers["content-type"] == "application/json"
    assert set(headers) <= HEADERS_SENT, set(headers) - HEADERS_SENT
    body = json.loads(raw)
    assert body == {"type": "order.create", "data": {"qty": 3}, "sub": "alice", "connection_id": "conn-0", "claims": CLAIMS}
    # Claims, never a token: nothing JWT-shaped, no token-named field, the secret only in its header.
    for text in (raw.decode(), *(v for k, v in headers.items() if k != "authorization")):
        assert "eyJ" not in text and "token" not in text.lower() and SECRET.decode() not in text


def test_data_orjson_refuses_is_still_sent(backend: Backend) -> None:
    huge = 2**80  # valid JSON a client may send; orjson does not encode it, the stdlib does
    assert call(backend.url("/data"), data={"n": huge})["echo"] == {"n": huge}


# -- unusable answers ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["500", "404"])
def test_non_2xx_is_unavailable(backend: Backend, name: str) -> None:
    assert f"status {name}" in unavailable(backend.url(f"/fixed/{name}"))


def test_redirect_is_not_followed(backend: Backend) -> None:
    assert "status 307" in unavailable(backend.url("/redirect"))
    assert [path for path, _, _ in backend.requests] == []  # /data was never reached


@pytest.mark.parametrize("name", ["text", "empty", "nan", "infinity", "not-utf8", "deep"])
def test_non_json_is_unavailable(backend: Backend, name: str) -> None:
    assert "not JSON" in unavailable(backend.url(f"/fixed/{name}"))


@pytest.mark.parametrize("name", ["array", "string"])
def test_json_not_an_object_is_unavailable(backend: Backend, name: str) -> None:
    assert "not a JSON object" in unavailable(backend.url(f"/fixed/{name}"))


@pytest.mark.parametrize("name", ["neither", "both", "error-bad-code", "error-int-code", "error-int-message", "error-not-object"])
def test_bad_body_is_unavailable(backend: Backend, name: str) -> None:
    unavailable(backend.url(f"/fixed/{name}"))


def test_too_large_declared_body_is_unavailable(backend: Backend) -> None:
    assert "body over 1024 bytes" in unavailable(backend.url("/fixed/big"), max_bytes=1024)
    assert call(backend.url("/fixed/big"), max_bytes=8192) == "x" * 4096


def test_endless_body_stops_being_read(backend: Backend) -> None:
    """Chunked, no length, 64 MiB on offer: refused once past the bound, well within the timeout."""
    started = time.monotonic()
    assert "body over 131072 bytes" in unavailable(backend.url("/endless"), max_bytes=128 * 1024, timeout=5.0)
    assert time.monotonic() - started < 4.0


def test_compressed_body_is_refused(backend: Backend) -> None:
    assert "compressed" in unavailable(backend.url("/fixed/gzip"))
    [(_, headers, _)] = backend.requests
    assert headers["accept-encoding"] == "identity"


def test_hang_is_unavailable_within_the_timeout(backend: Backend) -> None:
    started = time.monotonic()
    unavailable(backend.url("/hang"), timeout=0.5)
    assert 0.4 < time.monotonic() - started < 2.0
    assert not backend.hang_ended.is_set()
    backend.end_test()
    assert backend.hang_ended.wait(5), "the hanging route did not end with its test"


def test_drip_is_cut_by_the_whole_call_timeout(backend: Backend) -> None:
    """Each read returns within 50 ms, so only the bound on the whole call ends it."""
    started = time.monotonic()
    assert "no answer within 0.5s" in unavailable(backend.url("/drip"), timeout=0.5)
    assert time.monotonic() - started < 2.0


def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "ConnectError" in unavailable(f"http://127.0.0.1:{port}/data")


# -- the pool --------------------------------------------------------------------------------


def test_sequential_calls_reuse_one_connection(backend: Backend) -> None:
    answers = asyncio.run(_calls(backend.url("/data"), n=5))
    assert [a["echo"] for a in answers] == [{"n": i} for i in range(5)]
    assert len(set(backend.client_ports)) == 1, backend.client_ports


def test_concurrent_calls_share_the_pool(backend: Backend) -> None:
    answers = asyncio.run(_calls(backend.url("/data"), n=30, concurrent=True))
    assert sorted(a["echo"]["n"] for a in answers) == list(range(30))
    assert 1 <= len(set(backend.client_ports)) <= 30


def test_call_before_start_and_close_twice() -> None:
    async def go() -> None:
        proxy = RpcProxy("http://127.0.0.1:9/", SECRET, 1.0)
        with pytest.raises(RuntimeError):
            await proxy.call("t", None, "s", "c", {})
        await proxy.start()
        await proxy.close()
        await proxy.close()
        assert SECRET.decode() not in repr(proxy)

    asyncio.run(go())

"""HTTP requests other than the WebSocket's, on both entry points: whom the 401 throttle counts, and how
long a request body may hold a connection."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import AppServer, Serve, Server, api_call, api_env, base_env

from secure_ws.uvicorn.http_protocol import REQUEST_BODY_TIMEOUT

KINDS = pytest.mark.parametrize("kind", [Server, Serve], ids=["uvicorn", "secure-ws serve"])


@pytest.fixture
def start(keydir: Path, keys_file: Path, api_key: str) -> Iterator:
    started: list[Server] = []

    def make(kind: type[Server], uvicorn_args: tuple[str, ...] = (), **env: str) -> Server:
        srv = kind(keydir, api_env(keydir, keys_file, **env), uvicorn_args).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


# -- the 401 throttle counts the TCP peer, as the handshake throttle does -------------------------------


@pytest.mark.parametrize(
    ("kind", "uvicorn_args"), [(Server, ()), (Server, ("--http", "h11")), (Serve, ())], ids=["uvicorn", "uvicorn-h11", "secure-ws serve"]
)
def test_x_forwarded_for_does_not_pick_the_api_throttle_bucket(start, kind, uvicorn_args):
    """Under plain uvicorn the API's throttle read scope["client"], which uvicorn rewrites from
    X-Forwarded-For for a 127.0.0.1 peer: each guess named a new IP, and key guesses were unlimited."""
    srv = start(kind, uvicorn_args, SECURE_WS_HANDSHAKE_RATE_LIMIT="3/minute")
    statuses = [
        api_call(srv, "publish", {"channel": "a", "data": 1}, key="swk_wrong", headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code
        for i in range(5)
    ]
    assert statuses == [401, 401, 401, 429, 429], statuses


@KINDS
def test_x_forwarded_for_counts_behind_a_named_proxy(start, kind):
    srv = start(kind, SECURE_WS_HANDSHAKE_RATE_LIMIT="3/minute", SECURE_WS_FORWARDED_ALLOW_IPS="127.0.0.0/8")
    distinct = [
        api_call(srv, "publish", {"channel": "a", "data": 1}, key="swk_wrong", headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code
        for i in range(4)
    ]
    assert distinct == [401] * 4  # each a different client behind the proxy


# -- a trickled body does not hold a connection ----------------------------------------------------------


def trickle(srv: Server, head: bytes, within: float) -> tuple[float | None, bytes]:
    """Send ``head`` (announcing a large body), then one body byte every 0.1 s, as a slow attacker does,
    whatever the server answers; (seconds until the server closed the connection or None if it had not
    within ``within``, the bytes it sent). One thread reads and writes (an SSL socket is not thread-safe)."""
    context = srv.ssl_context()
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=10), server_hostname="localhost")
    received = bytearray()
    started = time.monotonic()
    try:
        sock.sendall(head)
        while time.monotonic() - started < within:
            sock.settimeout(0.1)
            try:
                data = sock.recv(65536)
                if not data:
                    return time.monotonic() - started, bytes(received)
                received.extend(data)
                continue
            except (TimeoutError, ssl.SSLWantReadError, BlockingIOError):
                pass
            except (OSError, ssl.SSLError):
                return time.monotonic() - started, bytes(received)
            try:
                sock.sendall(b"x")
            except (OSError, ssl.SSLError):
                return time.monotonic() - started, bytes(received)
        return None, bytes(received)
    finally:
        sock.close()


def _head(method: str, path: str, *extra: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Content-Length: 1000000", *extra, "", ""]
    return "\r\n".join(lines).encode()


@KINDS
@pytest.mark.parametrize(
    ("head", "status"),
    [
        (_head("POST", "/api/publish"), b"401"),  # no key
        (_head("POST", "/api/publish", "Authorization: Bearer swk_wrong"), b"401"),
        (_head("POST", "/api/nope", "Authorization: Bearer swk_wrong"), b"401"),
        (_head("POST", "/healthz"), b"405"),  # a route that takes no body
        (_head("GET", "/metrics"), b"200"),
        (_head("POST", "/no-such-route"), b"404"),
    ],
    ids=["api-no-key", "api-wrong-key", "api-unknown-method", "healthz", "metrics", "not-found"],
)
def test_a_trickled_body_is_answered_and_the_connection_closed(start, kind, head, status):
    """The answer came at once but the connection stayed open (keep-alive), reading the trickle for ever."""
    srv = start(kind)
    closed_after, answer = trickle(srv, head, within=8.0)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"\r\nconnection: close\r\n" in answer.lower(), answer[:400]
    assert closed_after is not None and closed_after < 5, f"the connection was still open after 8 s ({closed_after})"


@pytest.mark.parametrize("path", ["/api/publish", "/healthz"])
def test_a_trickled_body_is_cut_under_uvicorn_without_our_protocol(start, path):
    """`uvicorn --http h11` runs uvicorn's own protocol: the rule is the ASGI app's, so it holds there too."""
    srv = start(Server, ("--http", "h11"))
    closed_after, answer = trickle(srv, _head("POST", path), within=8.0)
    assert answer.startswith((b"HTTP/1.1 401", b"HTTP/1.1 405")) and b"connection: close" in answer.lower(), answer[:300]
    assert closed_after is not None and closed_after < 5


def test_a_body_read_to_its_end_keeps_the_connection(start, api_key):
    """What the rule must not cost: a request whose body was read is answered on a kept-alive connection."""
    srv = start(Server)
    response = api_call(srv, "publish", {"channel": "a", "data": 1}, key=api_key)
    assert response.status_code == 200 and "connection" not in response.headers, response.headers
    refused = api_call(srv, "publish", {"channel": "a", "data": 1}, key="swk_wrong")  # refused unread: closed
    assert refused.status_code == 401 and refused.headers.get("connection") == "close"


# -- a route that waits on a body: the protocol's bound -------------------------------------------------


def test_a_host_route_waiting_on_a_trickled_body_gets_408_and_the_connection_closed(keydir):
    """A route that reads the body (here a host application's, secure_ws mounted in it) waited for ever."""
    srv = AppServer(keydir, base_env(keydir), "mounted_app:starlette_host").start()
    try:
        closed_after, answer = trickle(srv, _head("POST", "/upload"), within=REQUEST_BODY_TIMEOUT + 8)
        assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower(), answer[:300]
        assert closed_after is not None and REQUEST_BODY_TIMEOUT - 1 < closed_after < REQUEST_BODY_TIMEOUT + 5, closed_after
        # A large body at a fair speed is not cut.
        import httpx

        with httpx.Client(verify=srv.ssl_context(), timeout=30) as client:
            response = client.post(f"{srv.https}/upload", content=b"x" * (4 << 20))
        assert (response.status_code, response.text) == (200, str(4 << 20))
    finally:
        srv.stop()

"""What the tests share, as plain functions and classes (the fixtures that use them are in conftest.py).

Real parts, real wire: ``Server`` is uvicorn in a subprocess over TLS on an ephemeral port,
``RedisProcess`` a throw-away ``redis-server``, and the client is ``websockets``.

- ``Server``/``Serve``/``AppServer``/``ServeApp``: ``uvicorn secure_ws.main:app``, ``secure-ws serve``, an application in
  tests/apps under ``uvicorn`` and under ``secure-ws serve MODULE:ATTR``.
- ``recv_json``/``request``/``welcome``/``assert_error``/``closed_with``/``refusal``: one frame at a time.
- ``wait_for``/``wait_until``: poll a condition to a deadline (never a bare sleep as synchronisation).
- ``scrape``/``metric``: ``GET /metrics`` parsed, and one sample of it.
- ``make_keydir``/``keydir_env``: the key directory builder shared with scripts/bench.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from keydir import keydir_env, make_keydir  # noqa: E402  (scripts/keydir.py, shared with the bench)

APPS = ROOT / "tests" / "apps"

__all__ = ["keydir_env", "make_keydir"]



# The shared Redis the scale-out tests use (the others start their own): this database and the next one,
# both flushed. Choose free ones with SECURE_WS_TEST_REDIS_URL (servers never see it: keydir_env drops
# every SECURE_WS_* of the test's environment).
TEST_REDIS_URL = os.environ.get("SECURE_WS_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")


def shared_redis_url(offset: int) -> str:
    """Database ``offset`` after the one SECURE_WS_TEST_REDIS_URL names."""
    parts = urllib.parse.urlsplit(TEST_REDIS_URL)
    return parts._replace(path=f"/{int(parts.path.strip('/') or 0) + offset}").geturl()


def flushed_test_redis(url: str) -> redis.Redis:
    """A client on ``url``, flushed; the test fails (never skips) without a Redis there."""
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"no Redis at {url} ({exc}); .ci/run starts one at 127.0.0.1:6379, or set SECURE_WS_TEST_REDIS_URL")
    client.flushdb()
    return client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(keydir: Path, **extra: str) -> dict[str, str]:
    # Many handshakes come from 127.0.0.1 in a test run; the throttle has its own tests (which set it in ``extra``).
    return keydir_env(keydir, **{"SECURE_WS_HANDSHAKE_RATE_LIMIT": "100000/minute", "PYTHONUNBUFFERED": "1", **extra})


# What every ops command says on stderr about what it used (SPEC §12), before its answer or its refusal.
USED_LINES = ("secure-ws: storage ", "secure-ws: keys ", "secure-ws: api keys ", "secure-ws: signing key", "secure-ws: verification keys")


def refusal_lines(stderr: str) -> list[str]:
    """A command's stderr without the lines saying what it used: a refusal is one line."""
    return [line for line in stderr.splitlines() if not line.startswith(USED_LINES)]


def cli(keydir: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m secure_ws`` as the operator would."""
    result = subprocess.run(
        [sys.executable, "-m", "secure_ws", *args],
        env=env or base_env(keydir),
        cwd=keydir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"secure-ws {' '.join(args)} failed: {result.stderr}")
    return result


class Server:
    """One ``uvicorn secure_ws.main:app`` process over TLS."""

    def __init__(self, keydir: Path, env: dict[str, str], uvicorn_args: tuple[str, ...] = ()) -> None:
        self.keydir = keydir
        self.env = env
        self.port = free_port()
        self.log_path = keydir / f"server-{self.port}.log"
        self.uvicorn_args = uvicorn_args
        self.cwd = keydir  # the working directory it runs in
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"wss://localhost:{self.port}/ws"

    @property
    def https(self) -> str:
        return f"https://localhost:{self.port}"

    def start(self, timeout: float = 20.0, attempts: int = 3) -> Server:
        # free_port() releases the port before uvicorn binds it; another process may take it meanwhile.
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except RuntimeError as exc:
                if "address already in use" not in str(exc).lower() or attempt == attempts - 1:
                    raise
                self.port = free_port()
                self.log_path = self.keydir / f"server-{self.port}.log"
        raise AssertionError("unreachable")

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "secure_ws.main:app",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-keyfile", str(self.keydir / "server.key"),
            "--ssl-certfile", str(self.keydir / "server.crt"),
            *self.uvicorn_args,
        ]

    def _start(self, timeout: float) -> Server:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv(),
            env=self.env,
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not listen in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.keydir / "ca.crt"))

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """A plain HTTPS GET with the stdlib, trusting the dev CA."""
        import http.client

        conn = http.client.HTTPSConnection("localhost", self.port, context=self.ssl_context(), timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def connect(
        self,
        token: str | None = None,
        transport: str = "header",
        path: str = "/ws",
        headers: dict[str, str] | None = None,
        subprotocols: list[str] | None = None,
        query: str = "",
        **kwargs: Any,
    ) -> Any:
        """A ``websockets.connect`` context for the chosen token transport."""
        extra = dict(headers or {})
        protos = list(subprotocols or [])
        if token is not None:
            if transport == "header":
                extra["Authorization"] = f"Bearer {token}"
            elif transport == "subprotocol":
                protos = protos or ["secure-ws.v1"]
                protos.append(f"bearer.{token}")
            elif transport in ("query", "access_token"):
                query = f"access_token={token}"
            elif transport == "token":
                query = f"token={token}"
            else:
                raise ValueError(transport)
        url = f"wss://localhost:{self.port}{path}" + (f"?{query}" if query else "")
        return websockets.connect(
            url,
            ssl=self.ssl_context(),
            additional_headers=extra or None,
            subprotocols=protos or None,
            open_timeout=10,
            max_size=None,
            **kwargs,
        )


class Serve(Server):
    """``python -m secure_ws serve --port P`` (the hardened TLS context), with Server's client helpers."""

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "secure_ws", "serve", "--port", str(self.port), *self.uvicorn_args]


@contextlib.contextmanager
def running_pair(make: Callable[[], Server]) -> Iterator[tuple[Server, Server]]:
    """Two servers built by ``make`` and started, for the scale-out tests; both stopped afterwards,
    the first one too if the second fails to start."""
    a = make().start()
    try:
        b = make().start()
    except Exception:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(srv: Server) -> Samples:
    """``GET /metrics`` parsed: (sample name, sorted labels) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = srv.get("/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain"), headers
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def closed_with(ws: Any, timeout: float = 5.0) -> tuple[int, str]:
    """Read until the server closes; return its (code, reason). Fails if it never does."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None, "connection dropped without a close frame"
        return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("unreachable")


async def refusal(server: Server, token: str | None, transport: str = "header", **kwargs: Any) -> tuple[int, str]:
    """Connect and expect an immediate 1008 (or other) close with no data frame before it."""
    async with server.connect(token, transport, **kwargs) as ws:
        try:
            async with asyncio.timeout(5):
                frame = await ws.recv()
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code, exc.rcvd.reason
        raise AssertionError(f"expected a close, got a frame: {frame!r}")


async def welcome(ws: Any) -> dict[str, Any]:
    frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert frame["type"] == "welcome", frame
    return frame


async def request(ws: Any, message: dict[str, Any] | str, timeout: float = 5.0) -> dict[str, Any]:
    await ws.send(message if isinstance(message, str) else json.dumps(message))
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def run(coro: Any) -> Any:
    return asyncio.run(coro)




def signing_key(keydir: Path) -> tuple[str, Any, str]:
    """(kid, private key object, alg) of the active signing key."""
    document = json.loads((keydir / "signing-keys.json").read_text())
    key = next(k for k in document["keys"] if k["status"] == "active")
    jwk = {m: v for m, v in key.items() if m not in ("created", "status")}
    return key["kid"], jwt.PyJWK(jwk, algorithm=key["alg"]).key, key["alg"]


_subs = itertools.count()


def unique_sub(prefix: str = "user") -> str:
    return f"{prefix}-{next(_subs)}-{secrets.token_hex(3)}"



class AppServer(Server):
    """``uvicorn <module>:app`` for an application in tests/apps (or ``app_dir``)."""

    def __init__(
        self, keydir: Path, env: dict[str, str], app: str = "handlers_app:app", uvicorn_args: tuple[str, ...] = (), app_dir: Path = APPS
    ) -> None:
        env = {**env, "PYTHONPATH": f"{app_dir}:{env.get('PYTHONPATH', '')}"}
        super().__init__(keydir, env, uvicorn_args)
        self.app = app

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", self.app, *super().argv()[4:]]


class ServeApp(AppServer):
    """``secure-ws serve MODULE:ATTR`` for an application in tests/apps (or ``app_dir``): the hardened TLS context."""

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "secure_ws", "serve", self.app, "--port", str(self.port), *self.uvicorn_args]


def strict_loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses what is not JSON (NaN, Infinity), as any non-Python client would."""

    def refuse(name: str) -> Any:
        raise ValueError(f"server sent {name}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


async def recv_json(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame, which must be strict JSON."""
    return strict_loads(await asyncio.wait_for(ws.recv(), timeout))


def assert_error(frame: dict[str, Any], code: str, id: Any = None) -> None:
    """An error frame with ``code``, a message, and exactly ``id`` (none when ``id`` is None)."""
    assert frame.get("type") == "error", frame
    assert frame.get("code") == code, frame
    assert isinstance(frame.get("message"), str) and frame["message"], frame
    if id is None:
        assert frame.get("id") is None, frame
    else:
        assert "id" in frame and frame["id"] == id and type(frame["id"]) is type(id), frame


def wait_for(condition: Callable[[], Any], within: float, what: str, every: float = 0.05) -> Any:
    """Poll ``condition`` until it is truthy (its value is returned) or ``within`` seconds pass (fail)."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(every)


async def wait_until(condition: Callable[[], Any], within: float, what: str, every: float = 0.05) -> Any:
    """:func:`wait_for` inside a running event loop (``condition`` may return an awaitable)."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(every)


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (``VmRSS``), or its peak (``VmHWM``), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class RedisProcess:
    """A throw-away ``redis-server`` in the foreground on a spare port (no persistence), killed like a crash."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2)

    def start(self, timeout: float = 10.0, *args: str) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.workdir), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited {self.proc.returncode} (port {self.port} taken?)")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server did not answer on {self.port} within {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- the server API (SPEC §10) -----------------------------------------------------------------------


def api_call(srv: Server, method: str, body: Any = None, key: str | None = None, raw: bytes | None = None,
             headers: dict[str, str] | None = None, http_method: str = "POST") -> Any:
    """One ``/api/<method>`` request with httpx (an ``httpx.Response``); ``body`` goes as JSON, ``raw`` as given."""
    import httpx

    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    with httpx.Client(verify=srv.ssl_context(), timeout=10) as client:
        return client.request(http_method, f"{srv.https}/api/{method}", content=content, headers=sent)


async def api_acall(srv: Server, method: str, body: Any = None, key: str | None = None) -> Any:
    """:func:`api_call` from a test's event loop, without blocking the clients on it."""
    return await asyncio.to_thread(api_call, srv, method, body, key)


def api_error(response: Any, status: int, code: str) -> str:
    """Assert an API error answer ``{"error":{"code":code,"message":…}}`` with ``status``; return its message."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert set(document) == {"error"} and set(document["error"]) == {"code", "message"}, document
    assert document["error"]["code"] == code, document
    assert isinstance(document["error"]["message"], str) and document["error"]["message"]
    return document["error"]["message"]


def api_env(keydir: Path, keys_file: Path, **extra: str) -> dict[str, str]:
    return base_env(keydir, SECURE_WS_API_KEYS_FILE=str(keys_file), **extra)


def create_api_key(keydir: Path, keys_file: Path, name: str) -> str:
    """``secure-ws apikey create NAME``: the key it prints."""
    return cli(keydir, "apikey", "create", name, env=api_env(keydir, keys_file)).stdout.strip()


async def subscribe(ws: Any, channel: str) -> None:
    reply = await request(ws, {"type": "subscribe", "channel": channel})
    assert reply["type"] == "subscribed" and reply["channel"] == channel, reply


def no_traceback(srv: Server) -> None:
    log = srv.log()
    assert "Traceback" not in log, log[-3000:]

# -- channels with history (SPEC §11) ---------------------------------------------------------

ROOMS = "subscribe:room.* publish:room.*"


def sans_position(frame: dict[str, Any]) -> dict[str, Any]:
    """A ``message`` or ``subscribed`` frame of a channel with history, checked to carry a well-formed ``offset``
    and ``epoch``, without them: for tests of what else the frame holds (SPEC §5)."""
    assert type(frame.get("offset")) is int and frame["offset"] >= 0, frame
    assert isinstance(frame.get("epoch"), str) and frame["epoch"], frame
    return {k: v for k, v in frame.items() if k not in ("offset", "epoch")}


def unique_channel() -> str:
    """A fresh channel under ROOMS, so that histories never mix between tests."""
    return f"room.h{secrets.token_hex(4)}"


async def publish(ws: Any, channel: str, *values: Any) -> None:
    for value in values:
        assert await request(ws, {"type": "publish", "channel": channel, "data": value}) == {"type": "published", "channel": channel}


async def messages(ws: Any, count: int) -> list[dict[str, Any]]:
    frames = [await recv_json(ws) for _ in range(count)]
    assert all(frame["type"] == "message" for frame in frames), frames
    return frames


async def nothing_more(ws: Any) -> None:
    """No frame is pending: a ping's pong is the next one."""
    assert await request(ws, {"type": "ping", "id": "end"}) == {"type": "pong", "id": "end"}

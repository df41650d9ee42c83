"""Real parts, real wire: uvicorn in a subprocess over TLS on an ephemeral port, a real ``websockets`` client.

Fixtures
--------
``keydir``   a session-wide folder with a dev CA, server certificate and an EdDSA signing key.
``server``   a module-wide server on default settings (unique ``sub`` per test keeps rate windows apart).
``make_server(**env)``  a server with extra ``SECURE_WS_*`` variables, stopped after the test.
``issue(sub=…, ttl=…, scope=…)``  a real token from the signing key, with a unique sub by default.
``forge(claims, header=…, key=…, alg=…)``  a token with arbitrary claims and headers, for hostile cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(keydir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURE_WS_")}
    env.update(
        SECURE_WS_JWKS_FILE=str(keydir / "jwks.json"),
        SECURE_WS_SIGNING_KEYS_FILE=str(keydir / "signing-keys.json"),
        SECURE_WS_REVOCATION_FILE=str(keydir / "revocations.json"),
        SECURE_WS_TLS_CERTFILE=str(keydir / "server.crt"),
        SECURE_WS_TLS_KEYFILE=str(keydir / "server.key"),
        # Many handshakes come from 127.0.0.1 in a test run; the throttle has its own tests.
        SECURE_WS_HANDSHAKE_RATE_LIMIT="100000/minute",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


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
            cwd=self.keydir,
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


# -- key material --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys")
    cli(path, "certs", "--out", str(path))
    cli(path, "keys", "rotate")
    return path


def signing_key(keydir: Path) -> tuple[str, Any, str]:
    """(kid, private key object, alg) of the active signing key."""
    document = json.loads((keydir / "signing-keys.json").read_text())
    key = next(k for k in document["keys"] if k["status"] == "active")
    jwk = {m: v for m, v in key.items() if m not in ("created", "status")}
    return key["kid"], jwt.PyJWK(jwk, algorithm=key["alg"]).key, key["alg"]


_subs = itertools.count()


def unique_sub(prefix: str = "user") -> str:
    return f"{prefix}-{next(_subs)}-{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def issue(keydir: Path) -> Callable[..., str]:
    kid, key, alg = signing_key(keydir)

    def make(sub: str | None = None, ttl: int = 900, scope: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": "secure-ws", "aud": "secure-ws", "sub": sub or unique_sub(),
            "iat": now, "exp": now + ttl, "jti": secrets.token_urlsafe(12),
        }
        if scope is not None:
            payload["scope"] = scope
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})

    return make


@pytest.fixture(scope="session")
def forge(keydir: Path) -> Callable[..., str]:
    kid, key, alg = signing_key(keydir)

    def make(claims: dict[str, Any], header: dict[str, Any] | None = None, key_: Any = None, alg_: str | None = None) -> str:
        headers = {"kid": kid, **(header or {})}
        return jwt.encode(claims, key_ if key_ is not None else key, algorithm=alg_ or alg, headers=headers)

    return make


@pytest.fixture(scope="session")
def good_claims() -> Callable[..., dict[str, Any]]:
    def make(**overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": "secure-ws", "aud": "secure-ws", "sub": unique_sub(), "iat": now, "exp": now + 600,
                  "jti": secrets.token_urlsafe(12)}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    return make


# -- servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(keydir: Path) -> Iterator[Server]:
    srv = Server(keydir, base_env(keydir)).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(keydir: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def make(uvicorn_args: tuple[str, ...] = (), keys: Path | None = None, **env: str) -> Server:
        kd = keys or keydir
        srv = Server(kd, base_env(kd, **env), uvicorn_args).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()

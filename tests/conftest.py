"""Fixtures over the shared helpers in helpers.py.

``keydir``   a session-wide folder with a dev CA, server certificate and an EdDSA signing key.
``server``   a module-wide server on default settings (unique ``sub`` per test keeps rate windows apart).
``make_server(**env)``  a server with extra ``SECURE_WS_*`` variables, stopped after the test.
``issue(sub=…, ttl=…, scope=…)``  a real token from the signing key, with a unique sub by default.
``forge(claims, header=…, key=…, alg=…)``  a token with arbitrary claims and headers, for hostile cases.
``own_redis()``  a throw-away ``redis-server`` (``own_redis(port)`` to come back at the same address).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from helpers import RedisProcess, Server, base_env, create_api_key, make_keydir, signing_key, unique_sub

# -- key material --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keydir(tmp_path_factory.mktemp("keys"))


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
    """``make_server(uvicorn_args=(), keys=None, kind=Server, **env)``: a started server (``kind=Serve`` for
    ``secure-ws serve``) on ``keys`` (the session's key folder by default); every one is stopped afterwards."""
    started: list[Server] = []

    def make(uvicorn_args: tuple[str, ...] = (), keys: Path | None = None, kind: type[Server] = Server, **env: str) -> Server:
        kd = keys or keydir
        srv = kind(kd, base_env(kd, **env), uvicorn_args).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server-API keys file for the module's servers (``api_env(keydir, keys_file)``)."""
    return tmp_path_factory.mktemp("api") / "api-keys.json"


@pytest.fixture(scope="module")
def api_key(keydir: Path, keys_file: Path) -> str:
    """A key in ``keys_file``, named ``backend``."""
    return create_api_key(keydir, keys_file, "backend")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """``own_redis(port=None)``: start a throw-away redis-server; every one started is killed afterwards."""
    procs: list[RedisProcess] = []

    def start(port: int | None = None) -> RedisProcess:
        proc = RedisProcess(tmp_path, port)
        procs.append(proc)
        return proc.start()

    yield start
    for proc in procs:
        proc.kill()

"""Forward the message types nobody handles in Python to an HTTP backend (SPEC §9, ``SECURE_WS_RPC_PROXY_URL``).

An application in another language gets the same authenticated, rate-limited socket: each such message is
POSTed as ``{"type","data","sub","connection_id","claims"}`` with ``Authorization: Bearer <secret>``, so the
backend can tell this service from anyone else. The backend sees the verified claims, never the client's token.

Every answer is bounded, because a slow or broken backend must cost a connection an ``unavailable`` error and
nothing more: one pooled client (at most 100 connections, 20 kept alive), a response body of at most
``max_response_bytes`` (1 MiB by default; read as it arrives and dropped past the bound, compressed bodies
refused), and ``timeout`` (``SECURE_WS_HANDLER_TIMEOUT``) for each connect/read/write/pool wait and for the whole
call. Redirects are not followed and no proxy is taken from the environment.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from ..auth.tokens import thawed
from .reject import Reject

MAX_CONNECTIONS = 100
MAX_KEEPALIVE = 20


class ProxyUnavailable(Exception):
    """The backend did not answer usably; the message says why, for the log (never sent to the client)."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _encode(body: dict[str, Any]) -> bytes:
    # Claims are read-only views (mapping proxies), written out as the objects they are.
    try:
        return orjson.dumps(body, default=thawed)
    except orjson.JSONEncodeError:
        # Decoded JSON may hold what orjson refuses (integers past 64 bits); the stdlib writes those.
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=thawed).encode()


class RpcProxy:
    def __init__(self, url: str, secret: bytes, timeout: float, max_response_bytes: int = 1 << 20) -> None:
        self.url = url
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        # Built once; kept out of every message and repr.
        self._headers = {
            "authorization": "Bearer " + secret.decode(),
            "content-type": "application/json",
            "accept": "application/json",
            "accept-encoding": "identity",
        }
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE),
                timeout=httpx.Timeout(self.timeout),
                follow_redirects=False,
                trust_env=False,
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def call(self, type: str, data: Any, sub: str, connection_id: str, claims: Mapping[str, Any]) -> Any:
        """The backend's ``data``; raises :class:`Reject` for its ``error``, :class:`ProxyUnavailable` otherwise."""
        if self._client is None:
            raise RuntimeError("RpcProxy.call before start()")
        content = _encode({"type": type, "data": data, "sub": sub, "connection_id": connection_id, "claims": claims})
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self._post(self._client, content)
        except TimeoutError:
            raise ProxyUnavailable(f"no answer within {self.timeout:g}s") from None
        except httpx.TimeoutException as exc:
            raise ProxyUnavailable(f"timed out: {exc.__class__.__name__}") from None
        except httpx.HTTPError as exc:
            raise ProxyUnavailable(f"request failed: {exc.__class__.__name__}: {exc}"[:300]) from None
        return self._answer(raw)

    async def _post(self, client: httpx.AsyncClient, content: bytes) -> bytes:
        async with client.stream("POST", self.url, content=content, headers=self._headers) as response:
            if not 200 <= response.status_code < 300:
                raise ProxyUnavailable(f"status {response.status_code}")
            if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
                raise ProxyUnavailable("compressed body refused")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_response_bytes:
                raise ProxyUnavailable(f"body over {self.max_response_bytes} bytes")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise ProxyUnavailable(f"body over {self.max_response_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

    def _answer(self, raw: bytes) -> Any:
        try:
            answer = json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ProxyUnavailable("body is not JSON") from None
        if not isinstance(answer, dict):
            raise ProxyUnavailable("body is not a JSON object")
        if ("data" in answer) == ("error" in answer):
            raise ProxyUnavailable("body needs exactly one of 'data' and 'error'")
        if "data" in answer:
            return answer["data"]
        error = answer["error"]
        if not isinstance(error, dict):
            raise ProxyUnavailable("'error' is not an object")
        code, message = error.get("code"), error.get("message", "")
        if type(code) is not str or type(message) is not str:
            raise ProxyUnavailable("'error.code' or 'error.message' is not a string")
        try:
            rejection = Reject(code, message)  # validates the code
        except ValueError:
            raise ProxyUnavailable("'error.code' is not a valid error code") from None
        raise rejection

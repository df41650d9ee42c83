"""Forward the message types nobody handles in Python to an HTTP backend (SPEC §9, ``SECURE_WS_RPC_PROXY_URL``).

An application in another language gets the same authenticated, rate-limited socket: each such message is
POSTed as ``{"type","data","sub","connection_id","claims"}`` with ``Authorization: Bearer <secret>``, so the
backend can tell this service from anyone else. The backend sees the verified claims, never the client's token.

Every answer is bounded, because a slow or broken backend must cost a connection an ``unavailable`` error and
nothing more: one pooled client (at most 100 connections, 20 kept alive), a response body of at most
``max_response_bytes`` (1 MiB by default; read as it arrives and dropped past the bound, compressed bodies
refused), and ``timeout`` (``SECURE_WS_HANDLER_TIMEOUT``) for each connect/read/write/pool wait and for the whole
call. Redirects are not followed and no proxy is taken from the environment.

A backend may answer with a stream instead (``Content-Type: application/x-ndjson``): one JSON object per line,
``{"data":Y}`` for each chunk, optionally ``{"error":{…}}`` last, the end of the body ending the call. The body is
then read line by line, only when the session asks for the next chunk (so only as fast as the client reads), and
closed as soon as the call ends however it ends: a line is at most ``max_line_bytes`` (what buffers), the open
response holds one pooled connection, and the session's timeouts bound each wait and the whole stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import httpx
import orjson

from ..auth.tokens import thawed
from .reject import Reject
from .types import Chunks

MAX_CONNECTIONS = 100
MAX_KEEPALIVE = 20
NDJSON = "application/x-ndjson"


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
    def __init__(self, url: str, secret: bytes, timeout: float, max_response_bytes: int = 1 << 20, max_line_bytes: int = 65536) -> None:
        self.url = url
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.max_line_bytes = max_line_bytes
        # Built once; kept out of every message and repr.
        self._headers = {
            "authorization": "Bearer " + secret.decode(),
            "content-type": "application/json",
            "accept": f"application/json, {NDJSON}",
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
        """The backend's ``data``, or :class:`Chunks` of each line's ``data`` for an NDJSON body; raises
        :class:`Reject` for its ``error``, :class:`ProxyUnavailable` otherwise (the chunks raise them too)."""
        client = self._client
        if client is None:
            raise RuntimeError("RpcProxy.call before start()")
        content = _encode({"type": type, "data": data, "sub": sub, "connection_id": connection_id, "claims": claims})
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(self.timeout):
                response = await client.send(client.build_request("POST", self.url, content=content, headers=self._headers), stream=True)
                self._check(response)
                if response.headers.get("content-type", "").partition(";")[0].strip().lower() == NDJSON:
                    chunks, response = Chunks(self._lines(response), response.aclose), None  # closed by the chunks' consumer from here
                    return chunks
                raw = await self._body(response)
        except TimeoutError:
            raise ProxyUnavailable(f"no answer within {self.timeout:g}s") from None
        except httpx.TimeoutException as exc:
            raise ProxyUnavailable(f"timed out: {exc.__class__.__name__}") from None
        except httpx.HTTPError as exc:
            raise ProxyUnavailable(f"request failed: {exc.__class__.__name__}: {exc}"[:300]) from None
        finally:
            if response is not None:
                await response.aclose()
        return self._answer(raw)

    def _check(self, response: httpx.Response) -> None:
        if not 200 <= response.status_code < 300:
            raise ProxyUnavailable(f"status {response.status_code}")
        if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
            raise ProxyUnavailable("compressed body refused")

    async def _body(self, response: httpx.Response) -> bytes:
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

    async def _lines(self, response: httpx.Response) -> AsyncGenerator[Any, None]:
        """Each NDJSON line's ``data`` as it is read (blank lines skipped); an ``error`` line raises its
        :class:`Reject`; a line that is not one of the two, or longer than ``max_line_bytes``, or a body that
        breaks off, raises :class:`ProxyUnavailable`. The response is closed when this generator is."""
        limit = self.max_line_bytes
        partial = bytearray()  # the line being read: at most `limit` bytes
        try:
            async for raw in response.aiter_raw():  # one network read each (httpcore reads at most 64 KiB)
                start = 0
                while (end := raw.find(b"\n", start)) >= 0:
                    partial += raw[start:end]
                    start = end + 1
                    if len(partial) > limit:
                        raise ProxyUnavailable(f"line over {limit} bytes")
                    line = bytes(partial)
                    partial.clear()
                    if line.strip():
                        yield self._answer(line)
                partial += raw[start:]
                if len(partial) > limit:
                    raise ProxyUnavailable(f"line over {limit} bytes")
            if partial.strip():  # the last line may go without its newline
                yield self._answer(bytes(partial))
        except httpx.HTTPError as exc:
            raise ProxyUnavailable(f"body broke off: {exc.__class__.__name__}") from None
        finally:
            await response.aclose()

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

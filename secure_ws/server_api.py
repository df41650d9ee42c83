"""The server API (SPEC §10): ``POST /api/<method>`` lets backends push to clients.

A plain ASGI app, mounted by :mod:`secure_ws.app` in front of the HTTP routes. Checks run
cheapest and least revealing first, each with one bounded answer:

1. no API key configured → the API does not exist: the host app's own 404;
2. not ``POST`` → 405;
3. the client IP over ``SECURE_WS_HANDSHAKE_RATE_LIMIT`` → 429 with ``Retry-After``, before
   any key is looked at (a throttled caller learns nothing about the key it tried);
4. the keys file unusable → 503 (never fail open);
5. a missing or wrong key → 401 with no detail; the attempt counts on that throttle;
6. an unknown method → 404; a body over 1 MiB → 413 (read in chunks, never more than
   1 MiB + one chunk held); not a JSON object with exactly the method's fields → 400,
   with a message that names fields and never echoes a value;
7. storage unreachable → 503 ``unavailable``.

Every answer is JSON: the method's result, or ``{"error":{"code":K,"message":M}}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .auth.revocation_file import RevocationsFull
from .auth.tokens import MAX_SUB_CHARS
from .core.handshake import client_ip
from .service import Service
from .wire.messages import CHANNEL, carriable, check_channel, encode, parse

log = logging.getLogger("secure_ws.api")

PREFIX = "/api/"
MAX_BODY_BYTES = 1 << 20
# A body must arrive within this (slow bodies hold a connection and a task, like a slow request head).
BODY_TIMEOUT = 10.0
MAX_BROADCAST_CHANNELS = 100
MAX_JTI_CHARS = 256
BEARER = b"bearer "

JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


# -- the body of each method -------------------------------------------------------------------------
# Each takes the decoded body (a dict) and checks it whole before anything is done.


def _fields(body: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    allowed = (*required, *optional)
    missing = [f for f in required if f not in body]
    if missing:
        raise _bad(f"missing field(s): {', '.join(missing)}")
    if any(key not in allowed for key in body):
        raise _bad(f"unknown field(s); this method takes {', '.join(allowed) or 'no fields'}")


def _channel(value: Any, field: str = "channel") -> str:
    try:
        return check_channel(value)
    except ValueError:
        raise _bad(f"{field} must match ^{CHANNEL.pattern}$") from None


def _identifier(value: Any, field: str, limit: int) -> str:
    if type(value) is not str or not 0 < len(value) <= limit:
        raise _bad(f"{field} must be a non-empty string of at most {limit} characters")
    return value


def _data(body: dict[str, Any]) -> Any:
    data = body["data"]
    try:
        encode(data).encode()  # what will go out must be JSON and UTF-8
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError (a lone surrogate) is a ValueError
        raise _bad("data cannot be sent (nested too deeply, or a lone surrogate in a string)") from None
    return data


async def _publish(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    _fields(body, ("channel", "data"))
    channel, data = _channel(body["channel"]), _data(body)
    return await service.publish(channel, data)


async def _broadcast(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    _fields(body, ("channels", "data"))
    channels = body["channels"]
    if type(channels) is not list or not 0 < len(channels) <= MAX_BROADCAST_CHANNELS:
        raise _bad(f"channels must be a list of 1 to {MAX_BROADCAST_CHANNELS} channel names")
    for channel in channels:  # every one checked before any is published: nothing half-applied
        _channel(channel, "every member of channels")
    if len(set(channels)) != len(channels):
        raise _bad("channels holds a name twice")
    data = _data(body)
    return {"results": [{"channel": c, **await service.publish(c, data)} for c in channels]}


async def _send(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    _fields(body, ("sub", "data"))
    sub, data = _identifier(body["sub"], "sub", MAX_SUB_CHARS), _data(body)
    await service.send(sub, data)
    return {}


async def _disconnect(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    _fields(body, ("sub",))
    await service.disconnect(_identifier(body["sub"], "sub", MAX_SUB_CHARS))
    return {}


async def _revoke(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    if len(body) != 1 or not ("jti" in body or "sub" in body):
        raise _bad("give exactly one field: jti or sub")
    try:
        if "jti" in body:
            await service.revoke(jti=_identifier(body["jti"], "jti", MAX_JTI_CHARS))
        else:
            await service.revoke(sub=_identifier(body["sub"], "sub", MAX_SUB_CHARS))
    except RevocationsFull:
        raise ApiError(507, "too_many_revocations", "the revocation file is full: revoke the subject (sub) instead of its tokens") from None
    return {}


async def _channels(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    _fields(body, ())
    return {"channels": await service.channels()}


async def _presence(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    _fields(body, ("channel",))
    channel = _channel(body["channel"])
    if not service.channel_rules(channel).presence:
        raise ApiError(403, "forbidden", f"presence is off for {channel}")
    return {"clients": await service.presence(channel)}


async def _history(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    _fields(body, ("channel",), ("since", "limit"))
    channel = _channel(body["channel"])
    try:  # `since` and `limit` are checked where the WebSocket's `history` checks them (wire.messages)
        return await service.history(channel, since=body.get("since"), limit=body.get("limit"))
    except ValueError as exc:  # its messages describe the shape wanted, never the value sent
        raise _bad(str(exc)) from None


async def _info(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    _fields(body, ())
    return await service.info()


AUDITED = frozenset({"revoke", "disconnect"})

Method = Callable[[Service, dict[str, Any]], Awaitable[dict[str, Any]]]
METHODS: dict[str, Method] = {
    "publish": _publish,
    "broadcast": _broadcast,
    "send": _send,
    "disconnect": _disconnect,
    "revoke": _revoke,
    "channels": _channels,
    "presence": _presence,
    "history": _history,
    "info": _info,
}


# -- HTTP ------------------------------------------------------------------------------------------


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key of the one ``Authorization: Bearer <key>`` header, or None (none, several, another scheme, empty)."""
    values = [value for name, value in headers if name == b"authorization"]
    if len(values) != 1 or values[0][:7].lower() != BEARER:
        return None
    key = values[0][7:].strip()
    return key or None


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    values = [value for name, value in headers if name == b"content-length"]
    if not values:
        return None
    if len(set(values)) != 1 or not values[0].strip().isdigit():
        raise _bad("bad Content-Length")
    return int(values[0])


async def _read_body(scope: dict[str, Any], receive: Any) -> bytes:
    """The whole body, or :class:`ApiError` 413 as soon as it would pass ``MAX_BODY_BYTES``."""
    length = _content_length(scope["headers"])
    if length is not None and length > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"the body must be at most {MAX_BODY_BYTES} bytes")
    body = bytearray()  # bound: MAX_BODY_BYTES plus the one chunk that passes it, then refused
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    raise ApiError(400, "bad_request", "the body ended early")
                body += message.get("body", b"")
                if len(body) > MAX_BODY_BYTES:
                    raise ApiError(413, "too_large", f"the body must be at most {MAX_BODY_BYTES} bytes")
                if not message.get("more_body", False):
                    return bytes(body)
    except TimeoutError:
        raise ApiError(408, "timeout", f"the body did not arrive within {BODY_TIMEOUT:g} s") from None


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        body = parse(text)
    except ValueError:  # UnicodeDecodeError included
        raise _bad("the body is not JSON (UTF-8)") from None
    if type(body) is not dict:
        raise _bad("the body must be a JSON object")
    if not carriable(text, body):
        raise _bad("the body holds a lone surrogate (or is nested too deeply)")
    return body


class ServerApi:
    """``POST /api/<method>``; anything else under ``/api/`` when no key exists goes to ``fallback`` (its 404)."""

    def __init__(self, service: Service, fallback: Any) -> None:
        self.service = service
        self.fallback = fallback

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, path: str) -> None:
        service = self.service
        if not service.api_keys.enabled:
            await self.fallback(scope, receive, send)
            return
        method_name = path[len(PREFIX):]
        ip = client_ip(scope, service.settings.forwarded_allow_ips)
        try:
            key_name = await self._authorize(scope, ip)
            method = METHODS.get(method_name)
            if method is None:
                raise ApiError(404, "not_found", f"no such method; the methods are {', '.join(METHODS)}")
            body = _decode(await _read_body(scope, receive))
            result = await self._run(method, body)
        except ApiError as exc:
            # A refusal before the body was read to its end (401, 408, 413…) also closes the connection
            # (secure_ws.app: Connection: close on a response to an unread body).
            if exc.status == 401:  # one line per attempt at most: each one counts on the throttle
                log.info("api refused ip=%s method=%s: 401", ip, _loggable(method_name), extra={"event": "api_refused", "client": ip})
            await _respond(send, exc.status, {"error": {"code": exc.code, "message": exc.message}}, exc.headers)
            return
        # Revocations and disconnects are rare and worth an audit line; publishes may come by the thousand.
        level = logging.INFO if method_name in AUDITED else logging.DEBUG
        log.log(level, "api call ip=%s key=%s method=%s", ip, key_name, method_name, extra={"event": "api_call", "client": ip})
        await _respond(send, 200, result)

    async def _authorize(self, scope: dict[str, Any], ip: str) -> str:
        """The name of the key the request carries, or :class:`ApiError` (405, 429, 503, 401)."""
        service = self.service
        if scope["method"] != "POST":
            raise ApiError(405, "method_not_allowed", "use POST", [(b"allow", b"POST")])
        limiter = service.handshake_limiter
        retry_ms = await limiter.blocked_ms(ip)
        if retry_ms:
            raise ApiError(429, "rate_limited", "too many attempts", [(b"retry-after", str(max(1, -(-retry_ms // 1000))).encode())])
        if service.api_keys.problem is not None:
            raise ApiError(503, "unavailable", "the API keys cannot be read; try again later")
        presented = _bearer(scope["headers"])
        name = service.api_keys.check(presented) if presented is not None else None
        if name is None:
            await limiter.hit(ip)
            raise ApiError(401, "unauthorized", "unauthorized", [(b"www-authenticate", b"Bearer")])
        return name

    async def _run(self, method: Method, body: dict[str, Any]) -> dict[str, Any]:
        service = self.service
        if service.session_deps is None:
            raise ApiError(503, "unavailable", "the service is not running (starting or shutting down)")
        try:
            return await method(service, body)
        except ApiError:
            raise
        except service.unavailable as exc:
            log.warning("api: storage unavailable: %s", exc, extra={"event": "api_unavailable"})
            raise ApiError(503, "unavailable", "shared storage is unreachable; retry") from None
        except Exception:
            log.exception("api: %s failed", method.__name__.lstrip("_"))
            raise ApiError(500, "internal_error", "internal error") from None


def _loggable(method: str) -> str:
    return method if method in METHODS else f"<unknown, {len(method)} chars>"


async def _respond(send: Any, status: int, document: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = encode(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})

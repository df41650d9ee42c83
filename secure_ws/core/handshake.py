"""The handshake gate: pure ASGI middleware in front of ``/ws``.

Order of checks, cheapest and least revealing first: per-IP throttle (HTTP 429
before any upgrade), Origin, credentials, token, revocation, connection cap.
Every refusal after the throttle *accepts* the upgrade and closes at once with
1008 and a fixed reason, because a browser's WebSocket API shows a close code
but never an HTTP status. The details go to the log; the token never does.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import parse_qsl

from .. import metrics
from ..auth.tokens import AuthError, Principal
from ..settings import Settings
from ..wire.closes import AMBIGUOUS, MISSING, ORIGIN_NOT_ALLOWED, SERVICE_UNAVAILABLE, TOO_MANY, Close
from .ratelimit import Limiter

log = logging.getLogger("secure_ws.handshake")

SUBPROTOCOL = "secure-ws.v1"
BEARER_PREFIX = "bearer."
QUERY_NAMES = ("access_token", "token")
# The scope extension in which a server tells the TCP peer ``(host, port)`` as the socket reports it
# (secure_ws.uvicorn.ws_protocol and http_protocol set it): uvicorn's proxy-headers middleware may have rewritten scope["client"].
PEER = "secure_ws.peer"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refusal(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def credentials(scope: dict[str, Any]) -> tuple[str | None, str | None]:
    """(token, origin) from the three transports; :class:`Refusal` if they disagree."""
    found: set[str] = set()
    origin = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                found.add(token.strip())
        elif name == b"origin":
            origin = value.decode("latin-1")
    for protocol in scope.get("subprotocols") or ():
        if protocol[:7].lower() == BEARER_PREFIX and len(protocol) > 7:
            found.add(protocol[7:])
    query = scope.get("query_string")
    if query:
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=False):
            if key in QUERY_NAMES and value:
                found.add(value)
    if len(found) > 1:
        raise Refusal(AMBIGUOUS, f"{len(found)} different tokens presented")
    return (found.pop() if found else None), origin


def _trusted(address: str, proxies: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_ip(scope: dict[str, Any], proxies: Sequence[Network]) -> str:
    """The address the per-IP throttle counts: the TCP peer, unless the peer is a proxy the operator
    named in ``SECURE_WS_FORWARDED_ALLOW_IPS``; then the rightmost ``X-Forwarded-For`` entry that is
    not one of those proxies (entries left of it were written by the client and prove nothing)."""
    peer = scope.get("extensions", {}).get(PEER) or scope.get("client")
    address = peer[0] if peer else "unknown"
    if not proxies or not _trusted(address, proxies):
        return address
    # The head is bounded (secure_ws.uvicorn.http_protocol), so this list is too.
    hops = [h.strip() for k, v in scope["headers"] if k == b"x-forwarded-for" for h in v.decode("latin-1").split(",")]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return address  # the proxy passed garbage: count it against the proxy, not a made-up name
        address = hop
    return address


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    # No Origin header: a native or mobile client, which no browser-based CSRF can forge.
    return origin is None or "*" in allowed or origin in allowed


class Admission(Protocol):
    """What the gate needs of the process (the service provides it)."""

    settings: Settings
    handshake_limiter: Limiter
    unavailable: tuple[type[BaseException], ...]

    async def authenticate(self, token: str) -> Principal: ...
    async def acquire_slot(self, sub: str) -> str | None: ...
    async def release_slot(self, sub: str, slot: str) -> None: ...


class HandshakeMiddleware:
    def __init__(self, app: Any, service: Admission) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        service = self.service
        ip = client_ip(scope, service.settings.forwarded_allow_ips)
        retry_ms = await service.handshake_limiter.hit(ip)
        if retry_ms:
            metrics.HANDSHAKES.labels(result="throttled").inc()
            log.warning("handshake throttled ip=%s", ip, extra={"event": "handshake_throttled", "client": ip})
            await deny_http(receive, send, scope, 429, b"too many handshakes\n", retry_after=max(1, -(-retry_ms // 1000)))
            return
        offered = scope.get("subprotocols") or ()
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        started = time.perf_counter()
        try:
            token, origin = credentials(scope)
            if not origin_allowed(origin, service.settings.allowed_origins):
                raise Refusal(ORIGIN_NOT_ALLOWED, f"origin {(origin or '')[:200]!r} not in SECURE_WS_ALLOWED_ORIGINS")
            if token is None:
                raise Refusal(MISSING, "no token in header, subprotocol or query")
            principal: Principal = await service.authenticate(token)
            slot = await service.acquire_slot(principal.sub)
            if slot is None:
                raise Refusal(TOO_MANY, f"sub {principal.sub!r} holds the maximum connections")
        except (Refusal, AuthError) as exc:
            metrics.HANDSHAKES.labels(result=exc.reason.replace(" ", "_")).inc()
            log.info(
                "handshake refused ip=%s reason=%r: %s", ip, exc.reason, exc.detail,
                extra={"event": "handshake_refused", "client": ip, "close_code": Close.POLICY_VIOLATION, "reason": exc.reason},
            )
            await refuse(receive, send, exc.reason, subprotocol)
            return
        except service.unavailable as exc:
            # Without storage, or without a revocation list known complete, revocations and connection caps
            # cannot be checked: refuse rather than admit unchecked. 1013 "try again later": back off and retry.
            metrics.HANDSHAKES.labels(result="unavailable").inc()
            log.warning(
                "handshake refused ip=%s: storage or revocations unavailable: %s", ip, exc,
                extra={"event": "handshake_refused", "client": ip, "close_code": Close.TRY_AGAIN_LATER, "reason": SERVICE_UNAVAILABLE},
            )
            await refuse(receive, send, SERVICE_UNAVAILABLE, subprotocol, code=Close.TRY_AGAIN_LATER)
            return
        metrics.HANDSHAKE.observe(time.perf_counter() - started)
        metrics.HANDSHAKES.labels(result="accepted").inc()
        scope["secure_ws.principal"] = principal
        scope["secure_ws.subprotocol"] = subprotocol
        try:
            await self.app(scope, receive, send)
        finally:
            await service.release_slot(principal.sub, slot)


async def refuse(receive: Any, send: Any, reason: str, subprotocol: str | None, code: int = Close.POLICY_VIOLATION) -> None:
    """Accept, then close 1008 at once: the only refusal a browser's WebSocket API can read."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    # Selecting our subprotocol matters: a browser that offered one fails a handshake answered without one,
    # and would then see 1006 instead of the reason.
    await send({"type": "websocket.accept", "subprotocol": subprotocol})
    await send({"type": "websocket.close", "code": code, "reason": reason})


async def deny_http(receive: Any, send: Any, scope: dict[str, Any], status: int, body: bytes, retry_after: int | None = None) -> None:
    """An HTTP response instead of the upgrade (ASGI websocket denial response), or 403 without that extension."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})

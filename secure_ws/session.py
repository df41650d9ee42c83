"""One authenticated connection: the receive loop, its replies, and its deadline.

The hot path is one inbound frame: rate-limit hit → parse → dispatch → send.
Replies to a client's own requests are sent inline (a client that does not read
them stops being read, which is TCP's own backpressure). Publications from
others go through a small bounded queue drained by a task that exists only while
the queue is non-empty, so an idle connection carries no extra task; a client
that lets the queue fill is cut as a ``slow consumer``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from time import perf_counter
from collections import deque
from typing import TYPE_CHECKING, Any

from . import metrics
from .protocol import (
    BAD_REQUEST,
    FORBIDDEN,
    RATE_LIMITED,
    UNAVAILABLE,
    UNKNOWN_TYPE,
    Grants,
    ProtocolError,
    channel_of,
    decode,
    encode,
    error,
    reply,
)
from .tokens import EXPIRED, INVALID, AuthError, Principal

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("secure_ws.session")

PONG = encode({"type": "pong"})


class Session:
    __slots__ = (
        "service",
        "send_raw",
        "principal",
        "grants",
        "id",
        "closed",
        "channels",
        "_timer",
        "_closer",
        "_queue",
        "_drainer",
        "_rejections",
        "_frames",
    )

    def __init__(self, service: Service, send: Any, principal: Principal) -> None:
        self.service = service
        self.send_raw = send
        self.principal = principal
        self.grants = Grants(principal.scopes)
        self.id = secrets.token_hex(8)
        self.closed = False
        self.channels: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.Task[None] | None = None
        self._queue: deque[str] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._rejections = 0
        self._frames = 0

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, receive: Any, subprotocol: str | None) -> None:
        service = self.service
        if (await receive())["type"] != "websocket.connect":
            return
        await self.send_raw({"type": "websocket.accept", "subprotocol": subprotocol})
        service.hub.add(self)
        metrics.CONNECTIONS.inc()
        log.info("session %s sub=%s open", self.id, self.principal.sub, extra=self._log_fields("open"))
        self._arm_timer()
        try:
            await self.send(
                encode(
                    {
                        "type": "welcome",
                        "sub": self.principal.sub,
                        "connection_id": self.id,
                        "expires_at": self.principal.exp,
                        "rate_limit": service.settings.rate_limit,
                    }
                )
            )
            code = await self._loop(receive)
            log.info(
                "session %s sub=%s disconnected %s", self.id, self.principal.sub, code,
                extra=self._log_fields("disconnect", code),
            )
        finally:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
            if self._drainer is not None:
                self._drainer.cancel()
            metrics.CONNECTIONS.dec()
            try:
                await service.hub.remove(self)
            except Exception:  # noqa: BLE001 (cleanup must finish; the hub state is local and already updated)
                log.warning("session %s: cleanup failed", self.id, exc_info=True)

    async def _loop(self, receive: Any) -> int | None:
        """Returns the client's close code when it disconnects."""
        settings = self.service.settings
        limiter = self.service.limiter
        max_bytes = settings.max_message_bytes
        close_after = settings.rate_limit_close_after
        sub = self.principal.sub  # refresh keeps the sub, so it is fixed per connection
        keys = limiter.keys(sub)
        stats = metrics.STATS
        frame_seconds = metrics.FRAME_SECONDS
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return message.get("code")
            if self.closed:
                continue  # frames already in flight when we closed
            stats.messages += 1
            retry_ms = await limiter.hit(sub, keys)
            text = message.get("text")
            if text is None:
                await self.close(1003, "binary frames are not accepted")
                continue
            if len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode()) > max_bytes):
                await self.close(1009, "message too big")
                continue
            if retry_ms:
                stats.rate_limited += 1
                self._rejections += 1
                await self.send(error(RATE_LIMITED, "rate limit exceeded", retry_after_ms=retry_ms))
                if self._rejections >= close_after:
                    await self.close(1008, "rate limit exceeded")
                continue
            self._rejections = 0
            sampled = not self._frames & 7  # 1 frame in 8: a fair latency distribution at an eighth of the cost
            self._frames += 1
            if sampled:
                started = perf_counter()
            try:
                await self._dispatch(text)
            except ProtocolError as exc:
                await self.send(error(exc.code, exc.message, exc.id))
            except Exception:  # noqa: BLE001 (a fault must close this connection only)
                log.exception("session %s: server fault", self.id, extra=self._log_fields("fault", 1011))
                await self.close(1011, "internal error")
            if sampled:
                frame_seconds.observe(perf_counter() - started)

    async def _dispatch(self, text: str) -> None:
        request = decode(text)
        try:
            await self._handle(request)
        except self.service.storage.errors:
            log.warning("session %s: storage unreachable", self.id, extra=self._log_fields("storage_unavailable"))
            raise ProtocolError(UNAVAILABLE, "shared storage unreachable; retry shortly", request.get("id")) from None

    async def _handle(self, request: dict[str, Any]) -> None:
        kind = request["type"]
        if kind == "ping":
            id = request.get("id")
            await self.send(PONG if id is None else reply(request, {"type": "pong"}))
        elif kind == "echo":
            if "data" not in request:
                raise ProtocolError(BAD_REQUEST, "echo needs 'data'", request.get("id"))
            await self.send(reply(request, {"type": "echo", "data": request["data"]}))
        elif kind == "publish":
            await self._publish(request)
        elif kind == "subscribe":
            channel = channel_of(request)
            if not self.grants.may_subscribe(channel):
                raise ProtocolError(FORBIDDEN, f"scope does not grant subscribe:{channel}", request.get("id"))
            await self.service.hub.join(self, channel)
            await self.send(reply(request, {"type": "subscribed", "channel": channel}))
        elif kind == "unsubscribe":
            channel = channel_of(request)
            await self.service.hub.leave(self, channel)
            await self.send(reply(request, {"type": "unsubscribed", "channel": channel}))
        elif kind == "refresh":
            await self._refresh(request)
        else:
            raise ProtocolError(UNKNOWN_TYPE, "unknown message type", request.get("id"))

    async def _publish(self, request: dict[str, Any]) -> None:
        channel = channel_of(request)
        if "data" not in request:
            raise ProtocolError(BAD_REQUEST, "publish needs 'data'", request.get("id"))
        if not self.grants.may_publish(channel):
            raise ProtocolError(FORBIDDEN, f"scope does not grant publish:{channel}", request.get("id"))
        # Encoded once here; every subscriber, local or on another worker, gets these same bytes.
        payload = encode({"type": "message", "channel": channel, "from": self.principal.sub, "data": request["data"]})
        await self.service.storage.publish(channel, payload)
        await self.send(reply(request, {"type": "published", "channel": channel}))

    async def _refresh(self, request: dict[str, Any]) -> None:
        token = request.get("token")
        if type(token) is not str:
            raise ProtocolError(BAD_REQUEST, "refresh needs 'token'", request.get("id"))
        service = self.service
        try:
            principal = await service.authenticate(token)
        except AuthError as exc:
            log.info(
                "session %s: refresh refused (%s): %s", self.id, exc.reason, exc.detail, extra=self._log_fields("refresh_refused")
            )
            await self.close(1008, INVALID)
            return
        if principal.sub != self.principal.sub:
            log.info("session %s: refresh with another sub refused", self.id, extra=self._log_fields("refresh_refused"))
            await self.close(1008, INVALID)
            return
        self.principal = principal
        self.grants = Grants(principal.scopes)
        self._arm_timer()
        for channel in tuple(self.channels):
            if not self.grants.may_subscribe(channel):
                await service.hub.leave(self, channel)
                await self.send(
                    error(FORBIDDEN, f"refreshed scope no longer grants subscribe:{channel}", channel=channel)
                )
        await self.send(reply(request, {"type": "refreshed", "expires_at": principal.exp}))

    def _log_fields(self, event: str, code: int | None = None, reason: str | None = None) -> dict[str, Any]:
        return {"connection_id": self.id, "sub": self.principal.sub, "event": event, "close_code": code, "reason": reason}

    # -- deadline --------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = self.principal.exp + self.service.settings.leeway - time.time()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self.close_soon, 1008, EXPIRED)

    # -- output ----------------------------------------------------------------------

    async def send(self, text: str) -> None:
        if not self.closed:
            await self.send_raw({"type": "websocket.send", "text": text})

    def deliver(self, text: str) -> None:
        """Queue a publication without ever blocking the publisher."""
        if self.closed:
            return
        if len(self._queue) >= self.service.settings.send_queue_size:
            self.close_soon(1008, "slow consumer")
            return
        self._queue.append(text)
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        queue = self._queue
        try:
            while queue and not self.closed:
                await self.send(queue.popleft())
        except Exception:  # noqa: BLE001 (the peer is gone, or a fault: either way this connection ends)
            log.warning("session %s: delivery failed", self.id, exc_info=True)
            await self.close(1011, "internal error")
        finally:
            self._drainer = None

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        metrics.CLOSES.labels(code=str(code)).inc()
        log.info(
            "session %s sub=%s closed %d %s", self.id, self.principal.sub, code, reason,
            extra=self._log_fields("close", code, reason),
        )
        try:
            await self.send_raw({"type": "websocket.close", "code": code, "reason": reason})
        except Exception:  # already disconnected: nothing left to tell
            pass

    def close_soon(self, code: int, reason: str) -> None:
        """Close from a timer or another connection's event, without awaiting."""
        if not self.closed and self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self.close(code, reason))

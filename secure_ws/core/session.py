"""One authenticated connection: its frames, its replies, and its deadline.

The hot path is one inbound frame: rate-limit hit → parse → dispatch → send.
:meth:`Session.frame` runs it as far as it can without waiting: with this
process's rate limiter, a ping, an echo or an error frame is answered there and
then. What must wait (a shared rate limiter, storage, a key fetch, a close) is
returned as an awaitable that the receive loop finishes before the next frame,
so replies keep the order of requests.

Under secure_ws's own WebSocket protocol (:mod:`secure_ws.uvicorn.ws_protocol`), the
protocol calls :meth:`Session.frame` straight from the socket's read while the
loop is idle in ``receive()``, and replies are written straight to the
transport: no task switch and no ASGI message per frame. Under any other ASGI
server the loop calls it for every ``websocket.receive``.

Everything sent goes through :meth:`Session.send`. When it cannot be written
at once (no direct transport, or the transport's buffer is full) it waits in a
small bounded queue drained by a task that exists only while the queue is
non-empty, so an idle connection carries no extra task; a client that lets the
queue fill is cut as a ``slow consumer``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..auth.scopes import Grants
from ..auth.tokens import AuthError, Principal
from ..wire.closes import (
    BINARY_REFUSED,
    EXPIRED,
    INTERNAL_ERROR,
    INVALID,
    MESSAGE_TOO_BIG,
    RATE_LIMIT_EXCEEDED,
    SLOW_CONSUMER,
    Close,
)
from ..wire.messages import (
    BAD_REQUEST,
    FORBIDDEN,
    LIMIT_EXCEEDED,
    RATE_LIMITED,
    UNAVAILABLE,
    UNKNOWN_TYPE,
    ProtocolError,
    channel_of,
    decode,
    encode,
    error,
    reply,
)

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger("secure_ws.session")

# The scope extension under which a server offers the direct frame path (secure_ws.uvicorn.ws_protocol does),
# and the key of a `websocket.receive` that carries, instead of text, what the frame handler left to await.
DIRECT = "secure_ws.direct"
WORK = "secure_ws.work"

PONG = encode({"type": "pong"})
# Request types whose handling waits on storage or a key fetch.
WAITING_KINDS = frozenset(("publish", "subscribe", "unsubscribe", "refresh"))


class Session:
    __slots__ = (
        "service",
        "send_raw",
        "principal",
        "grants",
        "id",
        "closed",
        "channels",
        "_write",
        "_sub",
        "_keys",
        "_limiter",
        "_max_bytes",
        "_timer",
        "_closer",
        "_queue",
        "_held",
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
        self._write: Callable[[str], bool] | None = None
        self._sub = principal.sub  # refresh keeps the sub, so the limiter's keys are fixed per connection
        self._limiter = service.limiter
        self._keys = self._limiter.keys(self._sub)
        self._max_bytes = service.settings.max_message_bytes
        self._timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.Task[None] | None = None
        self._queue: deque[str] = deque()
        self._held: list[str] | None = None  # publications that arrive while a request waits on storage
        self._drainer: asyncio.Task[None] | None = None
        self._rejections = 0
        self._frames = 0

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, receive: Any, subprotocol: str | None, direct: Any = None) -> None:
        """Serve the connection; ``direct`` is secure_ws.uvicorn.ws_protocol's protocol when it is the server."""
        service = self.service
        if (await receive())["type"] != "websocket.connect":
            return
        if direct is not None:  # before the accept, so the first frame already meets our message limit
            self._write = direct.attach(self.frame, self._max_bytes)
        await self.send_raw({"type": "websocket.accept", "subprotocol": subprotocol})
        service.hub.add(self)
        metrics.CONNECTIONS.inc()
        log.info("session %s sub=%s open", self.id, self._sub, extra=self._log_fields("open"))
        self._arm_timer()
        try:
            self.send(
                encode(
                    {
                        "type": "welcome",
                        "sub": self._sub,
                        "connection_id": self.id,
                        "expires_at": self.principal.exp,
                        "rate_limit": service.settings.rate_limit,
                    }
                )
            )
            code = await self._loop(receive)
            log.info(
                "session %s sub=%s disconnected %s", self.id, self._sub, code,
                extra=self._log_fields("disconnect", code),
            )
        finally:
            self.closed = True
            if direct is not None:
                direct.attach(None)
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
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return message.get("code")
            work = message.get(WORK)
            if work is None:
                work = self.frame(message.get("text"))
            if work is not None:
                await work

    # -- one frame -----------------------------------------------------------------

    def frame(self, text: str | None) -> Awaitable[None] | None:
        """One inbound frame (``None`` for binary), handled as far as it goes without waiting;
        returns what is left to await, if anything."""
        if self.closed:
            return None  # frames already in flight when we closed
        metrics.STATS.messages += 1
        refused = self._limiter.take(self._keys)
        if refused is None:
            return self._frame_shared(text)
        misfit = self._misfit(text)
        if misfit is not None:
            return misfit
        if refused >= 0:
            return self._refused(refused)
        return self._accept(text)  # type: ignore[arg-type]

    async def _frame_shared(self, text: str | None) -> None:
        retry_ms = await self._limiter.hit(self._sub, self._keys)
        work = self._misfit(text)
        if work is None:
            work = self._rate_limited(retry_ms) if retry_ms else self._accept(text)  # type: ignore[arg-type]
        if work is not None:
            await work

    async def _refused(self, index: int) -> None:
        work = self._rate_limited(await self._limiter.retry_ms(index, self._sub))
        if work is not None:
            await work

    def _misfit(self, text: str | None) -> Awaitable[None] | None:
        if text is None:
            return self.close(Close.UNSUPPORTED_DATA, BINARY_REFUSED)
        max_bytes = self._max_bytes
        if len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode()) > max_bytes):
            return self.close(Close.MESSAGE_TOO_BIG, MESSAGE_TOO_BIG)
        return None

    def _rate_limited(self, retry_ms: int) -> Awaitable[None] | None:
        metrics.STATS.rate_limited += 1
        self._rejections += 1
        self.send(error(RATE_LIMITED, RATE_LIMIT_EXCEEDED, retry_after_ms=retry_ms))
        if self._rejections >= self.service.settings.rate_limit_close_after:
            return self.close(Close.POLICY_VIOLATION, RATE_LIMIT_EXCEEDED)
        return None

    def _accept(self, text: str) -> Awaitable[None] | None:
        self._rejections = 0
        sampled = not self._frames & 7  # 1 frame in 8: a fair latency distribution at an eighth of the cost
        self._frames += 1
        started = perf_counter() if sampled else 0.0
        try:
            request = decode(text)
            kind = request["type"]
            if kind == "ping":
                id = request.get("id")
                self.send(PONG if id is None else reply(request, {"type": "pong"}))
            elif kind == "echo":
                if "data" not in request:
                    raise ProtocolError(BAD_REQUEST, "echo needs 'data'", request.get("id"))
                self.send(reply(request, {"type": "echo", "data": request["data"]}))
            elif kind in WAITING_KINDS:
                return self._waiting(request, started)
            else:
                raise ProtocolError(UNKNOWN_TYPE, "unknown message type", request.get("id"))
        except Exception as exc:  # noqa: BLE001 (a fault must close this connection only)
            return self._settle(exc, None)
        if sampled:
            metrics.FRAME_SECONDS.observe(perf_counter() - started)
        return None

    async def _waiting(self, request: dict[str, Any], started: float) -> None:
        # Publications arriving meanwhile are held until the reply is out: a subscribed publisher
        # hears `published` before its own message, whether storage delivers it at once or via Redis.
        self._held = []
        try:
            await self._handle(request)
        except Exception as exc:  # noqa: BLE001 (a fault must close this connection only)
            work = self._settle(exc, request.get("id"))
            if work is not None:
                await work
        finally:
            held, self._held = self._held, None
            for text in held:
                self.send(text)
        if started:
            metrics.FRAME_SECONDS.observe(perf_counter() - started)

    def _settle(self, exc: Exception, id: Any) -> Awaitable[None] | None:
        """A request that raised: an error frame for the client's mistakes and for storage outages,
        a 1011 close (and the traceback in our log only) for a fault of ours."""
        if isinstance(exc, self.service.unavailable):
            log.warning("session %s: storage unreachable", self.id, extra=self._log_fields("storage_unavailable"))
            exc = ProtocolError(UNAVAILABLE, "shared storage unreachable; retry shortly", id)
        if isinstance(exc, ProtocolError):
            self.send(error(exc.code, exc.message, exc.id))
            return None
        log.error("session %s: server fault", self.id, exc_info=exc, extra=self._log_fields("fault", Close.INTERNAL_ERROR))
        return self.close(Close.INTERNAL_ERROR, INTERNAL_ERROR)

    async def _handle(self, request: dict[str, Any]) -> None:
        kind = request["type"]
        if kind == "publish":
            await self._publish(request)
        elif kind == "subscribe":
            channel = channel_of(request)
            if not self.grants.may_subscribe(channel):
                raise ProtocolError(FORBIDDEN, f"scope does not grant subscribe:{channel}", request.get("id"))
            # Each held channel costs memory here and a subscription in storage; one already held is free.
            limit = self.service.settings.max_subscriptions
            if len(self.channels) >= limit and channel not in self.channels:
                raise ProtocolError(LIMIT_EXCEEDED, f"at most {limit} subscriptions per connection", request.get("id"))
            await self.service.hub.join(self, channel)
            self.send(reply(request, {"type": "subscribed", "channel": channel}))
        elif kind == "unsubscribe":
            channel = channel_of(request)
            await self.service.hub.leave(self, channel)
            self.send(reply(request, {"type": "unsubscribed", "channel": channel}))
        else:
            await self._refresh(request)

    async def _publish(self, request: dict[str, Any]) -> None:
        channel = channel_of(request)
        if "data" not in request:
            raise ProtocolError(BAD_REQUEST, "publish needs 'data'", request.get("id"))
        if not self.grants.may_publish(channel):
            raise ProtocolError(FORBIDDEN, f"scope does not grant publish:{channel}", request.get("id"))
        # Encoded once here; every subscriber, local or on another worker, gets these same bytes.
        payload = encode({"type": "message", "channel": channel, "from": self.principal.sub, "data": request["data"]})
        await self.service.storage.publish(channel, payload)
        self.send(reply(request, {"type": "published", "channel": channel}))

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
            await self.close(Close.POLICY_VIOLATION, INVALID)
            return
        if principal.sub != self.principal.sub:
            log.info("session %s: refresh with another sub refused", self.id, extra=self._log_fields("refresh_refused"))
            await self.close(Close.POLICY_VIOLATION, INVALID)
            return
        self.principal = principal
        self.grants = Grants(principal.scopes)
        self._arm_timer()
        for channel in tuple(self.channels):
            if not self.grants.may_subscribe(channel):
                await service.hub.leave(self, channel)
                self.send(error(FORBIDDEN, f"refreshed scope no longer grants subscribe:{channel}", channel=channel))
        self.send(reply(request, {"type": "refreshed", "expires_at": principal.exp}))

    def _log_fields(self, event: str, code: int | None = None, reason: str | None = None) -> dict[str, Any]:
        return {"connection_id": self.id, "sub": self.principal.sub, "event": event, "close_code": code, "reason": reason}

    # -- deadline --------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = self.principal.exp + self.service.settings.leeway - time.time()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self.close_soon, Close.POLICY_VIOLATION, EXPIRED)

    # -- output ----------------------------------------------------------------------

    def send(self, text: str) -> None:
        """Send now if the transport takes it, else queue it; never blocks."""
        if self.closed:
            return
        queue = self._queue
        write = self._write
        if not queue and write is not None and write(text):
            return
        if self._enqueue(queue, text) and self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    def deliver(self, text: str) -> None:
        """A publication: sent like a reply, or held while this client's own request is in flight."""
        held = self._held
        if held is None:
            self.send(text)
        elif not self.closed:
            self._enqueue(held, text)

    def _enqueue(self, queue: deque[str] | list[str], text: str) -> bool:
        if len(queue) >= self.service.settings.send_queue_size:
            self.close_soon(Close.POLICY_VIOLATION, SLOW_CONSUMER)
            return False
        queue.append(text)
        return True

    async def _drain(self) -> None:
        queue = self._queue
        try:
            while queue and not self.closed:
                await self.send_raw({"type": "websocket.send", "text": queue.popleft()})
        except Exception:  # noqa: BLE001 (the peer is gone, or a fault: either way this connection ends)
            log.warning("session %s: delivery failed", self.id, exc_info=True)
            await self.close(Close.INTERNAL_ERROR, INTERNAL_ERROR)
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

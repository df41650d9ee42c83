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

What a message type does is looked up in the dispatch table
(:mod:`secure_ws.core.dispatch`): the built-in types and the application's
handlers are entries of the same table. An application handler runs as its own
task, at most ``SECURE_WS_MAX_INFLIGHT`` at once per connection, so a slow one
never holds up the frames behind it; its reply is matched by ``id``.

Everything sent goes through :meth:`Session.send` (what the client asked for: replies, history, a
recovery's replay, call results) or :meth:`Session.deliver` (publications and pushes). When a text
cannot be written at once (no direct transport, the transport's buffer is full, or the text is large)
it waits in a queue drained by a task that exists only while the queue is non-empty, so an idle
connection carries no extra task. The queue is bounded in bytes (``SECURE_WS_SEND_QUEUE_BYTES``),
counting what the transport's write buffer already holds: past the bound a delivery cuts the client
as a ``slow consumer``, while a reply is still queued but the client's next frame is not read until
the backlog is back to half the bound (what TCP does to a sender whose peer does not read). A
client's own replies therefore never count against its deliveries' bound (``_grace``), so a
recovering client with several large replays is paced, never cut.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from sys import getsizeof
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..auth.scopes import Grants
from ..auth.tokens import Principal
from ..state.storage import Position
from ..wire.closes import (
    BINARY_REFUSED,
    CONNECTION_REFUSED,
    EXPIRED,
    INTERNAL_ERROR,
    MESSAGE_TOO_BIG,
    RATE_LIMIT_EXCEEDED,
    SERVICE_UNAVAILABLE,
    SLOW_CONSUMER,
    Close,
)
from ..wire.messages import (
    BAD_REQUEST,
    FORBIDDEN,
    RATE_LIMITED,
    UNAVAILABLE,
    ProtocolError,
    decode,
    encode,
    error,
    reply,
)
from . import reject
from .channel_hooks import HookFailed
from .context import Context
from .reject import Reject
from .types import Chunks, Hook, Invoke, Request, SessionDeps

Delivery = tuple[str, str, int, str]  # (text, channel, offset, epoch) of a held publication ("", 0, "" for a push)

if TYPE_CHECKING:
    from .handlers import Handler

log = logging.getLogger("secure_ws.session")

# Why a call's task was cancelled, as its cancel message: it then answers `timeout` or `cancelled` (a task
# cancelled without one is the connection closing). Its deadline then reads as never.
_TIMED_OUT = "secure_ws: handler timeout"
_CANCELLED = "secure_ws: cancelled by the client"
_NEVER = float("inf")
_CHUNKS_PER_TURN = 63  # a stream lets the event loop run other work after each 64 chunks (a mask: 2^n - 1)


class _Call:
    """A running application call: its ``id`` (for ``cancel``), its deadline, the end of its life if it streams
    (loop time), and why it was stopped, if it was."""

    __slots__ = ("id", "deadline", "end", "stop")

    def __init__(self, id: Any, deadline: float) -> None:
        self.id = id
        self.deadline = deadline
        self.end = _NEVER
        self.stop: str | None = None

# The scope extension under which a server offers the direct frame path (secure_ws.uvicorn.ws_protocol does),
# and the key of a `websocket.receive` that carries, instead of text, what the frame handler left to await.
DIRECT = "secure_ws.direct"
WORK = "secure_ws.work"


class Session:
    __slots__ = (
        "deps",
        "send_raw",
        "principal",
        "grants",
        "id",
        "closed",
        "channels",
        "_write",
        "_write_frame",
        "_sub",
        "_keys",
        "_limiter",
        "_max_bytes",
        "_limit",
        "_half",
        "_queued",
        "_grace",
        "_buffered",
        "_waiters",
        "_timer",
        "_closer",
        "_queue",
        "_held",
        "_floors",
        "_drainer",
        "_rejections",
        "_frames",
        "_sampled",
        "_routes",
        "_fallback",
        "_calls",
        "_call_timer",
        "_context",
        "_holds",
        "path_params",
        "server_channels",
    )

    def __init__(self, deps: SessionDeps, send: Any, principal: Principal) -> None:
        self.deps = deps
        self.send_raw = send
        self.principal = principal
        self.grants = Grants(principal.scopes)
        self.id = secrets.token_hex(8)
        self.closed = False
        self.channels: set[str] = set()
        self._write: Callable[[str], bool] | None = None
        self._write_frame: Callable[[bytes, bool], bool] | None = None  # the direct transport's, for a frame built once
        self._buffered: Callable[[], int] | None = None  # the direct transport's write buffer size, in bytes
        self._sub = principal.sub  # refresh keeps the sub, so the limiter's keys are fixed per connection
        self._limiter = deps.limiter
        self._keys = self._limiter.keys(self._sub)
        self._max_bytes = deps.settings.max_message_bytes
        # Bytes a client may leave unread (queued here, held, and in the transport's write buffer): past it a
        # delivery cuts it as a slow consumer, and a reply pauses reading its frames until the backlog is at half.
        self._limit = deps.settings.send_queue_bytes
        self._half = self._limit // 2
        self._queued = 0  # what the texts in _queue and _held take in memory (sys.getsizeof: header + characters)
        # Bytes of this client's own replies queued since the backlog was last at half or less: they are paced by
        # not reading the client, so they do not count against the bound its deliveries meet (≤ the bound + one
        # reply + the results of SECURE_WS_MAX_INFLIGHT calls, see send()).
        self._grace = 0
        # Futures of writable() (and of a paused read), resolved once the backlog is at half or the session ends.
        self._waiters: list[asyncio.Future[None]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.Task[None] | None = None
        self._queue: deque[str] = deque()
        # Publications that arrive while a request waits on storage: (text, channel, offset, epoch).
        self._held: list[Delivery] | None = None
        # channel → the position a subscribe told this client (and recovered it to): a publication at or before it
        # that arrives later is a duplicate, dropped. Each entry goes with the first publication past it; at most
        # one per held channel (recovered_to prunes), None when empty so that deliver() pays one test.
        self._floors: dict[str, Position] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._rejections = 0
        self._frames = 0
        self._sampled = 0.0  # perf_counter() at the start of a sampled frame, else 0
        self._routes = deps.routes
        self._fallback = deps.fallback
        # Running application calls, at most max_inflight; one timer for all of their deadlines.
        self._calls: dict[asyncio.Task[None], _Call] = {}
        self._call_timer: asyncio.TimerHandle | None = None
        self._context: Context | None = None
        self._holds = 0  # how many holds (hold()) are open: deliveries are held while any is
        self.path_params: dict[str, Any] = {}  # of SecureWS(path="/ws/{tenant}"), set by the app
        # Channels the server subscribed this connection to (Context.subscribe): kept whatever a refresh's scope
        # says. None until the first; at most SECURE_WS_MAX_SUBSCRIPTIONS entries (held channels only).
        self.server_channels: set[str] | None = None

    # -- lifecycle -----------------------------------------------------------------

    @property
    def context(self) -> Context:
        context = self._context
        if context is None:
            context = self._context = Context(self)
        return context

    async def run(self, receive: Any, subprotocol: str | None, direct: Any = None) -> None:
        """Serve the connection; ``direct`` is secure_ws.uvicorn.ws_protocol's protocol when it is the server."""
        deps = self.deps
        if (await receive())["type"] != "websocket.connect":
            return
        if direct is not None:  # before the accept, so the first frame already meets our message limit
            self._write = direct.attach(self.frame, self._max_bytes)
            self._write_frame = direct.write_frame
            self._buffered = direct.buffered
        await self.send_raw({"type": "websocket.accept", "subprotocol": subprotocol})
        deps.hub.add(self)
        metrics.CONNECTIONS.inc()
        log.info("session %s sub=%s open", self.id, self._sub, extra=self.log_fields("open"))
        self._arm_timer()
        admitted = False
        try:
            # The hooks run before the welcome, and what they push waits behind it: a client refused
            # by on_connect never sees a welcome, and one admitted sees the welcome first.
            self.hold()
            admitted = not deps.on_connect or await self._hooks(deps.on_connect, "on_connect")
            if not admitted:
                return
            self.send(
                encode(
                    {
                        "type": "welcome",
                        "sub": self._sub,
                        "connection_id": self.id,
                        "expires_at": self.principal.exp,
                        "rate_limit": deps.settings.rate_limit,
                    }
                )
            )
            self.unhold()
            code = await self._loop(receive)
            log.info(
                "session %s sub=%s disconnected %s", self.id, self._sub, code,
                extra=self.log_fields("disconnect", code),
            )
        finally:
            self.closed = True
            self._wake()
            if direct is not None:
                direct.attach(None)
            if self._timer is not None:
                self._timer.cancel()
            if self._drainer is not None:
                self._drainer.cancel()
            if self._call_timer is not None:
                self._call_timer.cancel()
            for call in tuple(self._calls):
                call.cancel()
            metrics.CONNECTIONS.dec()
            try:
                await deps.hub.remove(self)
            except Exception:  # noqa: BLE001 (cleanup must finish; the hub state is local and already updated)
                log.warning("session %s: cleanup failed", self.id, exc_info=True)
            if admitted and deps.on_disconnect:
                await self._hooks(deps.on_disconnect, "on_disconnect")

    async def _hooks(self, hooks: Sequence[Hook], name: str) -> bool:
        """Run the application's hooks in order, each within the handler timeout. False, and the connection
        closed, if one refused (1008 ``connection refused``) or failed (1011)."""
        for hook in hooks:
            try:
                async with asyncio.timeout(self.deps.settings.handler_timeout):
                    await hook(self.context)
            except Reject as exc:
                log.info("session %s: %s refused: %s", self.id, name, exc.code, extra=self.log_fields("connect_refused"))
                await self.close(Close.POLICY_VIOLATION, CONNECTION_REFUSED)
                return False
            except HookFailed as exc:  # the RPC proxy's $connect had no usable answer: never let in unasked
                log.warning("session %s: %s: %s", self.id, name, exc, extra=self.log_fields("proxy_unavailable"))
                await self.close(Close.TRY_AGAIN_LATER, SERVICE_UNAVAILABLE)
                return False
            except Exception as exc:  # noqa: BLE001 (a fault of the application's must close this connection only)
                log.error("session %s: %s hook failed", self.id, name, exc_info=exc, extra=self.log_fields("hook_fault"))
                await self.close(Close.INTERNAL_ERROR, INTERNAL_ERROR)
                return False
        return True

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
                if self._queued:
                    paused = self._paused()
                    if paused is not None:
                        await paused

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
        work = self._accept(text)  # type: ignore[arg-type]
        if work is None and self._queued:
            return self._paused()
        return work

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
        if self._rejections >= self.deps.settings.rate_limit_close_after:
            return self.close(Close.POLICY_VIOLATION, RATE_LIMIT_EXCEEDED)
        return None

    def _accept(self, text: str) -> Awaitable[None] | None:
        self._rejections = 0
        sampled = not self._frames & 7  # 1 frame in 8: a fair latency distribution at an eighth of the cost
        self._frames += 1
        started = perf_counter() if sampled else 0.0
        try:
            request = decode(text)
            route = self._routes.get(request["type"])
            if route is None:
                route = self._fallback
            self._sampled = started
            work = route(self, request)
        except Exception as exc:  # noqa: BLE001 (a fault must close this connection only)
            return self._settle(exc, None)
        if work is not None:
            return work
        if sampled:
            metrics.FRAMES.observe(perf_counter() - started)
        return None

    async def waiting(self, request: Request, work: Awaitable[None]) -> None:
        """A built-in request that waits on storage or a key fetch, its reply kept in order with the frames."""
        started = self._sampled
        # Publications arriving meanwhile are held until the reply is out: a subscribed publisher
        # hears `published` before its own message, whether storage delivers it at once or via Redis.
        if not self._holds:  # hold(), inlined on this path
            self._held = []
        self._holds += 1
        try:
            await work
        except Exception as exc:  # noqa: BLE001 (a fault must close this connection only)
            settled = self._settle(exc, request.get("id"))
            if settled is not None:
                await settled
        finally:
            self.unhold()
        if started:
            metrics.FRAMES.observe(perf_counter() - started)

    def _settle(self, exc: Exception, id: Any) -> Awaitable[None] | None:
        """A request that raised: an error frame for the client's mistakes and for storage outages,
        a 1011 close (and the traceback in our log only) for a fault of ours."""
        if isinstance(exc, self.deps.unavailable):
            exc = self._storage_unavailable(id)
        if isinstance(exc, ProtocolError):
            self.send(error(exc.code, exc.message, exc.id))
            return None
        log.error("session %s: server fault", self.id, exc_info=exc, extra=self.log_fields("fault", Close.INTERNAL_ERROR))
        return self.close(Close.INTERNAL_ERROR, INTERNAL_ERROR)

    def _storage_unavailable(self, id: Any) -> ProtocolError:
        log.warning("session %s: storage unreachable", self.id, extra=self.log_fields("storage_unavailable"))
        return ProtocolError(UNAVAILABLE, "shared storage unreachable; retry shortly", id)

    # -- application calls -----------------------------------------------------------

    def call(self, request: Request, invoke: Invoke, handler: Handler | None = None, timeout_code: str = reject.TIMEOUT) -> None:
        """Start an application call (a handler, a stream, or the RPC proxy) as its own task; its reply comes when it ends."""
        id = request.get("id")
        if handler is not None:
            if handler.stream and id is None:
                raise ProtocolError(BAD_REQUEST, "a streamed call needs an 'id' (its chunks and result carry it)")
            if handler.scope is not None and not self.grants.allows(handler.scope):
                raise ProtocolError(FORBIDDEN, f"scope does not grant {handler.scope}", id)
        calls = self._calls
        limit = self.deps.settings.max_inflight
        if len(calls) >= limit:
            raise ProtocolError(reject.BUSY, f"at most {limit} calls at once per connection; retry when one is answered", id)
        loop = asyncio.get_running_loop()
        # The deadline is kept here rather than with asyncio.timeout(), which costs a timer (and a heap entry
        # left behind when cancelled) per call, and per chunk for a stream: one timer per connection, armed for
        # the earliest deadline, serves all of its calls.
        call = _Call(id, loop.time() + self.deps.settings.handler_timeout)
        task = loop.create_task(self._run_call(request, invoke, handler, timeout_code, call))
        calls[task] = call
        task.add_done_callback(self._call_done)
        self._set_deadline(call, call.deadline)

    def cancel(self, id: str | int) -> None:
        """The client's ``cancel``: every running call with this ``id`` ends with error ``cancelled`` (its task, and
        a stream's generator, are cancelled). An ``id`` no running call has is ignored: that call ended already."""
        for task, call in self._calls.items():  # at most SECURE_WS_MAX_INFLIGHT entries
            if call.stop is None and call.id == id:
                call.stop = _CANCELLED
                task.cancel(_CANCELLED)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._calls.pop(task, None)  # already gone when the call answered

    def _set_deadline(self, call: _Call, deadline: float) -> None:
        call.deadline = deadline
        timer = self._call_timer
        if timer is None or deadline < timer.when():
            if timer is not None:
                timer.cancel()
            self._call_timer = asyncio.get_running_loop().call_at(deadline, self._expire_calls)

    def _expire_calls(self) -> None:
        """Cancel the calls past their deadline (they answer ``timeout``); re-arm for the next one. Stream deadlines
        move on with every chunk, so the timer may fire early: it then only re-arms."""
        self._call_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = _NEVER
        for task, call in self._calls.items():
            deadline = call.deadline
            if deadline <= now:
                if call.stop is None:
                    call.stop = _TIMED_OUT
                    task.cancel(_TIMED_OUT)
                call.deadline = _NEVER  # the timer passes over it while it unwinds
            elif deadline < earliest:
                earliest = deadline
        if earliest != _NEVER:
            self._call_timer = loop.call_at(earliest, self._expire_calls)

    async def _run_call(self, request: Request, invoke: Invoke, handler: Handler | None, timeout_code: str, call: _Call) -> None:
        id = call.id
        kind = request["type"]
        try:
            if handler is not None and handler.limiter is not None:
                retry_ms = await handler.limiter.hit(self._sub)
                if retry_ms:
                    metrics.STATS.rate_limited += 1
                    self._answer(error(RATE_LIMITED, f"rate limit for {kind} exceeded", id, retry_after_ms=retry_ms))
                    return
            data = request.get("data")
            if handler is not None and handler.validate is not None:
                data = handler.validate(data)
            if handler is not None and handler.stream:
                text = await self._stream(request, handler.func(self.context, data), call)  # type: ignore[arg-type]
            else:
                result = await invoke(self.context, data)
                # Encoded inside the try: a result JSON cannot carry (a lone surrogate, a non-string key…) is the
                # handler's fault, answered internal_error, never a task that dies unanswered.
                if type(result) is Chunks:
                    text = await self._stream(request, result.iterator, call, result.close)
                else:
                    text = reply(request, {"type": "result", "data": result})
        except asyncio.CancelledError:
            if call.stop is None:
                raise  # the connection is closing
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # answered, not cancelled
            text = ""
        except (Reject, ProtocolError) as exc:
            text = error(exc.code, exc.message, id)
        except self.deps.unavailable:
            refusal = self._storage_unavailable(id)
            text = error(refusal.code, refusal.message, id)
        except Exception as exc:  # noqa: BLE001 (the application's fault: this request fails, the connection stays)
            text = self._call_fault(kind, id, exc)
        if call.stop is not None:  # also when the handler caught its cancellation and answered anyway
            text = self._stopped(kind, call, timeout_code)
        self._answer(text)

    def _answer(self, text: str) -> None:
        """A call's terminal frame, sent once its slot is free: a request the client sends on reading it is never
        answered ``busy`` for want of a slot that this call still held (its task's done callback runs later)."""
        self._calls.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        self.send(text)

    async def _stream(
        self, request: Request, chunks: AsyncGenerator[Any, None], call: _Call, close: Callable[[], Awaitable[None]] | None = None
    ) -> str:
        """Send each value ``chunks`` yields as a ``chunk`` frame, advancing it only while the outbound queue has
        room (:meth:`writable`) and within the handler timeout per chunk and the stream timeout in all; returns
        the ``result`` frame. ``chunks`` is closed (its ``finally`` runs), then ``close`` called, however the call ends."""
        try:
            id = call.id
            if id is None:  # a proxied call whose backend answered with a stream
                raise ProtocolError(BAD_REQUEST, "a streamed call needs an 'id' (its chunks and result carry it)")
            settings = self.deps.settings
            timeout = settings.handler_timeout
            loop = asyncio.get_running_loop()
            end = call.end = call.deadline - timeout + settings.stream_timeout
            if end < call.deadline:
                self._set_deadline(call, end)
            seq = 0
            async for data in chunks:
                if call.stop is not None:
                    break  # the generator caught its cancellation and went on
                self.send(encode({"type": "chunk", "id": id, "seq": seq, "data": data}))
                seq += 1
                paused = self.writable()
                if paused is not None:
                    call.deadline = end  # a slow reader is not the generator's fault: only the stream's life counts
                    await paused
                elif not seq & _CHUNKS_PER_TURN:
                    # A generator that never awaits, read by a client that keeps up, would otherwise keep the loop
                    # (and this worker's other connections) until the socket's buffers fill.
                    await asyncio.sleep(0)
                self._set_deadline(call, min(loop.time() + timeout, end))
            return reply(request, {"type": "result", "data": {"chunks": seq}})
        finally:
            try:
                await chunks.aclose()
            finally:
                if close is not None:
                    await close()

    def _stopped(self, kind: str, call: _Call, timeout_code: str) -> str:
        """The terminal frame of a call that was cancelled by its client, or ran out of time."""
        if call.stop is _CANCELLED:
            return error(reject.CANCELLED, "cancelled", call.id)
        log.warning("session %s: %s timed out", self.id, kind, extra=self.log_fields("handler_timeout"))
        settings = self.deps.settings
        if asyncio.get_running_loop().time() >= call.end:
            return error(timeout_code, f"stream longer than {settings.stream_timeout:g}s", call.id)
        return error(timeout_code, f"no answer within {settings.handler_timeout:g}s", call.id)

    def _call_fault(self, kind: str, id: Any, exc: BaseException) -> str:
        log.error("session %s: handler %s raised", self.id, kind, exc_info=exc, extra=self.log_fields("handler_fault"))
        return error(reject.INTERNAL_ERROR, "internal error", id)

    # -- token -------------------------------------------------------------------------

    def renew(self, principal: Principal) -> None:
        """A refreshed token for the same sub: new rights, new deadline."""
        self.principal = principal
        self.grants = Grants(principal.scopes)
        self._arm_timer()

    def log_fields(self, event: str, code: int | None = None, reason: str | None = None) -> dict[str, Any]:
        return {"connection_id": self.id, "sub": self.principal.sub, "event": event, "close_code": code, "reason": reason}

    # -- deadline --------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = self.principal.exp + self.deps.settings.leeway - time.time()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self.close_soon, Close.POLICY_VIOLATION, EXPIRED)

    # -- output ----------------------------------------------------------------------

    def send(self, text: str) -> None:
        """What this client asked for (a reply, a replay, a call's result): written now if the transport takes it,
        else queued. Never cut: past the byte bound the client's frames wait instead (:meth:`_paused`)."""
        if self.closed:
            return
        queue = self._queue
        write = self._write
        if not queue and write is not None and write(text):
            return
        cost = getsizeof(text)
        self._queued += cost
        self._grace += cost
        self._enqueue(text)

    def deliver(
        self, text: str, channel: str = "", offset: int = 0, epoch: str = "", data: bytes | None = None, later: bool = False
    ) -> None:
        """A publication (with its channel, and its offset and epoch when the channel keeps history) or a push:
        sent, or held while this client's own built-in request (or the connect hook) is in flight; past the
        byte bound, the client is cut as a slow consumer. ``data``, if given, is ``text``'s WebSocket frame,
        built once for every subscriber: written as is when the transport takes it now (else ``text`` waits);
        ``later``: not the first publication of this loop turn, written with the turn's others at its end."""
        held = self._held
        if held is not None:
            if not self.closed and self._fits(text):
                held.append((text, channel, offset, epoch))
        elif self._floors is None or not offset or not self._stale(channel, offset, epoch):
            self._push(text, data, later)

    def _push(self, text: str, data: bytes | None = None, later: bool = False) -> None:
        if self.closed:
            return
        if not self._queue:  # else behind what waits, to keep this connection's order
            if data is not None:
                write_frame = self._write_frame
                if write_frame is not None and write_frame(data, later):
                    return
            else:
                write = self._write
                if write is not None and write(text):
                    return
        if self._fits(text):
            self._enqueue(text)

    def _enqueue(self, text: str) -> None:
        """Queue a text already counted in ``_queued``; the drainer runs while the queue is non-empty."""
        self._queue.append(text)
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    def _fits(self, text: str) -> bool:
        """Count a delivery about to be queued or held; False, and the client cut, if it is over the bound."""
        cost = getsizeof(text)
        if self._queued + cost + self._transport_bytes() > self._limit + self._grace:
            self.close_soon(Close.POLICY_VIOLATION, SLOW_CONSUMER)
            return False
        self._queued += cost
        return True

    def _transport_bytes(self) -> int:
        buffered = self._buffered
        return 0 if buffered is None else buffered()

    def writable(self) -> Awaitable[None] | None:
        """None when what this connection has not yet sent (queued, held, and in the transport's write buffer)
        is at most half of ``SECURE_WS_SEND_QUEUE_BYTES``; else a future that resolves once it is, or once the
        session ends. For producers that can wait (a stream's next chunk)."""
        # With nothing queued, the transport's buffer alone is under half: a write goes to it only while it holds
        # under its high-water mark (64 KiB), at most 64 Ki characters at a time, and the bound is at least 1 MiB.
        if not self._queued or self.closed or self._queued + self._transport_bytes() <= self._half:
            return None
        return self._waiter()

    def _paused(self) -> Awaitable[None] | None:
        """After a frame: None, or (the backlog over the bound) what to await before reading the next one."""
        if self.closed or self._queued + self._transport_bytes() <= self._limit:
            return None
        return self._waiter()

    def _waiter(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        waiters.append(future)  # bound: the receive loop and the running calls (≤ SECURE_WS_MAX_INFLIGHT) wait here
        return future

    def _eased(self) -> None:
        """Some of the backlog went out: at half the bound or less, its replies' grace ends and waiters go on."""
        if self._queued + self._transport_bytes() <= self._half:
            self._grace = 0
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            if not future.done():
                future.set_result(None)

    def recovered_to(self, channel: str, position: Position) -> None:
        """This client was told ``channel`` is at ``position`` (and sent every message up to it): drop later
        arrivals at or before it. Called while deliveries are held (inside :meth:`waiting`)."""
        floors = self._floors
        if floors is None:
            floors = self._floors = {}
        elif len(floors) >= len(self.channels):  # bound: entries of channels no longer held go
            for gone in [c for c in floors if c not in self.channels]:
                del floors[gone]
        floors[channel] = position

    def _stale(self, channel: str, offset: int, epoch: str) -> bool:
        floors = self._floors
        assert floors is not None
        floor = floors.get(channel)
        if floor is None:
            return False
        if epoch == floor.epoch and offset <= floor.offset:
            return True
        del floors[channel]  # publications come in offset order: no duplicate can follow this one
        if not floors:
            self._floors = None
        return False

    def hold(self) -> None:
        """Hold deliveries (publications, pushes) until the matching :meth:`unhold`: while a request waits, and
        while the server subscribes this connection (Context.subscribe, from a handler task beside the frames)."""
        if self._holds == 0:
            self._held = []
        self._holds += 1

    def unhold(self) -> None:
        self._holds -= 1
        if self._holds == 0:
            held, self._held = self._held, None
            self._release(held or [])

    def _release(self, held: list[Delivery]) -> None:
        if self.closed:
            return  # close() has already let go of their count
        for text, channel, offset, epoch in held:
            self._queued -= getsizeof(text)
            if self._floors is None or not offset or not self._stale(channel, offset, epoch):
                self._push(text)
        if self._waiters is not None:
            self._eased()

    async def _drain(self) -> None:
        queue = self._queue
        try:
            while queue and not self.closed:
                text = queue[0]  # left in the queue while it is written, so that nothing is written beside it
                await self.send_raw({"type": "websocket.send", "text": text})
                if queue:  # else close() emptied it meanwhile
                    queue.popleft()
                    self._queued -= getsizeof(text)
                    if self._grace or self._waiters is not None:
                        self._eased()
        except Exception:  # noqa: BLE001 (the peer is gone, or a fault: either way this connection ends)
            if not self.closed:
                log.warning("session %s: delivery failed", self.id, exc_info=True)
                await self.close(Close.INTERNAL_ERROR, INTERNAL_ERROR)
        finally:
            self._drainer = None

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._queued = self._grace = 0
        self._wake()
        metrics.closed(code, reason)
        log.info(
            "session %s sub=%s closed %d %s", self.id, self.principal.sub, code, reason,
            extra=self.log_fields("close", code, reason),
        )
        try:
            await self.send_raw({"type": "websocket.close", "code": code, "reason": reason})
        except Exception:  # already disconnected: nothing left to tell
            pass

    def close_soon(self, code: int, reason: str) -> None:
        """Close from a timer or another connection's event, without awaiting."""
        if not self.closed and self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self.close(code, reason))

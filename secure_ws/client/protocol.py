"""The client's side of the protocol, whatever carries the frames.

:class:`Protocol` owns everything that does not depend on how frames travel: request/reply matching by
``id``, streamed calls and their ``cancel``, subscriptions and their recovery (``offset``/``epoch``, ``since``),
pushes, join/leave events, and the routing of every inbound frame. It never reads or writes a socket: a
transport hands it one :class:`Link` per live connection and feeds it each inbound frame
(:meth:`Protocol._route`). Two transports use it: :class:`secure_ws.client.Client` (``websockets`` over the
network, with reconnects and refresh) and :mod:`secure_ws.testing` (in process), so a test's connection has the
very methods an application's client has.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .errors import ClientClosed, ConnectionLost, ProtocolViolation, RateLimited, RequestError, request_error
from .inbox import Chunks, MessageStream

log = logging.getLogger("secure_ws.client")

MessageHandler = Callable[[dict[str, Any]], Awaitable[None] | None]
RecoveryHandler = Callable[[str], Awaitable[None] | None]
PushHandler = Callable[[Any], Awaitable[None] | None]

_NO_DATA: Any = object()
# Dispatch-queue entry types no server frame can have (they hold a space).
_RECOVERY_FAILED = " recovery failed"
_PUSH = " push"
#: Pushes kept for the first pushes() iterator, made after they came.
MAX_EARLY_PUSHES = 100
#: Calls of the dispatch queue left unhandled before the oldest are dropped (a callback that never returns).
MAX_DISPATCH = 10_000


def valid_id(value: Any) -> bool:
    """An ``id`` a reply can be matched by: a string or an integer (not a bool, not a float, not a list)."""
    return isinstance(value, str) or (type(value) is int)


class Link:
    """One live connection, as the protocol sees it: how to send a text frame and to close, and the requests
    waiting on it. The transport makes one per connection and calls :meth:`lost` when it ends."""

    def __init__(self, send: Callable[[str], Awaitable[None]], close: Callable[[int, str], Awaitable[None]],
                 welcome: dict[str, Any]) -> None:
        self.send_text = send
        self.close = close
        self.welcome = welcome
        self.connection_id: str | None = welcome.get("connection_id")
        self.sub: str | None = welcome.get("sub")
        expires_at = welcome.get("expires_at")
        self.expires_at: float | None = expires_at if type(expires_at) in (int, float) else None
        # Requests waiting for their terminal frame: a future, or a streamed call's chunks. Insertion order is send
        # order (sends hold send_lock): the server answers frames in order, so an id-less rate_limited error belongs
        # to the oldest request not yet answered. Bounded by the application's own requests in flight.
        self.pending: dict[Any, asyncio.Future[dict[str, Any]] | Chunks] = {}
        self.send_lock = asyncio.Lock()
        self.closed: ConnectionLost | None = None

    def lost(self, exc: ConnectionLost) -> None:
        """The connection ended: every waiting request fails with ``exc``."""
        if self.closed is None:
            self.closed = exc
        for waiting in self.pending.values():
            if isinstance(waiting, Chunks):
                waiting.finish(self.closed)
            elif not waiting.done():
                waiting.set_exception(self.closed)
        self.pending.clear()


class Protocol:
    """Requests, streams, channels and pushes over whatever :class:`Link` is current (see the module docstring).

    Subclasses provide :meth:`_wait_ready` (the live link, waiting for one if needed) and ``_link`` (the current
    one or ``None``), and call :meth:`_start_dispatch` when they start and :meth:`_end_streams` when they stop.
    """

    _link: Link | None = None
    _reconnects = True  # a lost connection is followed by another (False: in process, one connection only)

    def __init__(
        self,
        *,
        on_message: MessageHandler | None = None,
        on_recovery_failed: RecoveryHandler | None = None,
        on_push: PushHandler | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        self.request_timeout = request_timeout
        self._on_message = on_message
        self._on_recovery_failed = on_recovery_failed
        self._on_push = on_push
        self._ids = itertools.count(1)
        # channel → join_leave: the channels kept subscribed, with what each asked for.
        self._channels: dict[str, bool] = {}
        # channel → (offset, epoch) of the last message seen (or where the server said the channel was): what a
        # re-subscribe asks to recover from. One entry per subscribed channel.
        self._positions: dict[str, tuple[int, str]] = {}
        #: How many times messages may have been missed for good (see ``on_recovery_failed``).
        self.recovery_failures = 0
        self._repairing: set[str] = set()  # channels being re-subscribed with `since` after skipped offsets
        self._repairs: set[asyncio.Task[bool]] = set()  # their tasks, referenced until done
        self._streams: weakref.WeakSet[MessageStream] = weakref.WeakSet()
        # Pushes that came before any pushes() iterator existed (an on_connect greeting comes right after the
        # welcome): kept for the first one, the newest MAX_EARLY_PUSHES; None once it exists.
        self._early_pushes: deque[dict[str, Any]] | None = deque(maxlen=MAX_EARLY_PUSHES)
        self._dispatch_queue: asyncio.Queue[dict[str, Any]] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    # -- what a transport provides and calls -----------------------------------------------

    async def _wait_ready(self) -> Link:
        raise NotImplementedError

    def _start_dispatch(self) -> None:
        """Start the task that runs the callbacks, one at a time and in order, if any was given."""
        if self._dispatcher is None and (self._on_message or self._on_recovery_failed or self._on_push):
            self._dispatch_queue = asyncio.Queue()
            self._dispatcher = asyncio.create_task(self._dispatch(), name="secure_ws.client.dispatch")

    def _end_streams(self, end: BaseException | None) -> None:
        """Terminal state: end every message and push stream (with ``end`` raised, or cleanly when None)."""
        for stream in list(self._streams):
            stream._finish(*(() if end is None else (end,)))
        if self._dispatcher is not None:
            self._dispatcher.cancel()

    def _route(self, link: Link | None, frame: dict[str, Any]) -> Awaitable[Any] | None:
        """One inbound frame (a JSON object). Returns what the reader must await before the next frame (a streamed
        call's buffer is full: reading waits, which is the backpressure), else None. Never raises for what a server
        sends: an unknown type, a foreign ``id`` or a malformed field is ignored."""
        kind = frame.get("type")
        if kind == "message":
            if self._follow(frame):
                self._deliver(frame)
            return None
        if kind == "push":
            self._push(frame)
            return None
        if kind == "join" or kind == "leave":
            if isinstance(frame.get("channel"), str):
                self._deliver(frame)
            return None
        id = frame.get("id")
        if not valid_id(id):
            id = None
        if kind == "chunk":
            waiting = link.pending.get(id) if link is not None and id is not None else None
            return waiting.push(frame) if isinstance(waiting, Chunks) else None
        if kind == "subscribed":
            self._subscribed(frame)
        if id is not None:
            entry = link.pending.pop(id, None) if link is not None else None
            if entry is not None:
                self._answer(entry, frame)
            return None
        if kind == "error" and frame.get("code") == "rate_limited" and link is not None:
            # The server drops a frame over the limit without reading it, so its error has no id; replies come in
            # order, so it is the oldest request not answered yet (a stream that sent chunks was answered).
            oldest = next((key for key, entry in link.pending.items() if not (isinstance(entry, Chunks) and entry.started)), None)
            if oldest is not None:
                self._answer(link.pending.pop(oldest), frame)
        elif kind == "error" and frame.get("code") == "forbidden" and isinstance(frame.get("channel"), str):
            # A refresh narrowed the scope: the server dropped this subscription.
            self._channels.pop(frame["channel"], None)
            log.warning("secure_ws: the refreshed token no longer grants subscribe:%s; dropped", frame["channel"])
        else:
            log.debug("secure_ws: ignored frame of type %r", kind)
        return None

    @staticmethod
    def _answer(entry: asyncio.Future[dict[str, Any]] | Chunks, frame: dict[str, Any]) -> None:
        if isinstance(entry, Chunks):
            entry.finish(frame)
        elif not entry.done():
            if frame.get("type") == "error":
                entry.set_exception(request_error(frame))
            else:
                entry.set_result(frame)

    # -- requests ------------------------------------------------------------------------

    async def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send ``message`` and return the reply that echoes its ``id``.

        An ``id`` is added when ``message`` has none. While disconnected, waits
        for the next connection. ``timeout`` (default ``request_timeout``)
        bounds the whole call and raises :exc:`TimeoutError`.

        Raises:
            RequestError: the server answered with an ``error`` frame
                (:exc:`RateLimited` when a rate limit dropped it).
            ConnectionLost: the connection closed before the reply.
            AuthenticationFailed, HandshakeRejected, ClientClosed: the client stopped.
        """
        async with asyncio.timeout(self.request_timeout if timeout is None else timeout):
            link = await self._wait_ready()
            return await self._call(link, message)

    async def call(self, type: str, data: Any = _NO_DATA, timeout: float | None = None) -> Any:
        """Call the application's handler for ``type`` with ``data``; return the ``data`` of its ``result``.

        Raises :exc:`RequestError` with the handler's ``code`` (``Reject(code, …)``, ``forbidden``, ``timeout``,
        ``busy``…), :exc:`RateLimited` with ``retry_after_ms``, :exc:`TimeoutError` past ``timeout``.
        """
        message: dict[str, Any] = {"type": type}
        if data is not _NO_DATA:
            message["data"] = data
        reply = await self.request(message, timeout)
        if reply.get("type") != "result":
            raise ProtocolViolation(f"a call was answered by a {str(reply.get('type'))[:64]!r} frame, not a result")
        return reply.get("data")

    async def stream(self, type: str, data: Any = _NO_DATA, timeout: float | None = None) -> AsyncIterator[Any]:
        """Call the streamed handler for ``type``; yield the ``data`` of each chunk as it comes::

            async for piece in client.stream("ai.complete", {"prompt": "hi"}):
                print(piece["text"])

        Leaving the loop early (``break``, an exception, ``aclose()``) sends ``{"type":"cancel","id":N}``: the
        server closes the generator. Its end is the server's ``result``; an ``error`` frame raises
        :exc:`RequestError` (``cancelled``, ``timeout``, a ``Reject`` code…). ``timeout`` bounds the wait for the
        connection and for each next chunk. Chunks not read yet are held (up to 64); past that the connection's
        reading waits for this loop, so a slow reader slows the server's generator instead of filling memory (and
        a reply this client awaits inside such a lagging loop waits behind those chunks).
        """
        message: dict[str, Any] = {"type": type}
        if data is not _NO_DATA:
            message["data"] = data
        wait = self.request_timeout if timeout is None else timeout
        async with asyncio.timeout(wait):
            link = await self._wait_ready()
            id, chunks = await self._open_stream(link, message)
        ended = False
        try:
            while True:
                async with asyncio.timeout(wait):
                    item = await chunks.next()
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                kind = item.get("type")
                if kind == "chunk":
                    yield item.get("data")
                    continue
                ended = True
                if kind == "error":
                    raise request_error(item)
                return
        finally:
            if not ended and link.pending.pop(id, None) is not None and link.closed is None:
                await self._cancel(link, id)

    async def _open_stream(self, link: Link, message: dict[str, Any]) -> tuple[Any, Chunks]:
        message = dict(message)
        id = message.setdefault("id", next(self._ids))
        chunks = Chunks()
        await self._send(link, message, id, chunks)
        return id, chunks

    async def _cancel(self, link: Link, id: Any) -> None:
        """Tell the server to end call ``id``; its ``error cancelled`` reply finds no waiter and is ignored."""
        try:
            async with link.send_lock:
                if link.closed is None:
                    await link.send_text(json.dumps({"type": "cancel", "id": id}))
        except Exception as exc:  # noqa: BLE001 (the connection is going: it cancels every call anyway)
            log.debug("secure_ws: cancel of %r not sent: %s", id, exc)

    async def _call(self, link: Link, message: dict[str, Any]) -> dict[str, Any]:
        message = dict(message)
        id = message.setdefault("id", next(self._ids))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        await self._send(link, message, id, future)
        # On timeout the future is cancelled but stays in ``pending`` until its reply
        # arrives, so the order used to place id-less rate_limited errors stays exact.
        return await future

    async def _send(self, link: Link, message: dict[str, Any], id: Any,
                    waiting: asyncio.Future[dict[str, Any]] | Chunks) -> None:
        if not valid_id(id):
            raise ValueError("a request's id must be a string or an integer")
        if id in link.pending:
            raise ValueError(f"a request with id {id!r} is already waiting for its reply")
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        async with link.send_lock:
            if link.closed is not None:
                raise ConnectionLost(link.closed.code, link.closed.reason)
            link.pending[id] = waiting
            try:
                await link.send_text(text)
            except ConnectionLost:
                link.pending.pop(id, None)
                raise

    async def _call_idempotent(self, message: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """:meth:`request`, resent on the next connection if the current one drops."""
        async with asyncio.timeout(self.request_timeout if timeout is None else timeout):
            while True:
                link = await self._wait_ready()
                try:
                    return await self._call(link, message)
                except ConnectionLost:
                    if not self._reconnects:
                        raise
                    continue

    async def ping(self, timeout: float | None = None) -> float:
        """An application-level ``ping``; returns the round trip in seconds."""
        started = time.perf_counter()
        await self.request({"type": "ping"}, timeout)
        return time.perf_counter() - started

    async def echo(self, data: Any, timeout: float | None = None) -> Any:
        """Send ``data`` and return what the server echoes back."""
        return (await self.request({"type": "echo", "data": data}, timeout)).get("data")

    async def publish(self, channel: str, data: Any, timeout: float | None = None) -> dict[str, Any]:
        """Publish ``data`` on ``channel`` (needs ``publish:<pattern>`` in the token's scope); returns the
        ``published`` frame. Not resent after a drop: :exc:`ConnectionLost` means "maybe published"."""
        return await self.request({"type": "publish", "channel": channel, "data": data}, timeout)

    async def history(self, channel: str, limit: int | None = None, since: dict[str, Any] | None = None,
                      timeout: float | None = None) -> dict[str, Any]:
        """The channel's kept publications: ``{"messages": [...], "offset": N, "epoch": E}`` (with ``since``, those
        after it, and ``"recovered"``). Needs the subscribe right on ``channel``."""
        message: dict[str, Any] = {"type": "history", "channel": channel}
        if limit is not None:
            message["limit"] = limit
        if since is not None:
            message["since"] = since
        reply = await self.request(message, timeout)
        return {k: v for k, v in reply.items() if k not in ("type", "id", "channel")}

    async def presence(self, channel: str, timeout: float | None = None) -> dict[str, Any]:
        """Who is subscribed to ``channel``: ``{"clients": {connection_id: {"sub": S}, …}}``. Needs the subscribe
        right on ``channel``."""
        reply = await self.request({"type": "presence", "channel": channel}, timeout)
        return {k: v for k, v in reply.items() if k not in ("type", "id", "channel")}

    # -- channels --------------------------------------------------------------------------

    @property
    def channels(self) -> frozenset[str]:
        """The channels this client keeps subscribed across reconnects."""
        return frozenset(self._channels)

    def position(self, channel: str) -> dict[str, Any] | None:
        """``{"offset": N, "epoch": E}`` of the last message seen on ``channel`` (or where the server said it was),
        ``None`` on a channel without history: save it, and pass it as ``subscribe(channel, since=…)`` to resume
        from there, in another process too."""
        known = self._positions.get(channel)
        return None if known is None else {"offset": known[0], "epoch": known[1]}

    async def subscribe(self, channel: str, since: dict[str, Any] | None = None, join_leave: bool = False,
                        timeout: float | None = None) -> dict[str, Any]:
        """Subscribe to ``channel``, and again after every reconnect, until :meth:`unsubscribe`; returns the
        ``subscribed`` frame (``offset``, ``epoch``, ``recovered``).

        ``since`` (``{"offset": N, "epoch": E}``, e.g. a saved :meth:`position`) asks for every message after it
        first; when the server cannot replay them (``recovered: false``) ``on_recovery_failed`` is called.
        ``join_leave=True`` also brings ``join``/``leave`` frames to :meth:`messages`. Raises :exc:`RequestError`
        (``forbidden``, ``bad_request``, ``limit_exceeded``) if the server refuses it.
        """
        if since is not None:
            offset, epoch = since.get("offset"), since.get("epoch")
            if type(offset) is not int or not isinstance(epoch, str):
                raise ValueError('since must be {"offset": <int>, "epoch": <str>}')
            self._positions[channel] = (offset, epoch)
        self._channels[channel] = join_leave  # first: a reconnect during this call re-subscribes it too
        try:
            return await self._call_idempotent(self._subscribe_frame(channel), timeout)
        except BaseException:
            self._channels.pop(channel, None)
            self._positions.pop(channel, None)
            raise

    def _subscribe_frame(self, channel: str) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "subscribe", "channel": channel}
        position = self._positions.get(channel)
        if position is not None:
            message["since"] = {"offset": position[0], "epoch": position[1]}
        if self._channels.get(channel):
            message["join_leave"] = True
        return message

    async def unsubscribe(self, channel: str, timeout: float | None = None) -> None:
        """Stop receiving ``channel`` and stop re-subscribing it."""
        self._channels.pop(channel, None)
        self._positions.pop(channel, None)
        await self._call_idempotent({"type": "unsubscribe", "channel": channel}, timeout)

    def messages(self, channel: str | None = None) -> MessageStream:
        """Channel frames (``{"type": "message", "channel", "from", "data", "offset", "epoch"}``, and
        ``join``/``leave`` on channels subscribed with ``join_leave=True``) as they arrive.

        ``channel`` keeps only that channel's. Buffering starts now, before the
        first ``async for`` step::

            stream = client.messages("room.lobby")
            await other.publish("room.lobby", "hi")
            message = await anext(stream)
        """
        return self._open(MessageStream(channel))

    def pushes(self) -> MessageStream:
        """The ``data`` of each push (``ctx.send``, ``api.send``, the server API's ``send``) as it arrives.
        Buffering starts now; the first iterator made also gets the pushes that came before it (the newest 100),
        such as those of the server's ``on_connect``."""
        stream = MessageStream(None, data_only=True)
        early, self._early_pushes = self._early_pushes, None
        for frame in early or ():
            stream._put(frame)
        return self._open(stream)

    def _open(self, stream: MessageStream) -> MessageStream:
        if self._error is not None:
            stream._finish(*(() if _clean_end(self._error) else (self._error,)))
        else:
            self._streams.add(stream)
        return stream

    async def _resubscribe(self, link: Link) -> bool:
        """Subscribe a new connection to every remembered channel; False if it dropped meanwhile."""
        for channel in list(self._channels):
            if not await self._resubscribe_one(link, channel):
                return False
        return True

    async def _resubscribe_one(self, link: Link, channel: str) -> bool:
        """Subscribe ``channel`` again, with ``since`` when a position is known; False if the connection dropped."""
        while channel in self._channels:
            try:
                await asyncio.wait_for(self._call(link, self._subscribe_frame(channel)), self.request_timeout)
                break
            except RateLimited as exc:
                await asyncio.sleep(max(exc.retry_after, 0.05))
            except RequestError as exc:
                self._channels.pop(channel, None)
                self._positions.pop(channel, None)
                log.warning("secure_ws: re-subscribing %s refused (%s); dropped", channel, exc.code)
            except ConnectionLost:
                return False
            except TimeoutError:
                log.warning("secure_ws: re-subscribing %s timed out; reconnecting", channel)
                await link.close(1011, "subscribe timed out")
                return False
        return True

    def _repair(self, channel: str) -> None:
        """Offsets skipped on a live connection (the server's pub/sub link dropped some): ask for them again with
        ``since``; what arrives past the gap meanwhile is dropped, the replay brings it in order."""
        link = self._link
        if link is None or channel in self._repairing:
            return  # without a connection, the reconnect re-subscribes with `since` anyway
        log.warning("secure_ws: offsets skipped on %s; recovering them", channel)
        self._repairing.add(channel)
        task = asyncio.get_running_loop().create_task(self._resubscribe_one(link, channel), name="secure_ws.client.repair")
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)
        task.add_done_callback(lambda _: self._repairing.discard(channel))

    def _follow(self, message: dict[str, Any]) -> bool:
        """Track the channel's position from a message; False for one already seen (never delivered twice)."""
        channel, offset, epoch = message.get("channel"), message.get("offset"), message.get("epoch")
        if not isinstance(channel, str) or type(offset) is not int or not isinstance(epoch, str):
            return True  # a channel without history
        if channel not in self._channels:
            return True
        known = self._positions.get(channel)
        if known is not None and known[1] == epoch:
            if offset <= known[0]:
                return False
            if offset > known[0] + 1:
                self._repair(channel)
                return False
        elif known is not None:
            self._recovery_failed(channel, "the server lost its history (new epoch)")
        self._positions[channel] = (offset, epoch)
        return True

    def _subscribed(self, frame: dict[str, Any]) -> None:
        """A ``subscribed`` reply: where the channel is, and whether a recovery worked."""
        channel, offset, epoch = frame.get("channel"), frame.get("offset"), frame.get("epoch")
        if not isinstance(channel, str) or channel not in self._channels:
            return
        recovered = frame.get("recovered")
        if recovered is False:
            self._recovery_failed(channel, "the server could not replay what was missed")
        if recovered is True or type(offset) is not int or not isinstance(epoch, str):
            return  # recovered: the replayed messages that follow move the position
        known = self._positions.get(channel)
        # A plain subscribe to a channel already followed leaves the position: messages in flight before this
        # reply are still to come, and are not duplicates.
        if recovered is False or known is None or known[1] != epoch:
            self._positions[channel] = (offset, epoch)

    def _recovery_failed(self, channel: str, why: str) -> None:
        self.recovery_failures += 1
        log.warning("secure_ws: messages on %s may have been missed: %s", channel, why)
        if self._on_recovery_failed is not None:
            self._queue_callback({"type": _RECOVERY_FAILED, "channel": channel})

    def _deliver(self, frame: dict[str, Any]) -> None:
        channel = frame.get("channel")
        for stream in list(self._streams):
            if not stream._data_only and (stream.channel is None or stream.channel == channel):
                stream._put(frame)
        if self._on_message is not None:
            self._queue_callback(frame)

    def _push(self, frame: dict[str, Any]) -> None:
        if self._early_pushes is not None:
            self._early_pushes.append(frame)
        for stream in list(self._streams):
            if stream._data_only:
                stream._put(frame)
        if self._on_push is not None:
            self._queue_callback({"type": _PUSH, "data": frame.get("data")})

    def _queue_callback(self, entry: dict[str, Any]) -> None:
        queue = self._dispatch_queue
        if queue is None:
            return
        if queue.qsize() >= MAX_DISPATCH:
            log.warning("secure_ws: callbacks are %d calls behind; dropped one", MAX_DISPATCH)
            return
        queue.put_nowait(entry)

    async def _dispatch(self) -> None:
        assert self._dispatch_queue is not None
        while True:
            entry = await self._dispatch_queue.get()
            kind = entry["type"]
            name = {_RECOVERY_FAILED: "on_recovery_failed", _PUSH: "on_push"}.get(kind, "on_message")
            result: Any = None
            try:
                if kind == _RECOVERY_FAILED:
                    result = self._on_recovery_failed(entry["channel"])  # type: ignore[misc]
                elif kind == _PUSH:
                    result = self._on_push(entry["data"])  # type: ignore[misc]
                elif self._on_message is not None:
                    result = self._on_message(entry)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 (an app bug must not stop the client)
                log.exception("secure_ws: %s raised", name)


def _clean_end(exc: BaseException) -> bool:
    return isinstance(exc, ClientClosed)

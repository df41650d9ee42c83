"""An asyncio client for secure_ws: authenticate, stay connected, talk JSON.

:class:`Client` opens a ``wss://`` connection with ``Authorization: Bearer <jwt>``
and keeps it alive for as long as you use it:

* it asks your **token provider** for a token on every connection attempt, so a
  reconnect never reuses a token that has expired in the meantime;
* it **refreshes in band** before the token expires (``{"type": "refresh"}``),
  so a long-lived connection is not cut at the token's ``exp``;
* it **reconnects** after a drop, a server restart or a recoverable refusal
  (``token expired``, ``too many connections``, ``rate limit exceeded``,
  ``slow consumer``, 1001/1011/1012/1013/1006…), waiting a jittered, bounded,
  exponentially growing delay between attempts;
* it **re-subscribes** every channel you subscribed once a new connection is up, **recovering** what
  was published meanwhile: it keeps the last ``offset`` and ``epoch`` it saw on each channel and
  re-subscribes with ``since``, so the server replays the missed messages before the live ones
  (SPEC §11); when that cannot be done (history lost, or the client was away too long) it calls
  ``on_recovery_failed(channel)`` so that the application reloads its state;
* it **stops** with :exc:`AuthenticationFailed` when the server refuses
  credentials that a fresh token cannot fix (``invalid token``, ``token revoked``,
  ``origin not allowed``, ``ambiguous credentials``, ``missing token``).

Typical use::

    import asyncio, ssl
    from secure_ws.client import Client

    async def main() -> None:
        tls = ssl.create_default_context(cafile="certs/ca.crt")    # dev CA; omit for a public CA
        async with Client("wss://localhost:8000/ws", get_token, ssl=tls) as client:
            print(await client.echo({"hello": "world"}))            # {'hello': 'world'}
            await client.subscribe("room.lobby")
            await client.publish("room.lobby", {"text": "hi"})
            async for message in client.messages("room.lobby"):
                print(message["from"], message["data"])

``get_token`` is any callable returning a JWT, plain or ``async`` — a call to
your identity provider, a read of a file that a sidecar keeps fresh… It is
called again for every connection and every refresh, and the token is never
logged.

Requests and replies are matched by ``id``: :meth:`Client.request` adds one
when the message has none and returns the reply that echoes it, or raises
:exc:`RequestError` for the ``error`` frame that does. A request that is in
flight when the connection drops raises :exc:`ConnectionLost`; it is not resent
(a ``publish`` may or may not have happened), except ``subscribe`` and
``unsubscribe``, which are idempotent and are retried on the next connection.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .wire.closes import AMBIGUOUS, INVALID, MISSING, ORIGIN_NOT_ALLOWED, REVOKED, Close  # the client needs only wire/

if TYPE_CHECKING:
    import ssl as _ssl

    from websockets.asyncio.client import ClientConnection

__all__ = [
    "Client",
    "ClientError",
    "AuthenticationFailed",
    "HandshakeRejected",
    "ConnectionLost",
    "ClientClosed",
    "RequestError",
    "RateLimited",
    "MessageStream",
    "backoff_delay",
    "FATAL_REASONS",
]

log = logging.getLogger("secure_ws.client")

TokenProvider = Callable[[], str | Awaitable[str]]
MessageHandler = Callable[[dict[str, Any]], Awaitable[None] | None]
RecoveryHandler = Callable[[str], Awaitable[None] | None]

#: 1008 close reasons that no fresh token can fix: the client stops instead of reconnecting.
FATAL_REASONS = frozenset({INVALID, REVOKED, ORIGIN_NOT_ALLOWED, AMBIGUOUS, MISSING})

#: HTTP statuses at the handshake that are worth retrying (anything else in 4xx stops the client).
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


# -- exceptions ------------------------------------------------------------------------------


class ClientError(Exception):
    """Base class of everything this module raises on purpose."""


class AuthenticationFailed(ClientError):
    """The server closed with 1008 and a reason that a fresh token cannot fix.

    The client does not reconnect after this. ``code`` and ``reason`` are the
    server's close code and reason, e.g. ``(1008, "token revoked")``.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"server refused the credentials: {code} {reason}")
        self.code = code
        self.reason = reason


class HandshakeRejected(ClientError):
    """The server answered the upgrade with an HTTP status that retrying will not change (e.g. 403, 404)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"server rejected the WebSocket handshake with HTTP {status}")
        self.status = status


class ConnectionLost(ClientError):
    """The connection closed while a request was waiting for its reply.

    The request may or may not have been processed. ``code`` and ``reason``
    describe the close (1006 and ``""`` when no close frame arrived).
    """

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(f"connection closed before the reply ({code} {reason})".rstrip())
        self.code = code
        self.reason = reason


class ClientClosed(ClientError):
    """The client was closed with :meth:`Client.close` (or its ``async with`` block ended)."""

    def __init__(self) -> None:
        super().__init__("the client is closed")


class RequestError(ClientError):
    """The server answered a request with ``{"type": "error", "code": …}``.

    ``code`` is one of ``bad_request``, ``unknown_type``, ``forbidden``, ``limit_exceeded``,
    ``rate_limited`` (see :exc:`RateLimited`); ``frame`` is the whole error frame.
    """

    def __init__(self, frame: dict[str, Any]) -> None:
        self.frame = frame
        self.code: str = str(frame.get("code", ""))
        self.message: str = str(frame.get("message", ""))
        super().__init__(f"{self.code}: {self.message}" if self.message else self.code)


class RateLimited(RequestError):
    """The request was dropped by the server's rate limit; retry after ``retry_after`` seconds."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(frame)
        self.retry_after: float = float(frame.get("retry_after_ms", 0)) / 1000.0


# -- backoff ---------------------------------------------------------------------------------


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """How long to wait before reconnect attempt number ``attempt`` (0 for the first retry).

    "Full jitter": a uniform draw in ``[0, min(maximum, initial * 2**attempt)]``.
    The ceiling doubles with each failed attempt up to ``maximum``; drawing
    anywhere below it spreads the clients of a restarted server over the whole
    window instead of having them all come back at the same instant.
    """
    ceiling = min(maximum, initial * 2.0 ** min(max(attempt, 0), 64))
    return (rng or random).uniform(0.0, ceiling)


# -- message streams -------------------------------------------------------------------------

_END = object()
_RECOVERY_FAILED = " recovery failed"  # a dispatch-queue entry's type no server frame can have (it has a space)


class MessageStream:
    """Channel messages as an async iterator; see :meth:`Client.messages`.

    Messages are buffered from the moment the stream is created, so create it
    before the publications you want to see. It ends when the client closes,
    and raises the client's fatal error (e.g. :exc:`AuthenticationFailed`) if
    it stops for one. Call :meth:`close` (or use ``async with``) to stop
    buffering a stream you no longer read; an unreferenced stream is dropped.
    """

    def __init__(self, channel: str | None) -> None:
        self.channel = channel
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._done = False

    def _put(self, item: Any) -> None:
        if not self._done:
            self._queue.put_nowait(item)

    def _finish(self, item: Any = _END) -> None:
        self._put(item)
        self._done = True

    def close(self) -> None:
        """Stop receiving; the iteration ends after what is already buffered."""
        self._finish()

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stay ended
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return item

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


# -- one live connection ---------------------------------------------------------------------


class _Connection:
    """State that lives and dies with one WebSocket connection."""

    def __init__(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.connection_id: str | None = welcome.get("connection_id")
        self.sub: str | None = welcome.get("sub")
        self.expires_at: float | None = welcome.get("expires_at")
        # Insertion order is send order (sends hold send_lock): the server answers frames in
        # order, so an id-less rate_limited error belongs to the oldest unanswered request.
        self.pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.send_lock = asyncio.Lock()
        self.closed: ConnectionLost | None = None

    def fail_pending(self, exc: BaseException) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)
        self.pending.clear()


class _QuietLogger(logging.LoggerAdapter):
    """The ``websockets`` logger without its DEBUG output, which would print the
    ``Authorization`` header and the ``refresh`` frames, i.e. the token."""

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (logging's name)
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


# -- the client ------------------------------------------------------------------------------


class Client:
    """A self-healing, authenticated connection to a secure_ws server.

    Args:
        url: ``wss://host:port/ws``. Plain ``ws://`` is refused (the token
            would travel in clear) unless ``allow_insecure=True``.
        token_provider: returns a JWT (``str``), or an awaitable of one. Called
            for every connection attempt and every in-band refresh. If it
            raises, the attempt counts as failed and is retried after a backoff.
        ssl: TLS context, e.g. ``ssl.create_default_context(cafile=...)`` for a
            private CA. ``None`` uses the system's trust store.
        refresh_before: send a ``refresh`` this many seconds before the token
            expires (or half-way through its remaining life, whichever is
            later, for tokens shorter than that). ``None`` or ``0`` disables
            refreshing: the server then closes with ``token expired`` and the
            client reconnects with a fresh token.
        backoff_initial, backoff_max: bounds of the reconnect delay; see
            :func:`backoff_delay`.
        stable_after: a connection that stayed up this many seconds resets the
            backoff to ``backoff_initial``.
        on_message: called with each channel message (``type == "message"``),
            one at a time, in order. It may be ``async`` and may use the client
            (it does not block the reading of replies). Exceptions are logged.
        on_recovery_failed: called with a channel's name when messages on it may
            have been missed for good: a re-subscribe (after a reconnect, or after
            live offsets skipped some) was answered ``recovered: false`` (the server's
            history no longer reaches back to the last message seen, or was lost), or
            a live message shows the history was lost (a new epoch). Called in order with
            ``on_message``, before the messages that follow the loss; reload the
            channel's state there. It may be ``async``; exceptions are logged.
        open_timeout: seconds allowed for TCP + TLS + upgrade + ``welcome``.
        request_timeout: default timeout of :meth:`request` and the helpers.
        rng: random source for the jitter (seed it in tests).
        allow_insecure: accept a ``ws://`` URL.
        connect_kwargs: passed to :func:`websockets.asyncio.client.connect`
            (``proxy``, ``ping_interval``, ``max_size``, ``additional_headers``…).
    """

    def __init__(
        self,
        url: str,
        token_provider: TokenProvider,
        *,
        ssl: _ssl.SSLContext | None = None,
        refresh_before: float | None = 30.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 10.0,
        on_message: MessageHandler | None = None,
        on_recovery_failed: RecoveryHandler | None = None,
        open_timeout: float = 10.0,
        request_timeout: float = 10.0,
        rng: random.Random | None = None,
        allow_insecure: bool = False,
        **connect_kwargs: Any,
    ) -> None:
        from websockets.uri import parse_uri

        if not parse_uri(url).secure and not allow_insecure:
            raise ValueError("the client sends a bearer token: use a wss:// URL (or allow_insecure=True)")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.url = url
        self._token_provider = token_provider
        self._ssl = ssl
        self.refresh_before = refresh_before if refresh_before and refresh_before > 0 else None
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self._on_message = on_message
        self._on_recovery_failed = on_recovery_failed
        self._rng = rng or random.Random()
        self._connect_kwargs = connect_kwargs

        self._ids = itertools.count(1)
        self._channels: set[str] = set()
        # channel → (offset, epoch) of the last message seen (or where the server said the channel was): what a
        # re-subscribe asks to recover from. One entry per subscribed channel.
        self._positions: dict[str, tuple[int, str]] = {}
        #: How many times messages may have been missed for good (see ``on_recovery_failed``).
        self.recovery_failures = 0
        self._repairing: set[str] = set()  # channels being re-subscribed with `since` after skipped offsets
        self._repairs: set[asyncio.Task[bool]] = set()  # their tasks, referenced until done
        self._streams: weakref.WeakSet[MessageStream] = weakref.WeakSet()
        self._conn: _Connection | None = None
        self._ready: asyncio.Future[_Connection] | None = None
        self._task: asyncio.Task[None] | None = None
        self._dispatch_queue: asyncio.Queue[dict[str, Any]] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._closing = False
        self._error: BaseException | None = None
        #: Number of connections that reached ``welcome`` so far.
        self.connections = 0
        #: ``(code, reason)`` of the last close the server sent (1006 when none arrived).
        self.last_close: tuple[int, str] | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is welcomed and its channels are re-subscribed."""
        ready = self._ready
        return ready is not None and ready.done() and ready.exception() is None and ready.result().closed is None

    @property
    def connection_id(self) -> str | None:
        """The server's id for the current connection (``None`` while disconnected)."""
        return self._conn.connection_id if self._conn else None

    @property
    def sub(self) -> str | None:
        """The ``sub`` the server authenticated on the current connection."""
        return self._conn.sub if self._conn else None

    @property
    def expires_at(self) -> float | None:
        """When the current connection's credentials expire (Unix time; moved by each refresh)."""
        return self._conn.expires_at if self._conn else None

    @property
    def welcome(self) -> dict[str, Any] | None:
        """The ``welcome`` frame of the current connection."""
        return self._conn.welcome if self._conn else None

    @property
    def channels(self) -> frozenset[str]:
        """The channels this client keeps subscribed across reconnects."""
        return frozenset(self._channels)

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, retrying as needed; return once the first connection is welcomed.

        Raises the fatal error (:exc:`AuthenticationFailed`, :exc:`HandshakeRejected`)
        if the client stops before that. To bound the wait, wrap it in
        ``asyncio.timeout()``; a cancelled ``start()`` closes the client.
        """
        if self._closing:
            raise ClientClosed()
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            if self._on_message is not None or self._on_recovery_failed is not None:
                self._dispatch_queue = asyncio.Queue()
                self._dispatcher = asyncio.create_task(self._dispatch_messages(), name="secure_ws.client.dispatch")
            self._task = asyncio.create_task(self._supervise(), name="secure_ws.client")
        try:
            await self._wait_ready()
        except asyncio.CancelledError:
            await self.close()
            raise

    async def run_forever(self) -> None:
        """Start if needed, then keep the connection up until :meth:`close`.

        Returns when the client is closed; raises the fatal error that stopped it.
        """
        await self.start()
        assert self._task is not None
        await asyncio.wait({self._task})
        if self._error is not None and not isinstance(self._error, ClientClosed):
            raise self._error

    async def close(self) -> None:
        """Close the connection (code 1000) and stop reconnecting. Idempotent."""
        if self._closing and (self._task is None or self._task.done()):
            return
        self._closing = True
        conn = self._conn
        if conn is not None:
            await conn.ws.close()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        self._stop(ClientClosed())

    def _stop(self, exc: BaseException) -> None:
        """Terminal state: wake every waiter with ``exc``."""
        if self._error is None:
            self._error = exc
        exc = self._error
        if self._ready is not None:
            if self._ready.done():
                self._ready = asyncio.get_running_loop().create_future()
            self._ready.set_exception(exc)
            self._ready.exception()  # retrieved: no "never retrieved" warning when nobody waits
        end = _END if isinstance(exc, ClientClosed) else exc
        for stream in list(self._streams):
            stream._finish(end)
        if self._dispatcher is not None:
            self._dispatcher.cancel()

    async def _wait_ready(self) -> _Connection:
        """The live connection, once welcomed and re-subscribed; waits across reconnects."""
        if self._ready is None:
            raise ClientError("the client is not started: use `async with Client(...)` or `await client.start()`")
        while True:
            conn = await asyncio.shield(self._ready)
            if conn.closed is None:
                return conn
            self._disconnected(conn)

    def _disconnected(self, conn: _Connection) -> None:
        """Make waiters wait for the next connection instead of getting ``conn``."""
        ready = self._ready
        if ready is not None and ready.done() and ready.exception() is None and ready.result() is conn:
            self._ready = asyncio.get_running_loop().create_future()

    # -- requests ------------------------------------------------------------------------

    async def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send ``message`` and return the reply that echoes its ``id``.

        An ``id`` is added when ``message`` has none. While disconnected, waits
        for the next connection. ``timeout`` (default ``request_timeout``)
        bounds the whole call and raises :exc:`TimeoutError`.

        Raises:
            RequestError: the server answered with an ``error`` frame
                (:exc:`RateLimited` when the rate limit dropped it).
            ConnectionLost: the connection closed before the reply.
            AuthenticationFailed, HandshakeRejected, ClientClosed: the client stopped.
        """
        async with asyncio.timeout(self.request_timeout if timeout is None else timeout):
            conn = await self._wait_ready()
            return await self._call(conn, message)

    async def _call(self, conn: _Connection, message: dict[str, Any]) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        message = dict(message)
        id = message.setdefault("id", next(self._ids))
        if id in conn.pending:
            raise ValueError(f"a request with id {id!r} is already waiting for its reply")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        async with conn.send_lock:
            if conn.closed is not None:
                raise ConnectionLost(conn.closed.code, conn.closed.reason)
            conn.pending[id] = future
            try:
                await conn.ws.send(text)
            except ConnectionClosed as exc:
                conn.pending.pop(id, None)
                raise _lost(exc) from None
        # On timeout the future is cancelled but stays in ``pending`` until its reply
        # arrives, so the order used to place id-less rate_limited errors stays exact.
        return await future

    async def _call_idempotent(self, message: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """:meth:`request`, resent on the next connection if the current one drops."""
        async with asyncio.timeout(self.request_timeout if timeout is None else timeout):
            while True:
                conn = await self._wait_ready()
                try:
                    return await self._call(conn, message)
                except ConnectionLost:
                    continue

    async def ping(self, timeout: float | None = None) -> float:
        """An application-level ``ping``; returns the round trip in seconds."""
        started = time.perf_counter()
        await self.request({"type": "ping"}, timeout)
        return time.perf_counter() - started

    async def echo(self, data: Any, timeout: float | None = None) -> Any:
        """Send ``data`` and return what the server echoes back."""
        return (await self.request({"type": "echo", "data": data}, timeout))["data"]

    async def publish(self, channel: str, data: Any, timeout: float | None = None) -> None:
        """Publish ``data`` on ``channel`` (needs ``publish:<pattern>`` in the token's scope).

        Not resent after a drop: :exc:`ConnectionLost` means "maybe published".
        """
        await self.request({"type": "publish", "channel": channel, "data": data}, timeout)

    async def subscribe(self, channel: str, timeout: float | None = None) -> None:
        """Subscribe to ``channel``, and again after every reconnect, until :meth:`unsubscribe`.

        Returns once the subscription is live. Raises :exc:`RequestError`
        (``forbidden``, ``bad_request``, ``limit_exceeded``) if the server refuses it.
        """
        self._channels.add(channel)  # first: a reconnect during this call re-subscribes it too
        try:
            await self._call_idempotent({"type": "subscribe", "channel": channel}, timeout)
        except BaseException:
            self._channels.discard(channel)
            self._positions.pop(channel, None)
            raise

    async def unsubscribe(self, channel: str, timeout: float | None = None) -> None:
        """Stop receiving ``channel`` and stop re-subscribing it."""
        self._channels.discard(channel)
        self._positions.pop(channel, None)
        await self._call_idempotent({"type": "unsubscribe", "channel": channel}, timeout)

    def messages(self, channel: str | None = None) -> MessageStream:
        """Channel messages (``{"type": "message", "channel", "from", "data"}``) as they arrive.

        ``channel`` keeps only that channel's. Buffering starts now, before the
        first ``async for`` step::

            stream = client.messages("room.lobby")
            await other.publish("room.lobby", "hi")
            message = await anext(stream)
        """
        stream = MessageStream(channel)
        if self._error is not None:
            stream._finish(_END if isinstance(self._error, ClientClosed) else self._error)
        else:
            self._streams.add(stream)
        return stream

    # -- the connection loop -------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                started = time.monotonic()
                welcomed = False
                retry_after = 0.0
                try:
                    welcomed, code, reason = await self._connect_once()
                except ClientError as exc:  # fatal by construction
                    self._stop(exc)
                    log.error("secure_ws client stopped: %s", exc)
                    return
                except Exception as exc:  # noqa: BLE001 (network, TLS, handshake, provider: all retried)
                    from websockets.exceptions import InvalidStatus

                    if isinstance(exc, InvalidStatus):
                        status = exc.response.status_code
                        if status not in _RETRYABLE_STATUS:
                            self._stop(HandshakeRejected(status))
                            log.error("secure_ws client stopped: handshake rejected with HTTP %d", status)
                            return
                        retry_after = _retry_after(exc.response.headers.get("Retry-After"))
                    log.warning("secure_ws connection attempt failed: %s", _describe(exc))
                else:
                    if self._closing:
                        return
                    if code == Close.POLICY_VIOLATION and reason in FATAL_REASONS:
                        self._stop(AuthenticationFailed(code, reason))
                        log.error("secure_ws client stopped: server closed %d %s", code, reason)
                        return
                    log.info("secure_ws connection closed %d %s; reconnecting", code, reason)
                if welcomed and time.monotonic() - started >= self.stable_after:
                    attempt = 0
                delay = max(retry_after, backoff_delay(attempt, self.backoff_initial, self.backoff_max, self._rng))
                attempt += 1
                log.info("secure_ws reconnecting in %.2fs (attempt %d)", delay, attempt)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            if not self._closing:
                raise
        except BaseException as exc:  # a bug here must not leave waiters hanging
            self._stop(exc)
            raise

    async def _connect_once(self) -> tuple[bool, int, str]:
        """One connection from handshake to close: (welcomed, close code, close reason)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        token = await self._token()
        kwargs: dict[str, Any] = {"open_timeout": self.open_timeout, "logger": _QuietLogger(logging.getLogger("secure_ws.client.websockets"), {})}
        kwargs.update(self._connect_kwargs)
        headers = dict(kwargs.pop("additional_headers", None) or {})
        headers["Authorization"] = f"Bearer {token}"
        del token
        if self._ssl is not None:
            kwargs["ssl"] = self._ssl
        async with asyncio.timeout(self.open_timeout):
            ws = await connect(self.url, additional_headers=headers, **kwargs)
            try:
                welcome = json.loads(await ws.recv())
            except ConnectionClosed as exc:
                await ws.close()
                lost = _lost(exc)
                self.last_close = (lost.code, lost.reason)
                return False, lost.code, lost.reason
            except BaseException:
                ws.transport.abort()
                raise
        if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
            ws.transport.abort()
            raise ValueError("the server's first frame is not a welcome")
        conn = _Connection(ws, welcome)
        self._conn = conn
        self.connections += 1
        log.info("secure_ws connected: sub=%s connection_id=%s", conn.sub, conn.connection_id)
        reader = asyncio.create_task(self._read(conn), name="secure_ws.client.read")
        refresher: asyncio.Task[None] | None = None
        try:
            if await self._resubscribe(conn) and self._ready is not None and not self._ready.done():
                self._ready.set_result(conn)
                if self.refresh_before is not None:
                    refresher = asyncio.create_task(self._refresh(conn), name="secure_ws.client.refresh")
            lost = await reader
            self.last_close = (lost.code, lost.reason)
            return True, lost.code, lost.reason
        finally:
            self._disconnected(conn)
            self._conn = None
            for task in (reader, refresher):
                if task is not None:
                    task.cancel()
            if conn.closed is None:
                conn.closed = ConnectionLost()
            conn.fail_pending(conn.closed)
            await ws.close()

    async def _token(self) -> str:
        token = self._token_provider()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise ClientError("the token provider must return a non-empty JWT string")
        return token

    async def _resubscribe(self, conn: _Connection) -> bool:
        """Subscribe the new connection to every remembered channel; False if it dropped meanwhile."""
        for channel in list(self._channels):
            if not await self._resubscribe_one(conn, channel):
                return False
        return True

    async def _resubscribe_one(self, conn: _Connection, channel: str) -> bool:
        """Subscribe ``channel`` again, with ``since`` when a position is known; False if the connection dropped."""
        while channel in self._channels:
            message: dict[str, Any] = {"type": "subscribe", "channel": channel}
            position = self._positions.get(channel)
            if position is not None:
                message["since"] = {"offset": position[0], "epoch": position[1]}
            try:
                await asyncio.wait_for(self._call(conn, message), self.request_timeout)
                break
            except RateLimited as exc:
                await asyncio.sleep(max(exc.retry_after, 0.05))
            except RequestError as exc:
                self._channels.discard(channel)
                self._positions.pop(channel, None)
                log.warning("secure_ws: re-subscribing %s refused (%s); dropped", channel, exc.code)
            except ConnectionLost:
                return False
            except TimeoutError:
                log.warning("secure_ws: re-subscribing %s timed out; reconnecting", channel)
                await conn.ws.close(1011, "subscribe timed out")
                return False
        return True

    def _repair(self, channel: str) -> None:
        """Offsets skipped on a live connection (the server's pub/sub link dropped some): ask for them again with
        ``since``; what arrives past the gap meanwhile is dropped, the replay brings it in order."""
        conn = self._conn
        if conn is None or channel in self._repairing:
            return  # without a connection, the reconnect re-subscribes with `since` anyway
        log.warning("secure_ws: offsets skipped on %s; recovering them", channel)
        self._repairing.add(channel)
        task = asyncio.get_running_loop().create_task(self._resubscribe_one(conn, channel), name="secure_ws.client.repair")
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)
        task.add_done_callback(lambda _: self._repairing.discard(channel))

    async def _read(self, conn: _Connection) -> ConnectionLost:
        """Route every inbound frame until the connection closes; return how it closed."""
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                raw = await conn.ws.recv()
                try:
                    frame = json.loads(raw)
                except ValueError:
                    log.warning("secure_ws: ignored a frame that is not JSON")
                    continue
                if isinstance(frame, dict):
                    self._route(conn, frame)
        except ConnectionClosed as exc:
            conn.closed = _lost(exc)
            self._disconnected(conn)
            conn.fail_pending(conn.closed)
            return conn.closed

    def _route(self, conn: _Connection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message":
            if self._follow(frame):
                self._deliver(frame)
            return
        if kind == "subscribed":
            self._subscribed(frame)
        id = frame.get("id")
        if id is not None:
            future = conn.pending.pop(id, None)
            if future is not None and not future.done():
                if kind == "error":
                    future.set_exception(RateLimited(frame) if frame.get("code") == "rate_limited" else RequestError(frame))
                else:
                    future.set_result(frame)
            return
        if kind == "error" and frame.get("code") == "rate_limited" and conn.pending:
            # The server drops a frame over the limit without reading it, so its error has
            # no id; replies come in order, so it is the oldest request still waiting.
            oldest = next(iter(conn.pending))
            future = conn.pending.pop(oldest)
            if not future.done():
                future.set_exception(RateLimited(frame))
        elif kind == "error" and frame.get("code") == "forbidden" and "channel" in frame:
            # A refresh narrowed the scope: the server dropped this subscription.
            self._channels.discard(frame["channel"])
            log.warning("secure_ws: the refreshed token no longer grants subscribe:%s; dropped", frame["channel"])
        else:
            log.debug("secure_ws: ignored frame of type %r", kind)

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
        if self._on_recovery_failed is not None and self._dispatch_queue is not None:
            self._dispatch_queue.put_nowait({"type": _RECOVERY_FAILED, "channel": channel})

    def _deliver(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        for stream in list(self._streams):
            if stream.channel is None or stream.channel == channel:
                stream._put(message)
        if self._dispatch_queue is not None and self._on_message is not None:
            self._dispatch_queue.put_nowait(message)

    async def _dispatch_messages(self) -> None:
        assert self._dispatch_queue is not None
        while True:
            message = await self._dispatch_queue.get()
            try:
                if message["type"] == _RECOVERY_FAILED:
                    assert self._on_recovery_failed is not None
                    result = self._on_recovery_failed(message["channel"])
                else:
                    assert self._on_message is not None
                    result = self._on_message(message)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 (an app bug must not stop the client)
                log.exception("secure_ws: %s raised", "on_recovery_failed" if message["type"] == _RECOVERY_FAILED else "on_message")

    async def _refresh(self, conn: _Connection) -> None:
        """Keep ``conn`` authenticated: swap in a fresh token before each deadline."""
        assert self.refresh_before is not None
        retry = False
        while conn.expires_at is not None:
            remaining = conn.expires_at - time.time()
            delay = max(remaining - self.refresh_before, remaining / 2, 0.0)
            await asyncio.sleep(max(delay, 1.0) if retry else delay)
            retry = True
            try:
                token = await self._token()
                reply = await asyncio.wait_for(self._call(conn, {"type": "refresh", "token": token}), self.request_timeout)
                del token
            except ConnectionLost:
                return
            except RateLimited as exc:
                await asyncio.sleep(exc.retry_after)
                continue
            except Exception as exc:  # noqa: BLE001 (provider down, timeout: try again before the deadline)
                log.warning("secure_ws: token refresh failed: %s", _describe(exc))
                continue
            expires_at = reply.get("expires_at")
            if not isinstance(expires_at, (int, float)) or expires_at <= conn.expires_at:
                log.warning(
                    "secure_ws: the refreshed token does not extend the deadline; "
                    "the server will close with 'token expired' and the client will reconnect"
                )
                return
            conn.expires_at = expires_at
            retry = False
            log.debug("secure_ws: token refreshed, expires_at=%s", expires_at)


def _lost(exc: Any) -> ConnectionLost:
    """A ConnectionLost from a websockets ConnectionClosed (1006 when no close frame came)."""
    rcvd = getattr(exc, "rcvd", None)
    if rcvd is None:
        return ConnectionLost(1006, "")
    return ConnectionLost(rcvd.code, rcvd.reason)


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

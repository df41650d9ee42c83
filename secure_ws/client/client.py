"""The network transport: :class:`Client`, over ``websockets``, with reconnects, backoff and in-band refresh."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..wire.closes import Close
from .backoff import backoff_delay
from .errors import FATAL_REASONS, AuthenticationFailed, ClientClosed, ClientError, ConnectionLost, HandshakeRejected, ProtocolViolation, RateLimited
from .protocol import Link, MessageHandler, Protocol, PushHandler, RecoveryHandler

if TYPE_CHECKING:
    import ssl as _ssl

    from websockets.asyncio.client import ClientConnection

log = logging.getLogger("secure_ws.client")

TokenProvider = Callable[[], str | Awaitable[str]]

#: HTTP statuses at the handshake that are worth retrying (anything else in 4xx stops the client).
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class _QuietLogger(logging.LoggerAdapter):
    """The ``websockets`` logger without its DEBUG output, which would print the
    ``Authorization`` header and the ``refresh`` frames, i.e. the token."""

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (logging's name)
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


# -- the client ------------------------------------------------------------------------------


class Client(Protocol):
    """A self-healing, authenticated connection to a secure_ws server; its requests, streams, channels and
    pushes are :class:`~secure_ws.client.protocol.Protocol`'s.

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
        backoff_initial: the first reconnect delay's bound; see :func:`backoff_delay`.
        backoff_max: the largest reconnect delay.
        stable_after: a connection that stayed up this many seconds resets the
            backoff to ``backoff_initial``.
        on_message: called with each channel message (``type == "message"``, and
            ``join``/``leave`` on channels subscribed with ``join_leave=True``),
            one at a time, in order. It may be ``async`` and may use the client
            (it does not block the reading of replies). Exceptions are logged.
        on_push: called with the ``data`` of each push, in order with ``on_message``;
            ``async`` or not; exceptions are logged. (Or iterate :meth:`pushes`.)
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
        on_push: PushHandler | None = None,
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
        super().__init__(on_message=on_message, on_recovery_failed=on_recovery_failed, on_push=on_push,
                         request_timeout=request_timeout)
        self.url = url
        self._token_provider = token_provider
        self._ssl = ssl
        self.refresh_before = refresh_before if refresh_before and refresh_before > 0 else None
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.open_timeout = open_timeout
        self._rng = rng or random.Random()
        self._connect_kwargs = connect_kwargs
        self._ready: asyncio.Future[Link] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
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
        return self._link.connection_id if self._link else None

    @property
    def sub(self) -> str | None:
        """The ``sub`` the server authenticated on the current connection."""
        return self._link.sub if self._link else None

    @property
    def expires_at(self) -> float | None:
        """When the current connection's credentials expire (Unix time; moved by each refresh)."""
        return self._link.expires_at if self._link else None

    @property
    def welcome(self) -> dict[str, Any] | None:
        """The ``welcome`` frame of the current connection."""
        return self._link.welcome if self._link else None

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
            self._start_dispatch()
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
        link = self._link
        if link is not None:
            await link.close(1000, "")
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
        self._end_streams(None if isinstance(exc, ClientClosed) else exc)

    async def _wait_ready(self) -> Link:
        """The live connection, once welcomed and re-subscribed; waits across reconnects."""
        if self._ready is None:
            raise ClientError("the client is not started: use `async with Client(...)` or `await client.start()`")
        while True:
            link = await asyncio.shield(self._ready)
            if link.closed is None:
                return link
            self._disconnected(link)

    def _disconnected(self, link: Link) -> None:
        """Make waiters wait for the next connection instead of getting ``link``."""
        ready = self._ready
        if ready is not None and ready.done() and ready.exception() is None and ready.result() is link:
            self._ready = asyncio.get_running_loop().create_future()

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
                first = await ws.recv()
            except ConnectionClosed as exc:
                await ws.close()
                lost = _lost(exc)
                self.last_close = (lost.code, lost.reason)
                return False, lost.code, lost.reason
            except BaseException:
                ws.transport.abort()
                raise
        try:
            welcome = json.loads(first)
        except ValueError:
            welcome = None
        if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
            ws.transport.abort()
            raise ProtocolViolation("the server's first frame is not a welcome: not a secure_ws server?")  # fatal

        async def close(code: int, reason: str) -> None:
            await ws.close(code, reason)

        link = Link(self._sender(ws), close, welcome)
        self._link = link
        self.connections += 1
        log.info("secure_ws connected: sub=%s connection_id=%s", link.sub, link.connection_id)
        reader = asyncio.create_task(self._read(link, ws), name="secure_ws.client.read")
        refresher: asyncio.Task[None] | None = None
        try:
            if await self._resubscribe(link) and self._ready is not None and not self._ready.done():
                self._ready.set_result(link)
                if self.refresh_before is not None:
                    refresher = asyncio.create_task(self._refresh(link), name="secure_ws.client.refresh")
            lost = await reader
            self.last_close = (lost.code, lost.reason)
            return True, lost.code, lost.reason
        finally:
            self._disconnected(link)
            self._link = None
            for task in (reader, refresher):
                if task is not None:
                    task.cancel()
            link.lost(ConnectionLost())  # keeps the close the reader saw, if any
            await ws.close()

    @staticmethod
    def _sender(ws: ClientConnection) -> Callable[[str], Awaitable[None]]:
        from websockets.exceptions import ConnectionClosed

        async def send(text: str) -> None:
            try:
                await ws.send(text)
            except ConnectionClosed as exc:
                raise _lost(exc) from None

        return send

    async def _token(self) -> str:
        token = self._token_provider()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise ClientError("the token provider must return a non-empty JWT string")
        return token

    async def _read(self, link: Link, ws: ClientConnection) -> ConnectionLost:
        """Route every inbound frame until the connection closes; return how it closed."""
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                raw = await ws.recv()
                try:
                    frame = json.loads(raw)
                except ValueError:
                    log.warning("secure_ws: ignored a frame that is not JSON")
                    continue
                if isinstance(frame, dict):
                    wait = self._route(link, frame)
                    if wait is not None:
                        await wait
                else:
                    log.warning("secure_ws: ignored a frame that is not a JSON object")
        except ConnectionClosed as exc:
            lost = _lost(exc)
            self._disconnected(link)
            link.lost(lost)
            return lost

    async def _refresh(self, conn: Link) -> None:
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

"""Test an application in process: its real handshake, scopes, limits, dispatch and channels, without TLS, a port,
``certs/`` or any ``SECURE_WS_*`` variable, under any async test runner (pytest-asyncio, anyio, plain asyncio)::

    from secure_ws.client import RequestError
    from secure_ws.testing import TestServer

    async def test_create_order():
        async with TestServer(myapp.api) as server:                 # memory storage, its own fresh key
            async with server.connect(sub="alice", scope="orders:write") as ws:
                assert await ws.call("orders.create", {"items": [1]}) == {"order_id": 42}
                with pytest.raises(RequestError) as e:
                    await ws.call("orders.create", {})
                assert e.value.code == "empty_order"

:class:`TestServer` runs the application's own ASGI app (``api.app``) through its lifespan and then one WebSocket
scope per :meth:`TestServer.connect`, with ASGI messages passed in memory: the frames are the wire's, every
check on the way is the server's. Its connections are :class:`Connection` objects, which share the Python
client's protocol code (:class:`secure_ws.client.Protocol`), so they have the client's methods: ``call``,
``stream``, ``subscribe``, ``publish``, ``messages``, ``pushes``, ``history``, ``presence``, ``request``, ``close``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

from .app import SecureWS
from .auth.signing import SigningKeys, issue_token
from .client.errors import FATAL_REASONS, AuthenticationFailed, ClientError, ConnectionLost, ConnectionRefused, HandshakeRejected
from .client.protocol import Link, MessageHandler, Protocol, PushHandler, RecoveryHandler
from .service import Service
from .settings import Settings, load_settings

__all__ = ["TestServer", "Connection"]

#: ASGI messages a connection's side may queue for the app before its sends wait: what a socket buffer holds.
INBOUND_BOUND = 256
#: How long a closing connection, or the lifespan, may take before the test is told.
CLOSE_TIMEOUT = 10.0


class TestServer:
    """``async with TestServer(api) as server:`` serves ``api`` (a :class:`~secure_ws.SecureWS`) in process.

    Settings are the defaults, with ``env`` (``{"SECURE_WS_RATE_LIMIT": "3/second"}``…) on top; never the
    environment or ``.env``, so a test sees the same server everywhere. Storage is ``memory://``, and the tokens are
    signed by a key made for this server and verified by it alone (files in a temporary folder, removed on exit).
    While it runs, ``api.publish``/``api.send``/``api.disconnect`` act on it.
    """

    __test__ = False  # a name pytest would otherwise collect

    def __init__(self, api: SecureWS, env: Mapping[str, str] | None = None) -> None:
        self.api = api
        self._env = dict(env or {})
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._previous: Service | None = None
        self._lifespan: _Lifespan | None = None
        self._clients = 0
        self.settings: Settings | None = None
        self.service: Service | None = None

    async def __aenter__(self) -> TestServer:
        self._folder = tempfile.TemporaryDirectory(prefix="secure-ws-test-")
        folder = Path(self._folder.name)
        settings = dataclasses.replace(
            load_settings(self._env, env_file=None),
            jwks_file=folder / "jwks.json", signing_keys_file=folder / "signing-keys.json", jwks_url=None,
            jwt_secret=None, algorithms=("EdDSA",), storage_url="memory://", revocation_file=folder / "revocations.json",
            api_keys_file=folder / "api-keys.json", demo=False, internal_port=None,
        )
        SigningKeys(settings).rotate("EdDSA")
        self.settings = settings
        self.service = Service(settings, self.api.registry)
        self._previous = self.api.use(self.service)
        self._lifespan = _Lifespan(self.api.app)
        try:
            await self._lifespan.start()
        except BaseException:
            await self._restore()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._lifespan is not None:
                await self._lifespan.stop()
        finally:
            await self._restore()

    async def _restore(self) -> None:
        self.api.use(self._previous)
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    # -- tokens and connections -------------------------------------------------------------

    def issue_token(self, sub: str = "user", scope: str | None = None, ttl: int | str = 900, **claims: Any) -> str:
        """A token this server accepts (see :func:`secure_ws.issue_token`)."""
        if self.settings is None:
            raise ClientError("the TestServer is not running: use `async with TestServer(api) as server`")
        return issue_token(sub, scope=scope, ttl=ttl, claims=claims, settings=self.settings)

    def connect(
        self,
        sub: str = "user",
        scope: str | None = None,
        ttl: int | str = 900,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        subprotocols: tuple[str, ...] = (),
        on_message: MessageHandler | None = None,
        on_push: PushHandler | None = None,
        on_recovery_failed: RecoveryHandler | None = None,
        request_timeout: float = 10.0,
        path: str = "/ws",
        **claims: Any,
    ) -> _Connecting:
        """A connection with a fresh token for ``sub`` (with ``scope``, ``ttl`` and any other claim), or with
        ``token``: ``async with server.connect(…) as ws`` (closed at the end of the block) or ``ws = await
        server.connect(…)``. Returns once the ``welcome`` is in; a refused handshake raises
        :exc:`~secure_ws.client.ConnectionRefused` (:exc:`~secure_ws.client.AuthenticationFailed` for the fatal
        reasons) with its ``code`` and ``reason``, or :exc:`~secure_ws.client.HandshakeRejected` for an HTTP
        answer (the per-IP handshake throttle: every connection here comes from one address). ``path``: the
        WebSocket path asked for (``"/ws/acme"`` for an app made with ``SecureWS(path="/ws/{tenant}")``)."""
        if token is None:
            token = self.issue_token(sub, scope, ttl, **claims)
        head = [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())]
        head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self._clients += 1
        scope_ = {
            "type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "scheme": "wss", "server": ("testserver", 443), "client": ("127.0.0.1", 10000 + self._clients % 50000),
            "root_path": "", "path": path, "raw_path": path.encode(), "query_string": b"", "headers": head,
            "subprotocols": list(subprotocols), "state": {}, "extensions": {"websocket.http.response": {}},
        }
        connection = Connection(on_message=on_message, on_push=on_push, on_recovery_failed=on_recovery_failed,
                                request_timeout=request_timeout)
        return _Connecting(connection, self.api.app, scope_)

    # -- the server side, as the server API does it ---------------------------------------------

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        """``message`` (no ``from``) to every subscriber; ``{"offset": N, "epoch": E}`` (``{}`` with history off)."""
        return await self.api.publish(channel, data)

    async def send(self, sub: str, data: Any) -> None:
        """A push to every connection of ``sub``."""
        await self.api.send(sub, data)

    async def disconnect(self, sub: str) -> None:
        """Close every connection of ``sub`` with 1008 ``disconnected``."""
        await self.api.disconnect(sub)


class Connection(Protocol):
    """One in-process WebSocket connection, with the Python client's methods (see :class:`secure_ws.client.Client`;
    there is no reconnect: once closed, requests raise :exc:`~secure_ws.client.ConnectionLost` and ``messages()``
    and ``pushes()`` end with it)."""

    _reconnects = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._socket: _Socket | None = None

    async def _wait_ready(self) -> Link:
        if self._error is not None:
            raise self._error
        assert self._link is not None
        return self._link

    @property
    def sub(self) -> str | None:
        return self._link.sub if self._link else None

    @property
    def connection_id(self) -> str | None:
        return self._link.connection_id if self._link else None

    @property
    def welcome(self) -> dict[str, Any] | None:
        return self._link.welcome if self._link else None

    @property
    def close_code(self) -> tuple[int, str] | None:
        """``(code, reason)`` once the connection is closed (by either side), else ``None``."""
        closed = self._link.closed if self._link else None
        return None if closed is None else (closed.code, closed.reason)

    async def wait_closed(self, timeout: float = CLOSE_TIMEOUT) -> tuple[int, str]:
        """Wait for the server to close the connection; its ``(code, reason)``."""
        assert self._socket is not None
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._socket.ended)
        assert self._link is not None and self._link.closed is not None
        return self._link.closed.code, self._link.closed.reason

    async def close(self) -> None:
        """Close the connection (1000) and wait for the server to finish with it; raises what the app raised."""
        if self._socket is not None:
            await self._socket.close(1000)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _Connecting:
    """What :meth:`TestServer.connect` returns: awaitable, or an ``async with`` block."""

    def __init__(self, connection: Connection, app: Any, scope: dict[str, Any]) -> None:
        self._connection, self._app, self._scope = connection, app, scope

    async def _open(self) -> Connection:
        socket = _Socket(self._connection)
        await socket.open(self._app, self._scope)
        return self._connection

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._open().__await__()

    async def __aenter__(self) -> Connection:
        return await self._open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._connection.close()


class _Socket:
    """Both ends of one in-process WebSocket: the app's ASGI ``receive``/``send``, and the connection's link."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.inbound: asyncio.Queue[dict[str, Any]] = asyncio.Queue(INBOUND_BOUND)
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.accepted = False
        self.status: int | None = None  # an HTTP answer instead of the upgrade
        self.task: asyncio.Task[None] | None = None
        self.link: Link | None = None
        self.close_sent = False

    async def open(self, app: Any, scope: dict[str, Any]) -> None:
        self.connection._socket = self
        self.inbound.put_nowait({"type": "websocket.connect"})
        self.task = asyncio.create_task(self._run(app, scope), name="secure_ws.testing.connection")
        await asyncio.shield(self.opened)  # set by the welcome, a close before it, or the app ending
        if self.link is None:
            await asyncio.shield(self.ended)
            self._raise_app_error()
            if self.status is not None:
                raise HandshakeRejected(self.status)
            code, reason = self._closed or (1006, "")
            raise (AuthenticationFailed if code == 1008 and reason in FATAL_REASONS else ConnectionRefused)(code, reason)

    _closed: tuple[int, str] | None = None

    async def _run(self, app: Any, scope: dict[str, Any]) -> None:
        try:
            await app(scope, self.receive, self.send)
        finally:
            self._end(1006, "")

    def _end(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = (int(code), reason)
        if self.link is not None:
            self.link.lost(ConnectionLost(*self._closed))
            self.connection._error = self.link.closed
            self.connection._end_streams(self.link.closed)
        for future in (self.opened, self.ended):
            if not future.done():
                future.set_result(None)

    def _raise_app_error(self) -> None:
        if self.task is not None and self.task.done() and not self.task.cancelled() and self.task.exception() is not None:
            raise self.task.exception()  # type: ignore[misc]

    # -- the app's side ----------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        return await self.inbound.get()

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.send":
            text = message.get("text")
            frame = _json_object(text) if text is not None else None
            if frame is None:
                return  # not a JSON object: the client ignores it, as over the network
            if self.link is None:
                if frame.get("type") != "welcome":
                    return
                self._welcome(frame)
                return
            wait = self.connection._route(self.link, frame)
            if wait is not None:
                await wait  # a streamed call's buffer is full: the app's send waits, as on a full socket
        elif kind == "websocket.accept":
            self.accepted = True
        elif kind == "websocket.close":
            self._end(message.get("code") or 1000, message.get("reason") or "")
            await self.inbound.put({"type": "websocket.disconnect", "code": message.get("code") or 1000})
        elif kind == "websocket.http.response.start":
            self.status = message["status"]
        elif kind == "websocket.http.response.body" and not message.get("more_body"):
            self._end(1006, "")

    def _welcome(self, welcome: dict[str, Any]) -> None:
        async def send(text: str) -> None:
            if self._closed is not None:
                raise ConnectionLost(*self._closed)
            await self.inbound.put({"type": "websocket.receive", "text": text})

        async def close(code: int, reason: str) -> None:
            await self.close(code)

        self.link = Link(send, close, welcome)
        self.connection._link = self.link
        self.connection._start_dispatch()
        self.opened.set_result(None)

    # -- the connection's side -----------------------------------------------------------------

    async def close(self, code: int) -> None:
        if not self.close_sent and self._closed is None:
            self.close_sent = True
            self._end(code, "")
            await self.inbound.put({"type": "websocket.disconnect", "code": code})
        if self.task is not None:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.wait({self.task})
        if self.connection._dispatcher is not None:
            self.connection._dispatcher.cancel()
        self._raise_app_error()


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        frame = json.loads(text)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None


class _Lifespan:
    """The app's ASGI lifespan, driven as a server drives it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # at most the two lifespan events
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # at most the two answers
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.inbox.get, self.outbox.put), name="secure_ws.testing.lifespan")
        self.inbox.put_nowait({"type": "lifespan.startup"})
        answer = await self._answer()
        if answer["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app's lifespan failed to start: {answer.get('message', '')}")

    async def stop(self) -> None:
        if self.task is None or self.task.done():
            return
        self.inbox.put_nowait({"type": "lifespan.shutdown"})
        answer = await self._answer()
        if answer["type"] != "lifespan.shutdown.complete":
            raise RuntimeError(f"the app's lifespan failed to stop: {answer.get('message', '')}")
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await self.task

    async def _answer(self) -> dict[str, Any]:
        assert self.task is not None
        getter = asyncio.ensure_future(self.outbox.get())
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        self.task.result()  # raises what the app raised
        raise RuntimeError("the app's lifespan ended without answering")

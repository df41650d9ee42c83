"""The application: :class:`SecureWS`, its handlers and hooks, and its ASGI app.

WebSocket traffic for ``/ws`` goes straight to the handshake middleware and the
session, bypassing Starlette's router and ``WebSocket`` wrapper: that path runs
once per frame and is kept as thin as plain ASGI allows. HTTP routes and the
lifespan are an ordinary Starlette app.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, compile_path

from . import demo, logs, metrics
from .core.handlers import ChannelHook, HandlerFunc, HookFunc, RegistrationError, Registry, StreamFunc
from .core.handshake import HandshakeMiddleware, deny_http
from .core.session import DIRECT, Session
from .server_api import PREFIX as API_PREFIX
from .server_api import ServerApi
from .service import Service
from .settings import ConfigError, Settings, check_internal_port, check_workers, load_settings, unreported_warnings
from .uvicorn.install import install
from .uvicorn.supervisor import running_config, running_port, running_workers, startup_failure_code

WS_PATH = "/ws"
# Operators' paths (metrics, the server API): moved off the public port to the internal listener when
# SECURE_WS_INTERNAL_PORT is set (`secure-ws serve --internal-port P`): `/metrics` and `/api/…`.
INTERNAL_PATHS = ("/metrics", "/api/")

class SecureWS:
    """``api = SecureWS()``: the service, with room for the application's own message types.

    Settings come from the environment and ``.env`` exactly as for the service; a bad value ends the
    process with one line naming the variable (pass ``settings=`` to get :class:`ConfigError` instead).
    They, and the keys, are read when the app starts serving: at import under uvicorn (``uvicorn app:app``,
    ``secure-ws serve``), before it binds its socket; else at the lifespan, or the first use of ``service``.
    So an application module imports without ``certs/`` or any variable (a test builds a
    :class:`~secure_ws.testing.TestServer` around it). Handlers and hooks are registered at import; the registry
    freezes when the app starts serving.
    """

    def __init__(self, settings: Settings | None = None, path: str = WS_PATH) -> None:
        self.registry = Registry()
        # The WebSocket's path (Starlette's syntax: "/ws/{tenant}"); its parameters are in ctx.path_params.
        self.path = path
        self._path_match = _path_matcher(path)
        self._settings = settings
        self._service: Service | None = None
        self._served: Any = None  # the ASGI app of the service in use
        #: The ASGI app: ``uvicorn myapp:app`` with ``app = api.app``, or ``Mount("/realtime", app=api.app)``.
        self.app = App(self)
        if running_config() is not None:
            # Imported by uvicorn, which has no SIGHUP handler (its default action ends the process): held
            # until the lifespan installs ours (Service.lifespan), as `secure-ws serve` holds it from its first line.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        if settings is not None or running_config() is not None:
            self._load()

    def _load(self) -> None:
        explicit = self._settings is not None
        try:
            settings = self._settings if self._settings is not None else load_settings()
            logs.configure(settings.log_format)
            for warning in unreported_warnings(settings):
                logging.getLogger("secure_ws").warning("configuration: %s", warning)
            check_workers(settings, running_workers())  # plain `uvicorn --workers N` too
            port = running_port()
            if port is not None:
                check_internal_port(settings, port)  # plain `uvicorn --port P` too
            service = Service(settings, self.registry)
            install()  # under `uvicorn yourapp:app` too: our protocols, with the request-head bounds
        except ConfigError as exc:
            if explicit:
                raise
            print(f"secure-ws: configuration error: {exc}", file=sys.stderr)
            # In a worker process: the code that stops the supervisor instead of a restart loop.
            raise SystemExit(startup_failure_code()) from None
        self.use(service)

    def use(self, service: Service | None) -> Service | None:
        """Serve with ``service`` (built around :attr:`registry`) from now on (``None``: load the settings again on
        next use); returns the one it replaces. :class:`secure_ws.testing.TestServer` uses it to run the
        application on its own settings and key."""
        previous, self._service = self._service, service
        self._served = None if service is None else _asgi(service, self._path_match)
        return previous

    @property
    def service(self) -> Service:
        """The wired runtime (keys, storage, hub…), built from the settings on first use."""
        if self._service is None:
            self._load()
        assert self._service is not None
        return self._service

    @property
    def settings(self) -> Settings:
        return self.service.settings

    # -- registration --------------------------------------------------------------

    def handler(self, type: str, *, scope: str | None = None, rate_limit: str | None = None) -> Callable[[HandlerFunc], HandlerFunc]:
        """``@api.handler("orders.create", scope="orders:write", rate_limit="5/minute")`` on
        ``async def f(ctx, data)``: its return value is the reply's ``data``."""

        def register(func: HandlerFunc) -> HandlerFunc:
            self.registry.add(type, func, scope, rate_limit)
            return func

        if callable(type):
            raise RegistrationError("use @api.handler(\"type.name\"), with the message type it answers")
        return register

    def stream(self, type: str, *, scope: str | None = None, rate_limit: str | None = None) -> Callable[[StreamFunc], StreamFunc]:
        """``@api.stream("ai.complete", scope="ai:use", rate_limit="10/minute")`` on an ``async def f(ctx, data)``
        generator: each value it yields reaches the client as ``{"type":"chunk","id":N,"seq":K,"data":…}``, then
        ``{"type":"result","id":N,"data":{"chunks":K}}``. The call needs an ``id``; the client may cancel it."""

        def register(func: StreamFunc) -> StreamFunc:
            self.registry.add(type, func, scope, rate_limit, stream=True)
            return func

        if callable(type):
            raise RegistrationError("use @api.stream(\"type.name\"), with the message type it answers")
        return register

    def on_connect(self, func: HookFunc) -> HookFunc:
        """``async def f(ctx)`` run before the welcome; raising :class:`Reject` closes 1008 ``connection refused``."""
        registry = self.registry
        return registry.hook(registry.on_connect, func, "on_connect")

    def on_disconnect(self, func: HookFunc) -> HookFunc:
        """``async def f(ctx)`` run when a connection its ``on_connect`` admitted has ended."""
        registry = self.registry
        return registry.hook(registry.on_disconnect, func, "on_disconnect")

    def channels(
        self,
        pattern: str,
        *,
        history_size: int | None = None,
        history_ttl: str | int | None = None,
        presence: bool | None = None,
        join_leave: bool | None = None,
        client_publish: bool | None = None,
    ) -> None:
        """Options for the channels ``pattern`` matches (the scope glob syntax: ``room.*``); the first matching
        declaration wins, after the rules of ``SECURE_WS_CHANNELS_FILE``. An option left out takes its default
        (``SECURE_WS_HISTORY_SIZE``/``_TTL``; presence, join/leave and client publish on)."""
        self.registry.channel_rule(pattern, {
            "history_size": history_size, "history_ttl": history_ttl, "presence": presence,
            "join_leave": join_leave, "client_publish": client_publish,
        })

    def on_subscribe(self, pattern: str) -> Callable[[ChannelHook], ChannelHook]:
        """``async def f(ctx, channel)`` run on a client's subscribe to a matching channel, after the scope check:
        ``Reject`` refuses it; a value returned is sent as ``"data"`` in ``subscribed``."""
        registry = self.registry
        return lambda func: registry.channel_hook(registry.on_subscribe, pattern, func, "on_subscribe", 2)

    def on_publish(self, pattern: str) -> Callable[[ChannelHook], ChannelHook]:
        """``async def f(ctx, channel, data)`` run on a client's publish to a matching channel, after the scope
        check: ``Reject`` refuses it; a value returned (not None) is published instead of ``data``."""
        registry = self.registry
        return lambda func: registry.channel_hook(registry.on_publish, pattern, func, "on_publish", 3)

    # -- lifespan, for mounting in another app -------------------------------------------

    def lifespan(self, app: Any = None) -> Any:
        """The app's lifespan: pass ``lifespan=api.lifespan`` to a host Starlette/FastAPI app that mounts
        ``api.app``, or enter ``api.lifespan(app)`` from the host's own lifespan."""
        return self.service.lifespan(app)

    # -- the server side ---------------------------------------------------------------

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        """``{"type":"message","channel":C,"data":X}`` (no ``from``) to every subscriber, on every worker;
        returns ``{"offset":N,"epoch":E}`` on a channel with history, else ``{}``."""
        return await self.service.publish(channel, data)

    async def send(self, sub: str, data: Any) -> None:
        """``{"type":"push","data":X}`` to every connection of ``sub``, on every worker and host."""
        await self.service.send(sub, data)

    async def disconnect(self, sub: str) -> None:
        """Close every connection of ``sub`` with 1008 ``disconnected``, on every worker and host."""
        await self.service.disconnect(sub)


class App:
    """``api.app``: serves whatever :meth:`SecureWS.use` set, loading the settings on first use. ``app.service`` is
    its api's (so ``secure-ws serve MODULE:ATTR`` can tell the app of a SecureWS, and check its settings)."""

    __slots__ = ("api",)

    def __init__(self, api: SecureWS) -> None:
        self.api = api

    @property
    def service(self) -> Service:
        return self.api.service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        api = self.api
        if api._served is None:
            api._load()
        await api._served(scope, receive, send)


def _path_matcher(path: str) -> Callable[[str], dict[str, Any] | None]:
    """``path`` → a function giving a request path's parameters (``{}`` for a path without), None if it does not match."""
    if path == WS_PATH:
        return lambda candidate: {} if candidate == WS_PATH else None
    if type(path) is not str or not path.startswith("/"):
        raise RegistrationError(f"SecureWS(path={path!r}): a path starting with '/', like \"/ws/{{tenant}}\"")
    try:
        regex, _, convertors = compile_path(path)
    except (ValueError, AssertionError) as exc:
        raise RegistrationError(f"SecureWS(path={path!r}): {exc}") from None

    def match(candidate: str) -> dict[str, Any] | None:
        found = regex.match(candidate)
        if found is None:
            return None
        return {name: convertors[name].convert(value) for name, value in found.groupdict().items()}

    return match


def _asgi(service: Service, ws_path: Callable[[str], dict[str, Any] | None]) -> Any:
    settings = service.settings

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ok = await service.ready()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def jwks(request: Request) -> Response:
        return JSONResponse(service.keys.keyring.public_jwks(), headers={"Cache-Control": "public, max-age=60"})

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/.well-known/jwks.json", jwks),
    ]
    if settings.demo:
        routes += demo.routes()
    http = Starlette(routes=routes, lifespan=service.lifespan)
    internal_port = settings.internal_port

    async def session(scope: dict[str, Any], receive: Any, send: Any) -> None:
        deps = service.session_deps
        if deps is None:  # the lifespan ended between the handshake and here: shutting down
            return
        direct = scope.get("extensions", {}).get(DIRECT)
        session = Session(deps, send, scope["secure_ws.principal"])
        session.path_params = scope.get("path_params", {})
        await session.run(receive, scope["secure_ws.subprotocol"], direct)

    gate = HandshakeMiddleware(session, service)
    server_api = ServerApi(service, fallback=http)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":  # the lifespan
            await http(scope, receive, send)
            return
        path = _route_path(scope)
        if kind == "http" and _announces_body(scope["headers"]):
            receive, send = _close_if_unread(receive, send)
        # With an internal listener, operators' paths are served there and only there.
        if internal_port is not None and (_local_port(scope) == internal_port) != path.startswith(INTERNAL_PATHS):
            await _not_found(scope, receive, send)
        elif kind == "websocket":
            params = ws_path(path)
            if params is None:
                await _not_found(scope, receive, send)
            else:
                if params:
                    scope["path_params"] = {**scope.get("path_params", {}), **params}
                await gate(scope, receive, send)
        elif path.startswith(API_PREFIX):
            await server_api(scope, receive, send, path)
        else:
            await http(scope, receive, send)

    return app


async def _not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await deny_http(receive, send, scope, 404, b"Not Found\n")  # 403 from a server without the denial response
    else:
        await PlainTextResponse("Not Found", status_code=404)(scope, receive, send)


def _announces_body(headers: list[tuple[bytes, bytes]]) -> bool:
    # The head is bounded (secure_ws.uvicorn.http_protocol, or uvicorn's own limit), so this scan is too.
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


def _close_if_unread(receive: Any, send: Any) -> tuple[Any, Any]:
    """``receive`` and ``send`` that add ``Connection: close`` to a response sent before the request's body
    was read to its end (a refusal, a route that takes no body, a body too large or too slow): the server
    then closes the connection after the answer, whatever its protocol, instead of reading on (a client
    trickling a body one byte a second would otherwise hold the connection for ever)."""
    unread = True

    async def receive_body() -> Any:
        nonlocal unread
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            unread = False
        return message

    async def send_closing(message: Any) -> None:
        if unread and message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        await send(message)

    return receive_body, send_closing


def _local_port(scope: dict[str, Any]) -> int | None:
    server = scope.get("server")  # (host, port) of the listening socket the request came in on
    return server[1] if server else None


def _route_path(scope: dict[str, Any]) -> str:
    """The path below the mount point: Starlette's ``Mount`` (and ``uvicorn --root-path``) keep the full
    path in ``path`` and put the mount point in ``root_path``."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


"""The ASGI application factory: wires settings, service, handshake and routes.

WebSocket traffic for ``/ws`` goes straight to the handshake middleware and the
session, bypassing Starlette's router and ``WebSocket`` wrapper: that path runs
once per frame and is kept as thin as plain ASGI allows. HTTP routes and the
lifespan are an ordinary Starlette app.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import demo, logs, metrics
from .core.handshake import HandshakeMiddleware
from .core.session import DIRECT, Session
from .service import Service
from .settings import Settings, load_settings

WS_PATH = "/ws"


def create_app(settings: Settings | None = None) -> Any:
    settings = settings if settings is not None else load_settings()
    logs.configure(settings.log_format)
    service = Service(settings)

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

    async def session(scope: dict[str, Any], receive: Any, send: Any) -> None:
        direct = scope.get("extensions", {}).get(DIRECT)
        await Session(service, send, scope["secure_ws.principal"]).run(receive, scope["secure_ws.subprotocol"], direct)

    gate = HandshakeMiddleware(session, service)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            if scope["path"] == WS_PATH:
                await gate(scope, receive, send)
            else:
                await receive()
                await send({"type": "websocket.close", "code": 1008})  # uvicorn answers HTTP 403
            return
        await http(scope, receive, send)

    app.service = service  # type: ignore[attr-defined]  # for tests and the CLI
    return app

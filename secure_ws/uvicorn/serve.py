"""``secure-ws serve``: uvicorn with our protocols, the hardened TLS context and tuned settings."""

from __future__ import annotations

from typing import Any

import uvicorn

from .. import metrics
from ..settings import Settings
from .http_protocol import HTTP_PROTOCOL, uvicorn_context_factory
from .ws_protocol import supported

GRACEFUL_SHUTDOWN_SECONDS = 10  # on SIGTERM, how long live connections get to finish (deploy/ budgets for it)


def serve(settings: Settings, host: str, port: int, workers: int, **extra: Any) -> None:
    with metrics.run_directory(workers):  # the workers' shared metrics files, made before they start
        uvicorn.run(
            "secure_ws.main:app",
            host=host,
            port=port,
            workers=workers,
            ssl_context_factory=uvicorn_context_factory,
            http=HTTP_PROTOCOL,
            ws="secure_ws.uvicorn.ws_protocol:WebSocketProtocol" if supported() else "websockets-sansio",
            ws_max_size=settings.max_message_bytes,
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            ws_per_message_deflate=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            **extra,
        )

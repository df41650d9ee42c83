"""``secure-ws serve``: uvicorn with our protocols, the hardened TLS context and tuned settings.

Run as uvicorn's own ``run`` would, with two differences: several workers are supervised by
:class:`.supervisor.Supervisor` (SIGHUP reloads instead of restarting; a worker that cannot start
ends the command with exit code 2), and an optional internal listener on ``127.0.0.1:P`` shares the
workers (the app tells the two apart by the local port, see ``secure_ws.app``).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import uvicorn

from .. import logs, metrics
from ..settings import Settings
from .http_protocol import HTTP_PROTOCOL, uvicorn_context_factory
from .supervisor import CONFIG_ERROR, Supervisor
from .ws_protocol import supported

log = logging.getLogger("uvicorn.error")

GRACEFUL_SHUTDOWN_SECONDS = 10  # on SIGTERM, how long live connections get to finish (deploy/ budgets for it)


def serve(
    settings: Settings, host: str, port: int, workers: int, *, tls: bool = True, internal_port: int | None = None,
    app: str = "secure_ws.main:app", **extra: Any
) -> int:
    """Serve ``app`` (an import string) until stopped; the exit code: 0, or 2 when the server (a worker) could not start."""
    # uvicorn rewrites the client address from X-Forwarded-For for exactly the proxies our handshake
    # throttle trusts (SECURE_WS_FORWARDED_ALLOW_IPS), so the access log and the throttle agree;
    # with none named, neither trusts the header (uvicorn alone would trust 127.0.0.1).
    proxies = [str(network) for network in settings.forwarded_allow_ips]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=workers,
        ssl_context_factory=uvicorn_context_factory if tls else None,
        http=HTTP_PROTOCOL,
        ws="secure_ws.uvicorn.ws_protocol:WebSocketProtocol" if supported() else "websockets-sansio",
        ws_max_size=settings.max_message_bytes,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies,
        **extra,
    )
    logs.configure(settings.log_format)  # the supervisor's own lines: timestamps, or JSON
    sockets = [config.bind_socket()]
    if internal_port is not None:
        sockets.append(_loopback_socket(internal_port, "https" if tls else "http"))
    with metrics.run_directory(config.workers):  # the workers' shared metrics files, made before they start
        if config.workers > 1:
            supervisor = Supervisor(config, sockets)
            supervisor.run()
            return CONFIG_ERROR if supervisor.failed else 0
        server = uvicorn.Server(config)
        server.run(sockets)
        return 0 if server.started else CONFIG_ERROR


def _loopback_socket(port: int, scheme: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.set_inheritable(True)
    log.info("Internal listener (/metrics, /api/*) on %s://127.0.0.1:%d", scheme, sock.getsockname()[1])
    return sock

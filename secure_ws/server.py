"""uvicorn integration: the TLS context factory and request-head deadline of ``secure-ws serve``.

uvicorn times out idle keep-alive connections, but not a connection that
finishes TLS and then sends a request line and headers slowly or never (a
slowloris), neither first nor after a kept-alive response. The protocol class
here gives every request head ``REQUEST_HEAD_TIMEOUT`` seconds from the
connection's start or the request's first byte; complete headers (or the
upgrade to WebSocket) disarm it. The TLS handshake itself is bounded by
asyncio's 60 s ``ssl_handshake_timeout``.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .settings import load_settings
from .tls import server_context

REQUEST_HEAD_TIMEOUT = 10.0


def uvicorn_context_factory(config: object, default_factory: object) -> ssl.SSLContext:
    """uvicorn's ``ssl_context_factory``: module-level so it pickles into ``--workers`` processes."""
    s = load_settings()
    return server_context(s.tls_certfile, s.tls_keyfile, s.tls_min_version, s.tls_client_ca)


class RequestHeadDeadline:
    """Mixin for a uvicorn HTTP protocol: close a connection whose request head does not arrive in time."""

    _deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(REQUEST_HEAD_TIMEOUT, self._head_late)  # type: ignore[attr-defined]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()  # type: ignore[misc]
        self._arm()

    def _head_late(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()  # type: ignore[misc]

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._disarm()
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]


class GuardedHttpToolsProtocol(RequestHeadDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol with the request-head deadline (a module-level class: it must
    pickle into ``--workers`` processes, so ``secure-ws serve`` names it as ``module:attr``)."""


HTTP_PROTOCOL = "secure_ws.server:GuardedHttpToolsProtocol"

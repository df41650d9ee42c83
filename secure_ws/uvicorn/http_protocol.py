"""uvicorn's httptools protocol with request-head bounds, and the TLS context factory of ``secure-ws serve``.

uvicorn times out idle keep-alive connections, but not a connection that
finishes TLS and then sends a request line and headers slowly or never (a
slowloris), neither first nor after a kept-alive response; and its httptools
protocol buffers a request head of any size (endless header lines). The
protocol class here bounds every request head:

* in time: ``REQUEST_HEAD_TIMEOUT`` seconds from the connection's start or the
  request's first byte; complete headers (or the upgrade to WebSocket) disarm it;
* in size: a head that has not ended within ``MAX_REQUEST_HEAD`` bytes is
  answered 431 and the connection closed. The parser is only ever fed up to the
  bound, so a head costs at most ``MAX_REQUEST_HEAD`` bytes however much arrives.

and every request body, as Apache's ``mod_reqtimeout`` does by default:

* in time: ``REQUEST_BODY_TIMEOUT`` seconds from the end of the head, plus one second for every
  ``MIN_BODY_RATE`` bytes received, so a large upload at a fair speed goes through while a body
  trickled a byte a second is cut (408 if nothing was answered yet, and closed). The app itself
  closes the connection after any response sent before the body was read (``secure_ws.app``): this
  bound is for routes that wait on a body, a host application's included.

The TLS handshake itself is bounded by asyncio's 60 s ``ssl_handshake_timeout``.

``secure-ws serve`` names :class:`GuardedHttpToolsProtocol`; under plain
``uvicorn secure_ws.main:app``, :func:`secure_ws.uvicorn.install.install` has
uvicorn's default classes build ours.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..core.handshake import PEER
from ..settings import load_settings
from ..tls import server_context

REQUEST_HEAD_TIMEOUT = 10.0
REQUEST_BODY_TIMEOUT = 10.0
MIN_BODY_RATE = 500  # bytes a second, after the first REQUEST_BODY_TIMEOUT seconds (Apache's default)
# In line with the 8 KiB a single upgrade header may have: a request line and a few headers.
MAX_REQUEST_HEAD = 16384

_TOO_SLOW = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\ncontent-length: 22\r\nconnection: close\r\n\r\n"
    b"Request body too slow\n"
)
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\ncontent-length: 32\r\nconnection: close\r\n\r\n"
    b"Request header fields too large\n"
)


def uvicorn_context_factory(config: object, default_factory: object) -> ssl.SSLContext:
    """uvicorn's ``ssl_context_factory``: module-level so it pickles into ``--workers`` processes."""
    s = load_settings()
    return server_context(s.tls_certfile, s.tls_keyfile, s.tls_min_version, s.tls_client_ca)


class RequestHeadGuard:
    """Mixin for uvicorn's httptools protocol: a request head must end in time and within a size."""

    _deadline: asyncio.TimerHandle | None = None
    _body_deadline: asyncio.TimerHandle | None = None
    _body_started = 0.0  # loop time the body being read began (the end of its head)
    _body_bytes = 0  # body bytes received since
    _head_room: int | None = None  # bytes the head being read may still take; None while a body is read
    _heads = 0  # request heads completed on this connection
    _upgraded = False

    def _open_head(self) -> None:
        self._head_room = MAX_REQUEST_HEAD
        self._arm()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(REQUEST_HEAD_TIMEOUT, self._head_late)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._open_head()

    def data_received(self, data: bytes) -> None:
        room = self._head_room
        if room is None or len(data) <= room:
            if room is not None:
                self._head_room = room - len(data)
            super().data_received(data)  # type: ignore[misc]
            return
        # This read would take the head past its bound: parse only what fits.
        heads = self._heads
        if room:
            self._head_room = 0
            super().data_received(data[:room])  # type: ignore[misc]
        if self._upgraded or self.transport.is_closing():  # type: ignore[attr-defined]
            return  # what follows an upgrade request is dropped, as uvicorn does (RFC 6455 §4.1: wait for the 101)
        if self._heads > heads:
            self.data_received(data[room:])  # the head ended within the bound: the rest is body or the next request
        else:
            self._head_too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()  # type: ignore[misc]
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._heads += 1
        self._head_room = None
        super().on_headers_complete()  # type: ignore[misc]
        if not self.parser.should_upgrade():  # type: ignore[attr-defined]  # (an upgrade has no body)
            self._body_started = self.loop.time()  # type: ignore[attr-defined]
            self._body_bytes = 0
            self._arm_body(REQUEST_BODY_TIMEOUT)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        self._disarm_body()
        super().on_message_complete()  # type: ignore[misc]
        if not self._upgraded:
            self._head_room = MAX_REQUEST_HEAD  # what comes next is the next request's head

    def _arm_body(self, delay: float) -> None:
        self._body_deadline = self.loop.call_later(delay, self._body_due)  # type: ignore[attr-defined]

    def _disarm_body(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _body_due(self) -> None:
        """The body's deadline, moved on by what arrived since it was set (one timer, not one per chunk)."""
        self._body_deadline = None
        late = self.loop.time() - (self._body_started + REQUEST_BODY_TIMEOUT + self._body_bytes / MIN_BODY_RATE)  # type: ignore[attr-defined]
        if late < 0:
            self._arm_body(-late)
            return
        if self.transport.is_closing():  # type: ignore[attr-defined]
            return
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle is not None and not cycle.response_started:
            self.transport.write(_TOO_SLOW)  # type: ignore[attr-defined]
        self.transport.close()  # type: ignore[attr-defined]

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._disarm()
        self._upgraded = True
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def _head_late(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]

    def _head_too_large(self) -> None:
        self._disarm()
        self._head_room = None
        self.transport.write(_TOO_LARGE)  # type: ignore[attr-defined]
        self.transport.close()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_body()
        super().connection_lost(exc)  # type: ignore[misc]


class PeerScope:
    """Mixin for uvicorn's HTTP protocols: every request's scope carries the TCP peer as the socket
    reports it (``extensions[PEER]``), which uvicorn's proxy-headers middleware cannot rewrite from
    ``X-Forwarded-For`` as it does ``scope["client"]``: the server API's throttle counts it, as the
    handshake's does (our WebSocket protocol sets it there)."""

    app: Any  # set by uvicorn's protocol: its loaded app, proxy-headers middleware included

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = self.app

        async def with_peer(scope: Any, receive: Any, send: Any) -> None:
            extensions = scope.get("extensions")
            if extensions is None:
                scope["extensions"] = extensions = {}
            extensions[PEER] = self.client  # type: ignore[attr-defined]
            await app(scope, receive, send)

        self.app = with_peer


class GuardedHttpToolsProtocol(PeerScope, RequestHeadGuard, HttpToolsProtocol):
    """uvicorn's httptools protocol with the request-head and body bounds and the peer (a module-level
    class: it must pickle into ``--workers`` processes, so ``secure-ws serve`` names it as ``module:attr``)."""


class PeerH11Protocol(PeerScope, H11Protocol):
    """uvicorn's h11 protocol (``uvicorn --http h11``) with the peer; h11 bounds the head itself."""


HTTP_PROTOCOL = "secure_ws.uvicorn.http_protocol:GuardedHttpToolsProtocol"

"""The dispatch table: message type → route, built once when the service starts.

The built-in types (:mod:`.builtins`) and the application's handlers
(:mod:`.handlers`) are entries of one table; a type it lacks goes to the
fallback, which is ``unknown_type`` or, with ``SECURE_WS_RPC_PROXY_URL``, the
backend (:mod:`.rpc_proxy`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from ..wire.messages import UNAVAILABLE, UNKNOWN_TYPE, ProtocolError
from .builtins import BUILT_INS
from .handlers import TYPE_NAME, Handler
from .types import Chunks

if TYPE_CHECKING:
    from .context import Context
    from .rpc_proxy import RpcProxy
    from .types import Connection, Invoke, Route

log = logging.getLogger("secure_ws.session")


def routes(handlers: dict[str, Handler]) -> dict[str, Route]:
    table: dict[str, Route] = dict(BUILT_INS)
    for kind, handler in handlers.items():
        table[kind] = _handler_route(handler)
    return table


def _handler_route(handler: Handler) -> Route:
    func = cast("Invoke", handler.func)  # a stream's generator function is run by the session itself

    def route(session: Connection, request: dict[str, Any]) -> None:
        session.call(request, func, handler)

    return route


def unknown_type(session: Connection, request: dict[str, Any]) -> None:
    raise ProtocolError(UNKNOWN_TYPE, "unknown message type", request.get("id"))


def proxy_route(proxy: RpcProxy) -> Route:
    """Every type no route names, answered by the backend; past the timeout, or on any failure, ``unavailable``."""
    from .rpc_proxy import ProxyUnavailable  # imported only when a proxy is configured: httpx stays unloaded otherwise

    def route(session: Connection, request: dict[str, Any]) -> None:
        kind = request["type"]
        if not TYPE_NAME.fullmatch(kind):  # what could never be a handler's name is never forwarded
            unknown_type(session, request)
        session.call(request, partial(forward, kind), timeout_code=UNAVAILABLE)

    async def forward(kind: str, ctx: Context, data: Any) -> Any:
        try:
            answer = await proxy.call(kind, data, ctx.sub, ctx.connection_id, ctx.claims)
        except ProxyUnavailable as exc:
            raise unavailable(kind, ctx, exc) from None
        return Chunks(relay(kind, ctx, answer.iterator), answer.close) if type(answer) is Chunks else answer

    async def relay(kind: str, ctx: Context, chunks: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        """A streamed answer's chunks, its failures turned into ``unavailable`` as a whole answer's are."""
        try:
            async for data in chunks:
                yield data
        except ProxyUnavailable as exc:
            raise unavailable(kind, ctx, exc) from None
        finally:
            await chunks.aclose()

    def unavailable(kind: str, ctx: Context, exc: ProxyUnavailable) -> ProtocolError:
        log.warning("session %s: RPC proxy for %s: %s", ctx.connection_id, kind, exc, extra={"event": "proxy_unavailable"})
        return ProtocolError(UNAVAILABLE, "backend unavailable; retry shortly")

    return route

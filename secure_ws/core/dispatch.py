"""The dispatch table: message type → route, built once when the service starts.

The built-in types (:mod:`.builtins`) and the application's handlers
(:mod:`.handlers`) are entries of one table; a type it lacks goes to the
fallback, which is ``unknown_type`` or, with ``SECURE_WS_RPC_PROXY_URL``, the
backend (:mod:`.rpc_proxy`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from ..wire.messages import UNAVAILABLE, UNKNOWN_TYPE, ProtocolError
from .builtins import BUILT_INS
from .channel_hooks import HookFailed
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


def proxy_event(proxy: RpcProxy, kind: str) -> Callable[..., Awaitable[Any]]:
    """A hook that asks the backend (``$subscribe`` ``{"channel":C}``, ``$publish`` ``{"channel":C,"data":X}``,
    ``$connect`` ``{}``): ``{"data":…}`` allows (a value not null is the subscribe's ``data``, or what is published
    instead), ``{"error":…}`` refuses with it; anything else (a bad body, a stream, no answer) is
    :class:`HookFailed` → ``unavailable``, never let through."""
    from .rpc_proxy import ProxyUnavailable

    async def event(ctx: Context, channel: str | None = None, *data: Any) -> Any:
        body: dict[str, Any] = {} if channel is None else {"channel": channel}
        if data:
            body["data"] = data[0]
        try:
            answer = await proxy.call(kind, body, ctx.sub, ctx.connection_id, ctx.claims)
        except ProxyUnavailable as exc:
            raise HookFailed(f"RPC proxy for {kind}: {exc}") from None
        if type(answer) is Chunks:
            await answer.iterator.aclose()
            if answer.close is not None:
                await answer.close()
            raise HookFailed(f"RPC proxy for {kind}: answered with a stream")
        return answer

    return event

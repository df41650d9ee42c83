"""The built-in message types of SPEC §5, as entries of the dispatch table like any application handler.

``ping`` and ``echo`` answer there and then; the others wait on storage or a key
fetch and go through :meth:`Connection.waiting`, which keeps their replies in order.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..auth.tokens import AuthError
from ..wire.closes import INVALID, Close
from ..wire.messages import BAD_REQUEST, FORBIDDEN, LIMIT_EXCEEDED, ProtocolError, channel_of, encode, error, reply
from . import presence

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .types import Connection, Route

log = logging.getLogger("secure_ws.session")

PONG = encode({"type": "pong"})

Request = dict[str, Any]


def ping(session: Connection, request: Request) -> None:
    id = request.get("id")
    session.send(PONG if id is None else reply(request, {"type": "pong"}))


def echo(session: Connection, request: Request) -> None:
    if "data" not in request:
        raise ProtocolError(BAD_REQUEST, "echo needs 'data'", request.get("id"))
    session.send(reply(request, {"type": "echo", "data": request["data"]}))


def subscribe(session: Connection, request: Request) -> Awaitable[None]:
    return session.waiting(request, _subscribe(session, request))


def unsubscribe(session: Connection, request: Request) -> Awaitable[None]:
    return session.waiting(request, _unsubscribe(session, request))


def publish(session: Connection, request: Request) -> Awaitable[None]:
    return session.waiting(request, _publish(session, request))


def refresh(session: Connection, request: Request) -> Awaitable[None]:
    return session.waiting(request, _refresh(session, request))


async def _subscribe(session: Connection, request: Request) -> None:
    channel = channel_of(request)
    join_leave = request.get("join_leave", False)
    if type(join_leave) is not bool:
        raise ProtocolError(BAD_REQUEST, "join_leave must be true or false", request.get("id"))
    if not session.grants.may_subscribe(channel):
        raise ProtocolError(FORBIDDEN, f"scope does not grant subscribe:{channel}", request.get("id"))
    # Each held channel costs memory here and a subscription in storage; one already held is free.
    limit = session.deps.settings.max_subscriptions
    if len(session.channels) >= limit and channel not in session.channels:
        raise ProtocolError(LIMIT_EXCEEDED, f"at most {limit} subscriptions per connection", request.get("id"))
    await session.deps.hub.join(session, channel)
    await session.deps.presence.join(session, channel, join_leave)
    session.send(reply(request, {"type": "subscribed", "channel": channel}))


async def _unsubscribe(session: Connection, request: Request) -> None:
    channel = channel_of(request)
    await session.deps.hub.leave(session, channel)
    session.send(reply(request, {"type": "unsubscribed", "channel": channel}))


async def _publish(session: Connection, request: Request) -> None:
    channel = channel_of(request)
    if "data" not in request:
        raise ProtocolError(BAD_REQUEST, "publish needs 'data'", request.get("id"))
    if not session.grants.may_publish(channel):
        raise ProtocolError(FORBIDDEN, f"scope does not grant publish:{channel}", request.get("id"))
    # Encoded once here; every subscriber, local or on another worker, gets these same bytes.
    payload = encode({"type": "message", "channel": channel, "from": session.principal.sub, "data": request["data"]})
    await session.deps.publish(channel, payload)
    metrics.STATS.publishes += 1
    session.send(reply(request, {"type": "published", "channel": channel}))


async def _refresh(session: Connection, request: Request) -> None:
    token = request.get("token")
    if type(token) is not str:
        raise ProtocolError(BAD_REQUEST, "refresh needs 'token'", request.get("id"))
    try:
        principal = await session.deps.authenticate(token)
    except AuthError as exc:
        log.info("session %s: refresh refused (%s): %s", session.id, exc.reason, exc.detail, extra=session.log_fields("refresh_refused"))
        await session.close(Close.POLICY_VIOLATION, INVALID)
        return
    if principal.sub != session.principal.sub:
        log.info("session %s: refresh with another sub refused", session.id, extra=session.log_fields("refresh_refused"))
        await session.close(Close.POLICY_VIOLATION, INVALID)
        return
    session.renew(principal)
    for channel in tuple(session.channels):
        if not session.grants.may_subscribe(channel):
            await session.deps.hub.leave(session, channel)
            session.send(error(FORBIDDEN, f"refreshed scope no longer grants subscribe:{channel}", channel=channel))
    session.send(reply(request, {"type": "refreshed", "expires_at": principal.exp}))


BUILT_INS: dict[str, Route] = {
    "ping": ping,
    "echo": echo,
    "subscribe": subscribe,
    "unsubscribe": unsubscribe,
    "publish": publish,
    "refresh": refresh,
    "presence": presence.request,
}

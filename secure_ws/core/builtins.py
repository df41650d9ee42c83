"""The built-in message types of SPEC §5, as entries of the dispatch table like any application handler.

``ping`` and ``echo`` answer there and then; the others wait on storage or a key
fetch and go through :meth:`Connection.waiting`, which keeps their replies in order.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..auth.tokens import AuthError
from ..state.storage import History, Position
from ..wire.closes import INVALID, Close
from ..wire.messages import (
    BAD_REQUEST,
    FORBIDDEN,
    LIMIT_EXCEEDED,
    ProtocolError,
    channel_of,
    encode,
    error,
    limit_of,
    reply,
    since_of,
)
from . import presence

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .channel_hooks import Hooks
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


def cancel(session: Connection, request: Request) -> None:
    """Ends the connection's running call with this ``id`` (answered ``cancelled``); nothing if there is none."""
    id = request.get("id")
    if id is None:
        raise ProtocolError(BAD_REQUEST, "cancel needs the 'id' of the call to cancel")
    session.cancel(id)


def subscribe(session: Connection, request: Request) -> Awaitable[None]:
    # The request's checks run here, before anything waits: a refusal costs no coroutine, and a subscribe without
    # hooks one coroutine less.
    channel = channel_of(request)
    join_leave = request.get("join_leave", False)
    if type(join_leave) is not bool:
        raise ProtocolError(BAD_REQUEST, "join_leave must be true or false", request.get("id"))
    since = since_of(request)
    if not session.grants.may_subscribe(channel):
        raise ProtocolError(FORBIDDEN, f"scope does not grant subscribe:{channel}", request.get("id"))
    hooks = session.deps.on_subscribe.for_channel(channel)
    if hooks:
        return session.waiting(request, _hooked_subscribe(session, request, channel, since, join_leave, hooks))
    return session.waiting(request, subscribe_to(session, channel, since, join_leave, request))


def unsubscribe(session: Connection, request: Request) -> Awaitable[None]:
    return session.waiting(request, _unsubscribe(session, request))


def publish(session: Connection, request: Request) -> Awaitable[None]:
    return session.waiting(request, _publish(session, request))


def refresh(session: Connection, request: Request) -> Awaitable[None]:
    return session.waiting(request, _refresh(session, request))


def history(session: Connection, request: Request) -> Awaitable[None]:
    return session.waiting(request, _history(session, request))


async def _hooked_subscribe(
    session: Connection, request: Request, channel: str, since: tuple[int, str] | None, join_leave: bool, hooks: Hooks
) -> None:
    data = await session.deps.on_subscribe.run(hooks, request.get("id"), "on_subscribe", session.context, channel)
    await subscribe_to(session, channel, since, join_leave, request, data)


async def subscribe_to(
    session: Connection, channel: str, since: tuple[int, str] | None, join_leave: bool, request: Request | None, data: Any = None
) -> None:
    """Join ``channel`` and tell the client ``subscribed`` (with ``data`` if not None), then what it missed since
    ``since``. ``request`` None: the server subscribes the connection (Context.subscribe): the frames go out as
    deliveries, behind what the connection was already sent, and no scope or hook is asked. Runs while the
    connection's deliveries are held (:meth:`Connection.hold`)."""
    id = None if request is None else request.get("id")
    deps = session.deps
    options = deps.channels(channel)
    if join_leave and not options.join_leave:
        raise ProtocolError(FORBIDDEN, f"join/leave events are off for {channel}", id)
    # Each held channel costs memory here and a subscription in storage; one already held is free.
    limit = deps.settings.max_subscriptions
    held = channel in session.channels
    if len(session.channels) >= limit and not held:
        raise ProtocolError(LIMIT_EXCEEDED, f"at most {limit} subscriptions per connection", id)
    # Joined to the live stream first (publications are held meanwhile), then the history read: whatever is
    # published in between is in both, and the floor set below drops the second copy.
    await deps.hub.join(session, channel)
    await deps.presence.join(session, channel, join_leave)  # leaves the channel again if it raises
    try:
        # Without `since`, only the position: limit 0. With it, everything after it (at most the whole history).
        position = None if since is None else Position(*since)
        size = options.history.size if options.history is not None else 0
        found = await deps.history(channel, position, 0 if position is None else size)
    except BaseException:
        if not held:  # nothing half-applied: a subscribe that failed leaves no subscription behind
            await deps.hub.leave(session, channel)
        raise
    if request is None:
        if session.server_channels is None:
            session.server_channels = set()
        session.server_channels.add(channel)
    frame: dict[str, Any] = {"type": "subscribed", "channel": channel}
    if found is not None:
        frame["offset"], frame["epoch"] = found.offset, found.epoch
    if since is not None:
        frame["recovered"] = found is not None and found.recovered
    if data is not None:
        frame["data"] = data
    out = session.send if request is not None else session.deliver
    out(reply(request, frame) if request is not None else encode(frame))
    if found is not None:
        for text in found.messages:
            out(text)
        if since is not None or not held:
            # Publications up to here that arrive from now on are duplicates of the replay, or (a first subscribe)
            # older than the position just told. A plain re-subscribe to a held channel drops nothing: what is in
            # flight to this connection was never sent to it.
            session.recovered_to(channel, Position(found.offset, found.epoch))


async def _unsubscribe(session: Connection, request: Request) -> None:
    channel = channel_of(request)
    await session.deps.hub.leave(session, channel)
    if session.server_channels is not None:  # given up: subscribing again needs the client's own right
        session.server_channels.discard(channel)
    session.send(reply(request, {"type": "unsubscribed", "channel": channel}))


async def _publish(session: Connection, request: Request) -> None:
    channel = channel_of(request)
    if "data" not in request:
        raise ProtocolError(BAD_REQUEST, "publish needs 'data'", request.get("id"))
    if not session.grants.may_publish(channel):
        raise ProtocolError(FORBIDDEN, f"scope does not grant publish:{channel}", request.get("id"))
    deps = session.deps
    if not deps.channels(channel).client_publish:
        raise ProtocolError(FORBIDDEN, f"clients may not publish to {channel}", request.get("id"))
    data = request["data"]
    hooks = deps.on_publish
    found = hooks.for_channel(channel)
    if found:
        replaced = await hooks.run(found, request.get("id"), "on_publish", session.context, channel, data)
        if replaced is not None:
            data = replaced
    await deps.publish(channel, data, session.principal.sub)
    session.send(reply(request, {"type": "published", "channel": channel}))


async def _history(session: Connection, request: Request) -> None:
    channel = channel_of(request)
    since = since_of(request)
    history = session.deps.channels(channel).history
    limit = limit_of(request, history.size if history is not None else 0)
    if not session.grants.may_subscribe(channel):
        raise ProtocolError(FORBIDDEN, f"scope does not grant subscribe:{channel}", request.get("id"))
    found = await session.deps.history(channel, None if since is None else Position(*since), limit)
    session.send(history_reply(request, channel, found, since is not None))


def history_reply(request: Request, channel: str, found: History | None, with_since: bool) -> str:
    """``{"type":"history","channel":C,"offset":N,"epoch":E,"messages":[…]}`` (``recovered`` too when asked
    ``since``), the messages spliced in as the texts they are: no JSON decoded or encoded per message."""
    frame: dict[str, Any] = {"type": "history", "channel": channel}
    if found is not None:
        frame["offset"], frame["epoch"] = found.offset, found.epoch
    if with_since:
        frame["recovered"] = found is not None and found.recovered
    head = reply(request, frame)
    return head[:-1] + ',"messages":[' + ",".join(found.messages if found is not None else ()) + "]}"


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
    given = session.server_channels or ()
    for channel in tuple(session.channels):
        if channel not in given and not session.grants.may_subscribe(channel):
            await session.deps.hub.leave(session, channel)
            session.send(error(FORBIDDEN, f"refreshed scope no longer grants subscribe:{channel}", channel=channel))
    session.send(reply(request, {"type": "refreshed", "expires_at": principal.exp}))


BUILT_INS: dict[str, Route] = {
    "ping": ping,
    "echo": echo,
    "cancel": cancel,
    "subscribe": subscribe,
    "unsubscribe": unsubscribe,
    "publish": publish,
    "refresh": refresh,
    "presence": presence.request,
    "history": history,
}

"""Presence (SPEC §11): who is subscribed to a channel on every node, join/leave events for the
connections that asked, and the ``presence`` request.

A subscribe records the connection's entry after the hub has joined it (:meth:`Roster.join`); the hub
drops it whenever the connection leaves the channel — unsubscribe, a refresh that loses the right,
disconnect — (:meth:`Roster.leave`). The entry and its event change in storage as one step.

Events cost only where they are wanted: storage delivers a channel's events to a process only while
one of its connections asked for them (``"join_leave":true``), and only those connections get them,
through their bounded send queue like any publication (a listener that cannot keep up is a slow
consumer). A connection never hears its own join or leave.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..state.storage import StorageUnavailable
from ..wire.messages import FORBIDDEN, ProtocolError, channel_of, encode, reply

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ..state.presence import PresenceStore
    from .types import Connection

log = logging.getLogger("secure_ws.session")

# Bounds on what one answer lists (a presence answer: ≤ 1,000 × (16 + 256-character sub) characters).
MAX_CLIENTS = 1_000
MAX_CHANNELS = 10_000
MAX_NODES = 1_000


class Roster:
    def __init__(self, store: PresenceStore) -> None:
        self.store = store
        # channel → local connections that asked for join/leave; ≤ connections × SECURE_WS_MAX_SUBSCRIPTIONS.
        self._listeners: dict[str, set[Connection]] = {}
        store.on_event = self._event

    async def join(self, connection: Connection, channel: str, join_leave: bool) -> None:
        """After the hub joined ``connection`` to ``channel``: its entry, and whether it hears events.
        If storage fails, the connection leaves the channel again (the client was answered ``unavailable``)."""
        try:
            if join_leave:
                await self._listen(connection, channel)
            else:
                await self._unlisten(connection, channel)
            await self.store.add(channel, connection.id, connection.principal.sub, _event("join", channel, connection))
        except Exception:
            await connection.deps.hub.leave(connection, channel)
            raise

    async def leave(self, connection: Connection, channel: str) -> None:
        """Never raises: an entry storage could not drop is no longer renewed and expires by itself."""
        await self._unlisten(connection, channel)
        try:
            await self.store.remove(channel, connection.id, _event("leave", channel, connection))
        except StorageUnavailable as exc:
            log.warning("session %s: presence in %r not withdrawn (expires by itself): %s", connection.id, channel, exc)

    async def _listen(self, connection: Connection, channel: str) -> None:
        listeners = self._listeners.get(channel)
        if listeners is None:
            await self.store.listen(channel)  # first: if it raises, nothing is half-registered
            listeners = self._listeners.setdefault(channel, set())
        listeners.add(connection)

    async def _unlisten(self, connection: Connection, channel: str) -> None:
        listeners = self._listeners.get(channel)
        if listeners is None or connection not in listeners:
            return
        listeners.discard(connection)
        if not listeners:
            del self._listeners[channel]
            await self.store.unlisten(channel)

    def _event(self, channel: str, text: str) -> None:
        listeners = self._listeners.get(channel)
        if not listeners:
            return
        origin, _, frame = text.partition(" ")
        for connection in tuple(listeners):
            if connection.id != origin:
                connection.deliver(frame)

    async def clients(self, channel: str) -> tuple[dict[str, str], int]:
        """At most ``MAX_CLIENTS`` subscribers of ``channel`` (connection id → sub), and how many in all."""
        return await self.store.clients(channel, MAX_CLIENTS)

    async def channels(self) -> dict[str, int]:
        return await self.store.channels(MAX_CHANNELS)

    async def nodes(self) -> list[dict[str, Any]]:
        return await self.store.nodes(MAX_NODES)


def _event(kind: str, channel: str, connection: Connection) -> str:
    frame = encode({"type": kind, "channel": channel, "sub": connection.principal.sub, "connection_id": connection.id})
    return f"{connection.id} {frame}"  # storage's event format: the origin, then the frame (see state.presence)


def request(session: Connection, request: dict[str, Any]) -> Awaitable[None]:
    """``{"type":"presence","channel":C}``, a dispatch table entry like the built-ins."""
    return session.waiting(request, _answer(session, request))


async def _answer(session: Connection, request: dict[str, Any]) -> None:
    channel = channel_of(request)
    if not session.grants.may_subscribe(channel):
        raise ProtocolError(FORBIDDEN, f"scope does not grant subscribe:{channel}", request.get("id"))
    if not session.deps.channels(channel).presence:
        raise ProtocolError(FORBIDDEN, f"presence is off for {channel}", request.get("id"))
    listed, count = await session.deps.presence.clients(channel)
    clients = {connection_id: {"sub": sub} for connection_id, sub in listed.items()}
    session.send(reply(request, {"type": "presence", "channel": channel, "clients": clients, "count": count}))

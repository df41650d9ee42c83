"""This process's live connections: found by ``sub`` and ``jti`` to enforce revocations and to
carry the application's pushes and disconnects, and by channel to fan out publications.

A channel is subscribed in storage once per process when its first local
subscriber joins and dropped when its last one leaves, so Redis carries one
subscription per channel per worker, never one per connection.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import TYPE_CHECKING

from .. import metrics
from ..auth.keys import Keyring
from ..auth.revocation import Revocations
from ..state.storage import DISCONNECT, SEND, Storage
from ..wire.closes import DISCONNECTED, REVOKED, Close
from ..wire.framing import TEXT, frame

if TYPE_CHECKING:
    from .types import Connection, Presence


class Hub:
    def __init__(self, storage: Storage, presence: Presence) -> None:
        self.storage = storage
        self.presence = presence
        self.sessions: set[Connection] = set()
        self._by_sub: defaultdict[str, set[Connection]] = defaultdict(set)
        self._channels: dict[str, set[Connection]] = {}
        self._turn = False  # a publication fanned out in this loop turn: those after it are written together
        storage.on_message = self.fan_out
        storage.on_signal = self.signal

    def add(self, session: Connection) -> None:
        self.sessions.add(session)
        self._by_sub[session.principal.sub].add(session)

    def _discard_sub(self, session: Connection, sub: str) -> None:
        peers = self._by_sub.get(sub)
        if peers is not None:
            peers.discard(session)
            if not peers:
                del self._by_sub[sub]

    async def remove(self, session: Connection) -> None:
        self.sessions.discard(session)
        self._discard_sub(session, session.principal.sub)
        for channel in list(session.channels):
            await self.leave(session, channel)

    async def join(self, session: Connection, channel: str) -> None:
        members = self._channels.get(channel)
        if members is None:
            # Subscribe first: if storage is down this raises and leaves no half-registered channel behind.
            await self.storage.subscribe(channel)
            members = self._channels.setdefault(channel, set())
        members.add(session)
        session.channels.add(channel)

    async def leave(self, session: Connection, channel: str) -> None:
        await self.presence.leave(session, channel)  # every way out of a channel passes here; never raises
        session.channels.discard(channel)
        members = self._channels.get(channel)
        if members is None:
            return
        members.discard(session)
        if not members:
            del self._channels[channel]
            await self.storage.unsubscribe(channel)  # never raises: storage reconciles after an outage

    def fan_out(self, channel: str, payload: str, offset: int, epoch: str) -> None:
        members = self._channels.get(channel)
        if not members:
            return
        members_now = tuple(members)
        metrics.STATS.deliveries += len(members_now)
        data = frame(TEXT, payload.encode())  # encoded and framed once: each subscriber costs one write of it
        later = self._turn
        if not later:
            self._turn = True
            asyncio.get_running_loop().call_soon(self._end_turn)
        for session in members_now:
            session.deliver(payload, channel, offset, epoch, data, later)

    def _end_turn(self) -> None:
        self._turn = False

    def signal(self, kind: str, sub: str, text: str | None) -> None:
        """A push to every local connection of ``sub`` (``SEND``), or their close (``DISCONNECT``)."""
        for session in tuple(self._by_sub.get(sub, ())):
            if kind == SEND and text is not None:
                metrics.STATS.deliveries += 1
                session.deliver(text)
            elif kind == DISCONNECT:
                session.close_soon(Close.POLICY_VIOLATION, DISCONNECTED)

    def enforce_revocations(self, revocations: Revocations) -> None:
        for sub in revocations.subs:
            for session in tuple(self._by_sub.get(sub, ())):
                if revocations.covers(session.principal):
                    session.close_soon(Close.POLICY_VIOLATION, REVOKED)
        if revocations.jtis:
            for session in tuple(self.sessions):
                if session.principal.jti in revocations.jtis:
                    session.close_soon(Close.POLICY_VIOLATION, REVOKED)

    def enforce_keyring(self, old: Keyring, new: Keyring) -> None:
        gone = old.invalidated_by(new)
        if gone:
            for session in tuple(self.sessions):
                if session.principal.kid in gone:
                    session.close_soon(Close.POLICY_VIOLATION, REVOKED)

    def close_all(self, code: int, reason: str) -> None:
        for session in tuple(self.sessions):
            session.close_soon(code, reason)

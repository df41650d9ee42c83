"""Storage for one process: everything in memory, revocations from the file.

Bounds: one set of connection ids per ``sub`` holding a connection (each at most
``SECURE_WS_MAX_CONNECTIONS_PER_CLIENT``), one entry per channel with a local subscriber, and the
channel history's own (:mod:`.memory_history`).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from ..auth.revocation import Revocations
from .local_window import LocalStorage
from .memory_history import MemoryHistory
from .storage import History, HistoryLimits, Position, Storage


class MemoryStorage(Storage):
    """One process: revocations live only in the file, which the ops commands write and this polls."""

    def __init__(self, revocation_file: Path, history: HistoryLimits | None = None) -> None:
        super().__init__(revocation_file, history)
        # Made for every storage: whether a channel keeps history is the channel's option (history_for).
        self._history = MemoryHistory(self.history_limits or HistoryLimits(0, 0, self.max_history_bytes))
        self.limiter_storage = LocalStorage()
        self._connections: defaultdict[str, set[str]] = defaultdict(set)
        self._channels: set[str] = set()

    async def ping(self) -> bool:
        return True

    async def acquire_connection(self, sub: str, connection_id: str, limit: int) -> bool:
        held = self._connections[sub]
        if len(held) >= limit:
            return False
        held.add(connection_id)
        return True

    async def release_connection(self, sub: str, connection_id: str) -> None:
        held = self._connections.get(sub)
        if held is not None:
            held.discard(connection_id)
            if not held:
                del self._connections[sub]

    async def update_revocations(self, change: Callable[[Revocations], Revocations]) -> Revocations:
        return self.learn(await asyncio.to_thread(self.revocation_file.update, change))

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def publish(self, channel: str, head: str) -> Position | None:
        limits = self.history_for(channel)
        if limits is None:
            if channel in self._channels:
                self.on_message(channel, head + "}", 0, "")
            return None
        text, position = self._history.append(channel, head, limits)
        if channel in self._channels:
            self.on_message(channel, text, position.offset, position.epoch)
        return position

    async def history(self, channel: str, since: Position | None, limit: int) -> History | None:
        limits = self.history_for(channel)
        return None if limits is None else self._history.read(channel, since, min(limit, limits.size))

    async def signal(self, kind: str, sub: str, payload: str | None = None) -> None:
        self.on_signal(kind, sub, payload)

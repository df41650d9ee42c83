"""Presence: which connections are subscribed to a channel, on every node; join/leave events; live nodes.

The interface (:class:`PresenceStore`) and its one-process implementation
(:class:`MemoryPresence`); :mod:`.redis_presence` shares it between workers and
hosts. The store holds entries (channel, connection id, sub) for the
connections of this process and answers for all of them; the core
(:mod:`secure_ws.core.presence`) decides when an entry comes and goes and who
hears the events.

An event is published as ``"<connection id> <frame>"`` so that a receiving
process can skip the connection it came from without parsing the frame.

Bounds: entries ≤ connections × ``SECURE_WS_MAX_SUBSCRIPTIONS`` (one per held
subscription); listened channels ≤ the channels with a local subscriber that
asked for ``join_leave``; every answer is cut at the ``limit`` its caller gives.
"""

from __future__ import annotations

import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from itertools import islice
from typing import Any

EventListener = Callable[[str, str], None]  # (channel, "<connection id> <frame>")
NodeStats = Callable[[], dict[str, int]]  # this process's live counts, read when its node entry is written


def this_node() -> dict[str, Any]:
    """What identifies this process among the nodes (``started`` in Unix seconds)."""
    return {
        "id": f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}",
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "started": int(time.time()),
    }


class PresenceStore(ABC):
    """Raises :class:`~secure_ws.state.storage.StorageUnavailable` when it cannot be reached (callers answer
    ``unavailable``)."""

    def __init__(self) -> None:
        self.on_event: EventListener = lambda channel, text: None
        self.node_stats: NodeStats = dict
        self.node = this_node()

    @abstractmethod
    async def start(self) -> None:
        """Begin heartbeats; never raises (a store that does not answer yet is retried)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop heartbeats and withdraw this node."""

    def node_info(self) -> dict[str, Any]:
        return {**self.node, **self.node_stats()}

    @abstractmethod
    async def add(self, channel: str, connection_id: str, sub: str, event: str) -> None:
        """Record the entry and publish ``event`` to the channel's listeners, in one step; nothing if held already."""

    @abstractmethod
    async def remove(self, channel: str, connection_id: str, event: str) -> None:
        """Drop the entry and publish ``event``, in one step; nothing if not held."""

    @abstractmethod
    async def listen(self, channel: str) -> None:
        """This process wants ``on_event`` calls for ``channel`` (once per process, not per connection)."""

    @abstractmethod
    async def unlisten(self, channel: str) -> None:
        """Never raises: a store that does not answer drops the listening once it does."""

    @abstractmethod
    async def clients(self, channel: str, limit: int) -> tuple[dict[str, str], int]:
        """At most ``limit`` entries of ``channel`` (connection id → sub), and how many there are in all."""

    @abstractmethod
    async def channels(self, limit: int) -> dict[str, int]:
        """At most ``limit`` channels with at least one entry, each with its number of entries."""

    @abstractmethod
    async def nodes(self, limit: int) -> list[dict[str, Any]]:
        """At most ``limit`` live nodes, this one first, with what :meth:`node_info` gives."""


class MemoryPresence(PresenceStore):
    """One process: the entries are this process's, events go straight to the listener."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[str, dict[str, str]] = {}  # channel → {connection id: sub}; bound in the module doc

    async def start(self) -> None:
        pass  # no heartbeat: this process is the only node

    async def close(self) -> None:
        pass

    async def add(self, channel: str, connection_id: str, sub: str, event: str) -> None:
        entries = self._entries.setdefault(channel, {})
        if connection_id not in entries:
            entries[connection_id] = sub
            self.on_event(channel, event)

    async def remove(self, channel: str, connection_id: str, event: str) -> None:
        entries = self._entries.get(channel)
        if entries is None or entries.pop(connection_id, None) is None:
            return
        if not entries:
            del self._entries[channel]
        self.on_event(channel, event)

    async def listen(self, channel: str) -> None:
        pass  # events are handed to on_event whoever listens

    async def unlisten(self, channel: str) -> None:
        pass

    async def clients(self, channel: str, limit: int) -> tuple[dict[str, str], int]:
        entries = self._entries.get(channel, {})
        return dict(islice(entries.items(), limit)), len(entries)

    async def channels(self, limit: int) -> dict[str, int]:
        return {channel: len(entries) for channel, entries in islice(self._entries.items(), limit)}

    async def nodes(self, limit: int) -> list[dict[str, Any]]:
        return [self.node_info()]

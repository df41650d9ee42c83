"""Shared state behind one small interface: memory for one process, Redis for many.

What workers must agree on: rate-limit windows (``limits``' own storage),
connection counts per ``sub``, revocations (and a nudge when they change), and
channel fan-out. :func:`storage_from_url` picks the implementation from
``SECURE_WS_STORAGE_URL``.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

from limits.aio.storage import Storage as LimitsStorage

from .files import fingerprint, locked, read_json, write_json
from .ratelimit import LocalStorage
from .revocation import Revocations

log = logging.getLogger("secure_ws.storage")

POLL_INTERVAL = 0.5

RevocationListener = Callable[[Revocations], None]
MessageListener = Callable[[str, str], None]  # (channel, payload)


class Storage(ABC):
    limiter_storage: LimitsStorage
    # What this storage raises when it cannot be reached: callers degrade instead of failing with 1011.
    errors: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        self.on_revocations: RevocationListener = lambda revocations: None
        self.on_message: MessageListener = lambda channel, payload: None

    async def start(self) -> None:
        """Connect and begin watching; called from the app's lifespan."""

    async def close(self) -> None:
        """Release connections and background tasks."""

    @abstractmethod
    async def ping(self) -> bool: ...

    @abstractmethod
    async def acquire_connection(self, sub: str, connection_id: str, limit: int) -> bool: ...

    @abstractmethod
    async def release_connection(self, sub: str, connection_id: str) -> None: ...

    @abstractmethod
    async def load_revocations(self) -> Revocations: ...

    @abstractmethod
    async def update_revocations(self, change: Callable[[Revocations], Revocations]) -> Revocations:
        """Apply ``change`` atomically and make every worker see the result."""

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """This process wants ``on_message`` calls for ``channel`` (once per process, not per connection)."""

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Never raises: if storage is unreachable, the subscription is dropped once it answers again."""

    @abstractmethod
    async def publish(self, channel: str, payload: str) -> None: ...


class MemoryStorage(Storage):
    """One process. Revocations persist in a JSON file that the ops commands write and this polls."""

    def __init__(self, revocation_file: Path) -> None:
        super().__init__()
        self.limiter_storage = LocalStorage()
        self.revocation_file = revocation_file
        self._connections: defaultdict[str, set[str]] = defaultdict(set)
        self._channels: set[str] = set()
        self._print: tuple[int, int, int] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="secure-ws revocation watcher")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

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

    def read_revocations(self) -> Revocations:
        try:
            return Revocations.from_json(read_json(self.revocation_file, default={})).pruned()
        except (ValueError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"{self.revocation_file}: {exc}") from None

    async def load_revocations(self) -> Revocations:
        self._print = await asyncio.to_thread(fingerprint, self.revocation_file)
        return await asyncio.to_thread(self.read_revocations)

    def _update(self, change: Callable[[Revocations], Revocations]) -> Revocations:
        with locked(self.revocation_file):
            revocations = change(self.read_revocations()).pruned()
            write_json(self.revocation_file, revocations.to_json())
        return revocations

    async def update_revocations(self, change: Callable[[Revocations], Revocations]) -> Revocations:
        revocations = await asyncio.to_thread(self._update, change)
        self.on_revocations(revocations)
        return revocations

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                current = await asyncio.to_thread(fingerprint, self.revocation_file)
                if current == self._print:
                    continue
                self._print = current
                revocations = await asyncio.to_thread(self.read_revocations)
            except (OSError, ValueError) as exc:
                log.error("revocations: %s; keeping the last good list", exc)
                continue
            self.on_revocations(revocations)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def publish(self, channel: str, payload: str) -> None:
        if channel in self._channels:
            self.on_message(channel, payload)


def storage_from_url(url: str, revocation_file: Path) -> Storage:
    if url == "memory://":
        return MemoryStorage(revocation_file)
    from .redis_storage import RedisStorage  # imported only when used: keeps memory mode light

    return RedisStorage(url)


async def run_storage(url: str, revocation_file: Path, action: Callable[[Storage], Awaitable[object]]) -> object:
    """For the ops commands: open storage, do one thing, close."""
    storage = storage_from_url(url, revocation_file)
    try:
        return await action(storage)
    finally:
        await storage.close()

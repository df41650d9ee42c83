"""``SECURE_WS_STORAGE_URL`` → the storage it names (kept apart from both, so neither imports the other)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from .memory import MemoryStorage
from .presence import MemoryPresence, PresenceStore
from .storage import HistoryLimits, Storage


def storage_from_url(url: str, revocation_file: Path, history: HistoryLimits | None = None) -> Storage:
    """``history`` None (or size/TTL 0): channels keep no history. Whatever publishes must pass the server's
    limits, or its publications would go out without offsets."""
    if url == "memory://":
        return MemoryStorage(revocation_file, history)
    from .redis_storage import RedisStorage  # imported only when used: keeps memory mode light

    return RedisStorage(url, revocation_file, history)


def presence_store(storage: Storage) -> PresenceStore:
    """The presence store beside ``storage``: on the same Redis connection pool, or in memory."""
    if isinstance(storage, MemoryStorage):
        return MemoryPresence()
    from .redis_presence import RedisPresence  # imported only when used, as above
    from .redis_storage import RedisStorage

    if not isinstance(storage, RedisStorage):
        raise TypeError(f"no presence store for {type(storage).__name__}")
    return RedisPresence(storage.redis, storage.cluster)


async def run_storage(
    url: str, revocation_file: Path, action: Callable[[Storage], Awaitable[object]], history: HistoryLimits | None = None
) -> object:
    """For the ops commands: open storage, do one thing, close."""
    storage = storage_from_url(url, revocation_file, history)
    try:
        return await action(storage)
    finally:
        await storage.close()



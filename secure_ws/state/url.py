"""``SECURE_WS_STORAGE_URL`` → the storage it names (kept apart from both, so neither imports the other)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from .memory import MemoryStorage
from .storage import Storage


def storage_from_url(url: str, revocation_file: Path) -> Storage:
    if url == "memory://":
        return MemoryStorage(revocation_file)
    from .redis_storage import RedisStorage  # imported only when used: keeps memory mode light

    return RedisStorage(url, revocation_file)


async def run_storage(url: str, revocation_file: Path, action: Callable[[Storage], Awaitable[object]]) -> object:
    """For the ops commands: open storage, do one thing, close."""
    storage = storage_from_url(url, revocation_file)
    try:
        return await action(storage)
    finally:
        await storage.close()


def redacted_url(url: str) -> str:
    """The URL without its password, for the log and the ops commands' stderr."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"

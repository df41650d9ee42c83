"""``secure_ws.Publisher``: push to clients from another Python process that shares the server's Redis
(a Celery task, a Django view), without an HTTP round trip to the server API.

It opens the same storage the server does (:mod:`secure_ws.state`) and goes through the same
actions (:mod:`secure_ws.state.actions`), so what it publishes is exactly what ``POST /api/publish``
would publish. It starts none of the storage's watchers: it only writes.

    publisher = Publisher.from_url("redis://127.0.0.1:6379/0")   # the server's SECURE_WS_STORAGE_URL
    await publisher.publish("news", {"title": "…"})                # {"offset":N,"epoch":E}, or {}
    await publisher.send("alice", {"unread": 3})
    await publisher.disconnect("mallory")
    await publisher.close()                                        # or: async with Publisher.from_url(…) as publisher:
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from .settings import Settings, load_settings
from .state import actions
from .state.channel_options import ChannelRules, Rule
from .state.storage import HistoryLimits, Storage
from .state.url import storage_from_url

# Storage wants a revocation file; a publisher never reads or writes it (it does not start the storage).
_UNUSED_REVOCATION_FILE = Path(os.devnull)


class Publisher:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None, rules: Iterable[Rule] = ()) -> Publisher:
        """For the server's ``SECURE_WS_STORAGE_URL``, which must name Redis (one, Sentinel or Cluster): with
        ``memory://`` the server's state lives inside its own process, out of any other process's reach.

        Publications go into the channels' history with the server's limits: ``SECURE_WS_HISTORY_SIZE`` and
        ``SECURE_WS_HISTORY_TTL`` are read from ``settings`` (by default from the environment and ``.env``, as
        the server reads them), so give this process the server's values, and its ``SECURE_WS_CHANNELS_FILE``;
        channel options an application declares in code (``api.channels``) are passed as ``rules=api.registry.channels``."""
        if url == "memory://":
            raise ValueError(
                "a Publisher needs the server's redis:// storage URL; with memory:// the server's state lives "
                "inside its process (use the server API, POST /api/publish, instead)"
            )
        settings = settings if settings is not None else load_settings()
        storage = storage_from_url(url, _UNUSED_REVOCATION_FILE, HistoryLimits.of(settings))
        # Each channel's history limits as the server has them: its SECURE_WS_CHANNELS_FILE, then `rules`.
        storage.history_for = ChannelRules.load(settings, rules).history
        return cls(storage)

    # Every call raises secure_ws.state.storage.StorageUnavailable while Redis cannot be reached.

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        """``{"type":"message","channel":C,"data":X}`` to every subscriber of ``channel`` on every node;
        ``{"offset":N,"epoch":E}`` on a channel with history, else ``{}``."""
        return await actions.publish(self.storage, channel, data)

    async def send(self, sub: str, data: Any) -> None:
        """``{"type":"push","data":X}`` to every live connection of ``sub`` on every node."""
        await actions.send(self.storage, sub, data)

    async def disconnect(self, sub: str) -> None:
        """Close every connection of ``sub`` 1008 ``disconnected`` (the client may reconnect)."""
        await actions.disconnect(self.storage, sub)

    async def close(self) -> None:
        await self.storage.close()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

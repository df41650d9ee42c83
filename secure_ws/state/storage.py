"""Shared state behind one small interface: memory for one process, Redis for many.

What workers must agree on: rate-limit windows (``limits``' own storage),
connection counts per ``sub``, revocations (and a nudge when they change),
channel fan-out and history (offsets, epochs, the last publications: SPEC §11),
and signals to every connection of one ``sub``. When it cannot be reached, a
backend raises :class:`StorageUnavailable`, nothing of its own. :func:`secure_ws.storage_url.storage_from_url` picks the
implementation from ``SECURE_WS_STORAGE_URL``.

Revocations, with either storage, are what this process has *learnt* from every
source — the revocation file (:mod:`secure_ws.revocation_file`) and, with Redis,
the Redis hashes — merged, never replaced: a source that suddenly says less
(Redis restarted empty, the file deleted) takes nothing back before it expires.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from limits.aio.storage import Storage as LimitsStorage

from ..auth.revocation import Revocations
from ..auth.revocation_file import RevocationFile
from ..settings import Settings

log = logging.getLogger("secure_ws.storage")

POLL_INTERVAL = 0.5

RevocationListener = Callable[[Revocations], None]
MessageListener = Callable[[str, str, int, str], None]  # (channel, payload, offset, epoch); 0 and "" without history
SignalListener = Callable[[str, str, "str | None"], None]  # (kind, sub, payload)
# Signals to every connection of one sub, on every worker and host (SPEC §9: api.send, api.disconnect).
SEND = "send"
DISCONNECT = "disconnect"


# A channel's history record outlives its messages by this much (or the history TTL, if longer): a client that
# saw everything still recovers (with nothing to replay) after the channel was idle past the TTL.
META_TTL = 3600


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """SPEC §11: each channel keeps its last ``size`` publications for ``ttl`` seconds after its last one;
    ``max_bytes`` bounds the memory backend's total."""

    size: int
    ttl: int
    max_bytes: int = 64 * 1024 * 1024

    @property
    def meta_ttl(self) -> int:
        return max(self.ttl, META_TTL)

    @classmethod
    def of(cls, settings: Settings) -> HistoryLimits:
        """The configured limits: what the server uses, and what anything else publishing into its storage must."""
        return cls(settings.history_size, settings.history_ttl, settings.history_max_bytes)


class Position(NamedTuple):
    """Where a channel's history is: its last offset (0 before the first publication) and its epoch."""

    offset: int
    epoch: str


class History(NamedTuple):
    """What a read of a channel's history found. ``messages`` are the exact texts subscribers were sent, oldest
    first, each with its offset: with ``since``, those after it (all consecutive); without, the latest ones.
    ``recovered`` is False when ``since`` could not be honoured (another epoch, or fallen out), and then
    ``messages`` is empty."""

    offset: int
    epoch: str
    messages: list[str]
    recovered: bool


class StorageUnavailable(Exception):
    """Shared storage cannot be reached or did not answer in time: the one error a backend raises for it, so
    callers degrade (or answer ``unavailable``) without knowing the backend's own exception types. The rate
    limiter's storage (``limits``) says the same with its wrapped ``limits.errors.StorageError``."""


class Storage(ABC):
    limiter_storage: LimitsStorage

    def __init__(self, revocation_file: Path, history: HistoryLimits | None = None) -> None:
        self.history_limits = history if history is not None and history.size > 0 and history.ttl > 0 else None
        self.max_history_bytes = history.max_bytes if history is not None else HistoryLimits(0, 0).max_bytes
        # A channel's history limits (None: it keeps none), asked on every append and read: the same for every
        # channel unless the service sets its channel rules' (secure_ws.state.channel_options.ChannelRules.history).
        self.history_for: Callable[[str], HistoryLimits | None] = lambda channel: self.history_limits
        self.on_revocations: RevocationListener = lambda revocations: None
        self.on_message: MessageListener = lambda channel, payload, offset, epoch: None
        self.on_signal: SignalListener = lambda kind, sub, payload: None
        self.revocation_file = RevocationFile(revocation_file)
        self.revocations = Revocations()  # everything this process knows is revoked
        self._watcher: asyncio.Task[None] | None = None

    def load_initial(self) -> None:
        """Blocking, before the server listens: an unreadable revocation file stops start-up (OSError, ValueError)."""
        self.revocations = self.revocation_file.load_initial()

    @property
    def revocations_problem(self) -> str | None:
        """Why the revocation list may be incomplete right now (handshakes are refused meanwhile), or None."""
        return self.revocation_file.problem

    @property
    def revocations_checked_at(self) -> float:
        """When this process last confirmed its revocation list against every source (epoch s): a revocation
        written to them before then is enforced here."""
        return self.revocation_file.checked_at

    def learn(self, revocations: Revocations) -> Revocations:
        """Merge what a source says into what this process knows; tell the listener if that changed."""
        merged = self.revocations.merged(revocations).pruned()
        if merged != self.revocations:
            self.revocations = merged
            self.on_revocations(merged)
        return merged

    async def start(self) -> None:
        """Connect and begin watching; called from the app's lifespan."""
        self._watcher = asyncio.create_task(self._watch_file(), name="secure-ws revocation file watcher")

    async def close(self) -> None:
        """Release connections and background tasks."""
        if self._watcher is not None:
            self._watcher.cancel()

    async def reload_revocations(self) -> None:
        """SIGHUP: re-read every source now, changed or not."""
        revocations = await self.revocation_file.poll(force=True)
        if revocations is not None:
            self.learn(revocations)
        log.info("revocations: reloaded, %d known", len(self.revocations.jtis) + len(self.revocations.subs))

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            revocations = await self.revocation_file.poll()
            if revocations is not None:
                self.learn(revocations)

    @abstractmethod
    async def ping(self) -> bool: ...

    @abstractmethod
    async def acquire_connection(self, sub: str, connection_id: str, limit: int) -> bool: ...

    @abstractmethod
    async def release_connection(self, sub: str, connection_id: str) -> None: ...

    @abstractmethod
    async def update_revocations(self, change: Callable[[Revocations], Revocations]) -> Revocations:
        """For the ops command: apply ``change`` to the file (durable first), then make every worker see it."""

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """This process wants ``on_message`` calls for ``channel`` (once per process, not per connection)."""

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Never raises: if storage is unreachable, the subscription is dropped once it answers again."""

    @abstractmethod
    async def publish(self, channel: str, head: str) -> Position | None:
        """``head`` is the message's JSON object without its closing brace. With history, append it to the channel's
        history with the next offset and ``,"offset":N,"epoch":"E"}``, and fan it out, as one step (no subscriber
        sees N+1 before N); return where it went. Without, fan out ``head + "}"`` and return None."""

    @abstractmethod
    async def history(self, channel: str, since: Position | None, limit: int) -> History | None:
        """The channel's position and at most ``limit`` messages (after ``since``, or the latest); None with
        history off. Creates the channel's record (with a fresh epoch) if it has none, so the epoch a subscriber
        is told stays valid until history is really lost."""

    @abstractmethod
    async def signal(self, kind: str, sub: str, payload: str | None = None) -> None:
        """``on_signal(kind, sub, payload)`` in every process, this one included."""


def redacted_url(url: str) -> str:
    """The URL without its password, for the log and the ops commands' stderr."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    hosts = netloc.rpartition("@")[2]  # every address, for Sentinel and Cluster
    return f"{scheme}{sep}{hosts.partition('?')[0]}{slash}{path.partition('?')[0]}"

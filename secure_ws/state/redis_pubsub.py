"""One process's pub/sub reader over one Redis (classic ``SUBSCRIBE``) or Redis Cluster (sharded ``SSUBSCRIBE``:
a publication travels only within the shard owning its channel's slot, so pub/sub throughput grows with the
masters), and the watch that notices a subscription connection which died without a word.

A connection Redis closed (``CLIENT KILL``, a restart, a failover) fails its next read: redis-py reconnects and
re-subscribes. One that went silent (a network cut, a frozen server) fails nothing; so every ``PING_INTERVAL`` s
without traffic the reader pings on it, and one that has not answered within ``DEAD_AFTER`` s is dropped and
re-established: a deaf process is noticed within seconds, reported on ``/readyz`` and in the metrics, never left
deaf for hours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from .. import metrics

log = logging.getLogger("secure_ws.storage")

# What redis-py raises when Redis cannot be reached or answer in time; never seen above the state layer.
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

PING_INTERVAL = 1.0  # s of silence on a subscription connection before it is pinged
DEAD_AFTER = 3.0  # s a ping may stay unanswered before the connection counts as dead
RETRY_MAX = 0.5  # s between reconnection attempts at most: a failover is followed within this of its end
_PING = "sws-alive"

# The readers of this process whose connection is dead right now (ids; at most one per Subscriber, two per process).
_dead: set[int] = set()


def _report(subscriber: Subscriber, alive: bool) -> None:
    (_dead.discard if alive else _dead.add)(id(subscriber))
    metrics.PUBSUB_UP.set(0 if _dead else 1)


# Sharded pub/sub's message types, as the classic ones.
_TYPES = {"smessage": "message", "ssubscribe": "subscribe", "sunsubscribe": "unsubscribe"}


class Subscriber:
    """``names`` are full Redis channel names; messages come back as ``(type, channel, data)`` with the classic
    types (``message``, ``subscribe``, ``unsubscribe``, ``pong``)."""

    def __init__(self, redis: Any, sharded: bool) -> None:
        self.sharded = sharded
        self._redis = redis
        self.pubsub: PubSub = redis.pubsub()
        self._heard = time.monotonic()  # last time anything came in on the subscription connection(s)
        self._pinged: float | None = None  # when an unanswered ping went out
        self.alive = True  # False from a missed ping until the connection answers again
        _report(self, True)

    async def subscribe(self, *names: str) -> None:
        await (self.pubsub.ssubscribe(*names) if self.sharded else self.pubsub.subscribe(*names))

    async def unsubscribe(self, *names: str) -> None:
        await (self.pubsub.sunsubscribe(*names) if self.sharded else self.pubsub.unsubscribe(*names))

    def held(self) -> set[str]:
        """The channel names redis-py resubscribes on reconnect."""
        channels = self.pubsub.shard_channels if self.sharded else self.pubsub.channels
        return {c.decode() if isinstance(c, bytes) else c for c in channels}

    @property
    def subscribed(self) -> bool:
        return bool(self.pubsub.subscribed)

    async def get(self, timeout: float) -> tuple[str, str, bytes] | None:
        """The next message, or None after ``timeout`` s; raises one of ``REDIS_ERRORS`` on a broken connection."""
        if self.sharded:
            message = await self.pubsub.get_sharded_message(timeout=timeout)
        else:
            message = await self.pubsub.get_message(timeout=timeout)
        if message is None:
            return None
        self._heard = time.monotonic()
        self._pinged = None
        if not self.alive:
            self.alive = True
            _report(self, True)
            log.info("redis pub/sub: answering again")
        kind = _TYPES.get(message["type"], message["type"])
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        return kind, channel or "", message["data"]

    async def check(self) -> None:
        """Called by the reader after each read (which waits at most a second): ping a quiet connection, drop a
        dead one."""
        now = time.monotonic()
        if self._pinged is not None and now - self._pinged > DEAD_AFTER:
            if self.alive:
                log.warning("redis pub/sub: no answer to a ping for %.0fs; reconnecting", now - self._pinged)
            self.alive = False
            _report(self, False)
            self._pinged = None
            await self.renew()
            return
        if self._pinged is None and now - self._heard > PING_INTERVAL and self.subscribed:
            self._pinged = now
            with contextlib.suppress(*REDIS_ERRORS):
                async with asyncio.timeout(DEAD_AFTER):
                    for pubsub in self._connections():
                        await pubsub.ping(_PING)

    def _connections(self) -> list[PubSub]:
        if self.sharded:
            return list(self.pubsub.node_pubsub_mapping.values())  # type: ignore[attr-defined]
        return [self.pubsub]

    async def renew(self) -> None:
        """After a broken or silent connection. One Redis: a fresh pub/sub connection from the pool, which the owner
        re-subscribes (:func:`reconcile`) — redis-py would reconnect the old one to the address it had, which after
        a Sentinel failover is the old master. Cluster: the per-node connections are closed; redis-py's sharded
        reader reconnects them to whichever node owns each slot now, and re-subscribes."""
        if self.sharded:
            for pubsub in self._connections():
                if pubsub.connection is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.connection.disconnect()
            return
        old, self.pubsub = self.pubsub, self._redis.pubsub()
        with contextlib.suppress(Exception):
            await old.aclose()

    async def aclose(self) -> None:
        _report(self, True)
        await self.pubsub.aclose()


async def unsubscribe_soon(subscriber: Subscriber, name: str) -> None:
    """No longer want ``name``; never raises: if Redis does not answer, :func:`reconcile` drops it once Redis
    answers again."""
    try:
        await subscriber.unsubscribe(name)
    except REDIS_ERRORS as exc:
        log.warning("redis: unsubscribe from %r deferred until Redis answers: %s", name, exc)


async def reconcile(subscriber: Subscriber, prefix: str, wanted: set[str]) -> None:
    """Make the subscriptions under ``prefix`` match the names in ``wanted`` (redis-py resubscribes its own list on
    reconnect, but an unsubscribe that failed while Redis was away is only missing from ``wanted``)."""
    held = {name for name in subscriber.held() if name.startswith(prefix)}
    stale = held - wanted
    missing = wanted - held
    if stale:
        await subscriber.unsubscribe(*stale)
    if missing:
        await subscriber.subscribe(*missing)

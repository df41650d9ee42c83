"""Redis storage: what lets many workers and hosts act as one service.

Keys (all under ``sws:``):

* rate-limit windows — ``limits``' own Redis storage on the same connection pool
  (one ``EVALSHA`` per frame for the sliding window);
* ``sws:conn:{sub}`` — a sorted set of connection leases scored by expiry (Redis
  ``TIME``); each process renews its leases every 10 s, so a worker that dies
  frees its subs within ``LEASE_SECONDS`` instead of locking them out forever;
* ``sws:rev:jti`` / ``sws:rev:sub`` — the revocation hashes, with a
  ``PUBLISH sws:revocations`` nudge so every worker re-reads them at once
  (plus a periodic re-read, so a nudge lost during a reconnect is not lost);
* ``sws:ch:<channel>`` — pub/sub channels, subscribed once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from limits.aio.storage import RedisStorage as LimitsRedisStorage
from redis.exceptions import RedisError

from .revocation import Revocations
from .storage import Storage

log = logging.getLogger("secure_ws.storage")

LEASE_SECONDS = 30
RENEW_INTERVAL = 10.0
REVOCATION_RESYNC_INTERVAL = 5.0
CHANNEL_PREFIX = "sws:ch:"
REVOCATION_CHANNEL = "sws:revocations"
REV_JTI = "sws:rev:jti"
REV_SUB = "sws:rev:sub"

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) + 1)
return 1
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('EXPIRE', key, tonumber(ARGV[1]) + 1)
end
return #KEYS
"""


def _conn_key(sub: str) -> str:
    return f"sws:conn:{{{sub}}}"


class RedisStorage(Storage):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.errors = (RedisError, OSError, asyncio.TimeoutError)
        self.redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=2, health_check_interval=10, retry_on_timeout=False
        )
        self.limiter_storage = LimitsRedisStorage(
            "async+" + url, implementation="redispy", connection_pool=self.redis.connection_pool
        )
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._leases: dict[str, str] = {}  # slot → sub, for renewal
        self._wanted: set[str] = set()  # channels this process has local subscribers for
        self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self._tasks: list[asyncio.Task[None]] = []
        self._revocations = Revocations()

    async def start(self) -> None:
        try:
            await self._pubsub.subscribe(REVOCATION_CHANNEL)
        except RedisError as exc:
            log.error("redis: %s; will keep retrying", exc)
        self._tasks = [
            asyncio.create_task(self._listen(), name="secure-ws redis pubsub"),
            asyncio.create_task(self._renew_leases(), name="secure-ws redis leases"),
            asyncio.create_task(self._resync_revocations(), name="secure-ws redis revocations"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), 2))
        except (RedisError, OSError, asyncio.TimeoutError):
            return False

    # -- connection leases ---------------------------------------------------------

    async def acquire_connection(self, sub: str, connection_id: str, limit: int) -> bool:
        ok = await self._acquire(keys=[_conn_key(sub)], args=[limit, LEASE_SECONDS, connection_id])
        if ok:
            self._leases[connection_id] = sub
        return bool(ok)

    async def release_connection(self, sub: str, connection_id: str) -> None:
        self._leases.pop(connection_id, None)
        await self.redis.zrem(_conn_key(sub), connection_id)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(RENEW_INTERVAL)
            leases = list(self._leases.items())
            for start in range(0, len(leases), 500):
                batch = leases[start : start + 500]
                try:
                    await self._renew(
                        keys=[_conn_key(sub) for _, sub in batch], args=[LEASE_SECONDS, *(slot for slot, _ in batch)]
                    )
                except (RedisError, OSError) as exc:
                    log.warning("redis: renewing connection leases failed: %s", exc)
                    break

    # -- revocations ---------------------------------------------------------------

    async def load_revocations(self) -> Revocations:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(REV_JTI)
            pipe.hgetall(REV_SUB)
            jtis_raw, subs_raw = await pipe.execute()
        jtis = {k.decode(): float(v) for k, v in jtis_raw.items()}
        subs = {}
        for k, v in subs_raw.items():
            before, _, until = v.decode().partition(":")
            subs[k.decode()] = (float(before), float(until))
        revocations = Revocations(jtis, subs)
        live = revocations.pruned()
        expired_jtis = revocations.jtis.keys() - live.jtis.keys()
        expired_subs = revocations.subs.keys() - live.subs.keys()
        if expired_jtis or expired_subs:
            async with self.redis.pipeline(transaction=False) as pipe:
                if expired_jtis:
                    pipe.hdel(REV_JTI, *expired_jtis)
                if expired_subs:
                    pipe.hdel(REV_SUB, *expired_subs)
                await pipe.execute()
        self._revocations = live
        return live

    async def update_revocations(self, change: Callable[[Revocations], Revocations]) -> Revocations:
        current = await self.load_revocations()
        updated = change(current)
        async with self.redis.pipeline(transaction=True) as pipe:
            # Only the entries this change touched: merges from concurrent ops commands are not overwritten.
            for jti, until in updated.jtis.items():
                if current.jtis.get(jti) != until:
                    pipe.hset(REV_JTI, jti, repr(until))
            for sub, (before, until) in updated.subs.items():
                if current.subs.get(sub) != (before, until):
                    pipe.hset(REV_SUB, sub, f"{before!r}:{until!r}")
            pipe.publish(REVOCATION_CHANNEL, b"changed")
            await pipe.execute()
        self.on_revocations(updated)
        return updated

    async def _reload_and_notify(self) -> None:
        before = self._revocations
        revocations = await self.load_revocations()
        if revocations != before:
            self.on_revocations(revocations)

    async def _resync_revocations(self) -> None:
        """Safety net for a nudge or an unsubscribe lost while Redis was away."""
        while True:
            await asyncio.sleep(REVOCATION_RESYNC_INTERVAL)
            with contextlib.suppress(*self.errors):
                await self._reload_and_notify()
                await self._reconcile()

    # -- channels ------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        await self._pubsub.subscribe(CHANNEL_PREFIX + channel)
        self._wanted.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        try:
            await self._pubsub.unsubscribe(CHANNEL_PREFIX + channel)
        except self.errors as exc:
            log.warning("redis: unsubscribe %r deferred until Redis answers: %s", channel, exc)

    async def _reconcile(self) -> None:
        """Make Redis's subscriptions match the local ones (redis-py resubscribes its own list on reconnect)."""
        prefix = len(CHANNEL_PREFIX)
        names = (c.decode() if isinstance(c, bytes) else c for c in self._pubsub.channels)
        held = {name[prefix:] for name in names if name.startswith(CHANNEL_PREFIX)}
        stale = [CHANNEL_PREFIX + c for c in held - self._wanted]
        missing = [CHANNEL_PREFIX + c for c in self._wanted - held]
        if stale:
            await self._pubsub.unsubscribe(*stale)
        if missing:
            await self._pubsub.subscribe(*missing)

    async def publish(self, channel: str, payload: str) -> None:
        await self.redis.publish(CHANNEL_PREFIX + channel, payload)

    async def _listen(self) -> None:
        """One reader per process; on a broken connection, resubscribe and re-read revocations."""
        prefix = len(CHANNEL_PREFIX)
        backoff = 0.1
        while True:
            try:
                if not self._pubsub.subscribed:
                    await self._pubsub.subscribe(REVOCATION_CHANNEL)
                message = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
            except (RedisError, OSError) as exc:
                log.warning("redis pub/sub: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                with contextlib.suppress(*self.errors):
                    await self._reload_and_notify()
                    await self._reconcile()
                continue
            if message is None:
                continue
            channel = message["channel"].decode()
            if channel == REVOCATION_CHANNEL:
                with contextlib.suppress(RedisError, OSError):
                    await self._reload_and_notify()
            else:
                self.on_message(channel[prefix:], message["data"].decode())

"""Presence in Redis: every worker and host sees the same entries, events and nodes.

Keys:

* ``sws:presence:{<channel>}`` — a sorted set of entries ``<connection id>:<sub>`` scored by expiry (Redis
  ``TIME``), like the connection leases: each process renews its own every ``RENEW_INTERVAL`` s in
  batches, so the entries of a process that dies without cleaning up (SIGKILL, a lost host) are gone
  from every answer within ``PRESENCE_SECONDS``. Expired entries are pruned by every write and read;
* ``sws:presence-channels`` — a sorted set of the channels with entries, scored by their latest expiry:
  what :meth:`RedisPresence.channels` walks;
* ``sws:presence-events:{<channel>}`` — pub/sub channel of join/leave events (sharded on Redis Cluster, in the
  slot of the channel's entries), published by the script that changes the entry (one round trip for both),
  subscribed only by processes with a local listener;
* ``sws:{nodes}`` / ``sws:{nodes}:info`` — live nodes scored by expiry (a heartbeat every
  ``NODE_BEAT_INTERVAL`` s, gone ``NODE_SECONDS`` after the last) and their info as JSON.

On Redis Cluster the index lives in another slot than the entries, so no script touches both: a join also
``ZADD``s the index (scored by this host's clock, a second command), renewals add their channels to it in one
command per batch, and :meth:`RedisPresence.channels` reads the index, then counts each listed channel's live
entries in one pipeline (one round trip per master) instead of pruning them in one script.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from .presence import PresenceStore
from .redis_pubsub import REDIS_ERRORS, RETRY_MAX, Subscriber, reconcile, unsubscribe_soon
from .redis_storage import raises_unavailable, sharded, slot_batches

log = logging.getLogger("secure_ws.storage")

PRESENCE_SECONDS = 30
RENEW_INTERVAL = 10.0
RENEW_BATCH = 500  # entries per renewal script: a few ms of Redis time each
NODE_SECONDS = 10
NODE_BEAT_INTERVAL = 2.0
# The index's name does not start with ENTRIES_PREFIX, so no channel's entries key can be it.
ENTRIES_PREFIX = "sws:presence:{"  # + channel + "}"
INDEX = "sws:presence-channels"
EVENTS_PREFIX = "sws:presence-events:{"  # + channel + "}"
NODES = "sws:{nodes}"  # one hash tag with NODE_INFO: the scripts touching both stay on one Cluster slot
NODE_INFO = "sws:{nodes}:info"

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""

# Every entry's expiry is Redis TIME + the same ttl, and scripts run one at a time, so the last write of a
# channel's index score is its latest expiry (no ZADD GT needed, which Redis < 6.2 lacks).

# The index is the scripts' last key on one Redis; on Redis Cluster it is not given (another slot): see above.

# KEYS: entries[, index]. ARGV: ttl, member, channel, event channel, event.
_ADD = _NOW + """
local exp = now + tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], exp, ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]) + 1)
if KEYS[2] then
  redis.call('ZADD', KEYS[2], exp, ARGV[3])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]) + 1)
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# KEYS: entries[, index]. ARGV: member, channel, event channel, event.
_REMOVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if KEYS[2] and redis.call('ZCARD', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS: entries…[, index]. ARGV: ttl, mode, then (member, channel) per entries key. Mode 'XX' renews only
# entries still there and returns the positions of those that are not (expired while Redis was away, or
# Redis restarted empty); mode 'ALL' writes them back.
_RENEW = _NOW + """
local ttl = tonumber(ARGV[1])
local exp = now + ttl
local n = (#ARGV - 2) / 2
local index = KEYS[n + 1]
local missing = {}
for i = 1, n do
  local member, channel = ARGV[2 * i + 1], ARGV[2 * i + 2]
  if ARGV[2] == 'XX' and not redis.call('ZSCORE', KEYS[i], member) then
    missing[#missing + 1] = i
  else
    redis.call('ZADD', KEYS[i], exp, member)
    redis.call('EXPIRE', KEYS[i], ttl + 1)
    if index then redis.call('ZADD', index, exp, channel) end
  end
end
if index then
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  redis.call('EXPIRE', index, ttl + 1)
end
return missing
"""

# KEYS: entries. ARGV: limit. Returns {count, {members…}}.
_CLIENTS = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return {redis.call('ZCARD', KEYS[1]), redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)}
"""

# KEYS: index. ARGV: entries prefix, limit. Returns {channel, count, …}; forgets channels left empty.
_CHANNELS = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {}
for _, channel in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)) do
  local key = ARGV[1] .. channel .. '}'
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local n = redis.call('ZCARD', key)
  if n > 0 then
    out[#out + 1] = channel
    out[#out + 1] = n
  else
    redis.call('ZREM', KEYS[1], channel)
  end
end
return out
"""

_PRUNE_NODES = _NOW + """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
"""

# KEYS: nodes, node info. ARGV: ttl, id, info.
_BEAT = _PRUNE_NODES + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# KEYS: nodes, node info. ARGV: limit. Returns the info of the live nodes.
_NODES = _PRUNE_NODES + """
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(ids))
"""


def _entries_key(channel: str) -> str:
    return ENTRIES_PREFIX + channel + "}"


def _events_name(channel: str) -> str:
    return EVENTS_PREFIX + channel + "}"


def _member(connection_id: str, sub: str) -> bytes:
    # surrogatepass: a token's sub is JSON, which can spell a lone surrogate; it must round-trip, not raise.
    return f"{connection_id}:{sub}".encode("utf-8", "surrogatepass")


class RedisPresence(PresenceStore):
    def __init__(self, redis: Any, cluster: bool = False) -> None:
        super().__init__()
        self.redis = redis
        self.cluster = cluster
        self._index = [] if cluster else [INDEX]  # the scripts' index key: none on Redis Cluster (another slot)
        self._add = redis.register_script(sharded(_ADD, cluster))
        self._remove = redis.register_script(sharded(_REMOVE, cluster))
        self._renew = redis.register_script(_RENEW)
        self._clients = redis.register_script(_CLIENTS)
        self._channels = redis.register_script(_CHANNELS)
        self._beat = redis.register_script(_BEAT)
        self._nodes = redis.register_script(_NODES)
        # This process's entries, for renewal: (channel, connection id) → sub; bound in .presence.
        self._held: dict[tuple[str, str], str] = {}
        self._wanted: set[str] = set()  # event names of the channels with a local listener: ≤ local connections × max subscriptions
        self._subscriber = Subscriber(redis, cluster)
        self._connected = asyncio.Event()  # set once the pub/sub connection exists: reading needs it
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="secure-ws presence events"),
            asyncio.create_task(self._renew_entries(), name="secure-ws presence renewal"),
            asyncio.create_task(self._heartbeat(), name="secure-ws node heartbeat"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.zrem(NODES, self.node["id"])
                    pipe.hdel(NODE_INFO, self.node["id"])
                    await pipe.execute()
        with contextlib.suppress(Exception):
            await self._subscriber.aclose()

    # -- entries and events ------------------------------------------------------------

    @raises_unavailable
    async def add(self, channel: str, connection_id: str, sub: str, event: str) -> None:
        if (channel, connection_id) in self._held:
            return
        await self._add(
            keys=[_entries_key(channel), *self._index],
            args=[PRESENCE_SECONDS, _member(connection_id, sub), channel, _events_name(channel), event],
        )
        self._held[channel, connection_id] = sub
        if self.cluster:
            await self._index_channels([channel])

    @raises_unavailable
    async def remove(self, channel: str, connection_id: str, event: str) -> None:
        # Forgotten first: if Redis does not answer, the entry is no longer renewed and expires by itself.
        sub = self._held.pop((channel, connection_id), None)
        if sub is None:
            return
        await self._remove(
            keys=[_entries_key(channel), *self._index],
            args=[_member(connection_id, sub), channel, _events_name(channel), event],
        )

    @raises_unavailable
    async def listen(self, channel: str) -> None:
        name = _events_name(channel)
        if name in self._wanted:
            return
        await self._subscriber.subscribe(name)
        self._wanted.add(name)
        self._connected.set()

    async def unlisten(self, channel: str) -> None:
        name = _events_name(channel)
        self._wanted.discard(name)
        await unsubscribe_soon(self._subscriber, name)

    async def _listen(self) -> None:
        """One reader per process; on a broken connection, back off and make the subscriptions match again."""
        await self._connected.wait()
        prefix = len(EVENTS_PREFIX)
        backoff = 0.1
        while True:
            try:
                if self._wanted and not self._subscriber.subscribed:  # a fresh connection (see Subscriber.renew)
                    await reconcile(self._subscriber, EVENTS_PREFIX, self._wanted)
                message = await self._subscriber.get(timeout=1.0)
                await self._subscriber.check()
                backoff = 0.1
            except REDIS_ERRORS as exc:
                log.warning("redis presence pub/sub: %s; retrying in %.1fs", exc, backoff)
                await self._subscriber.renew()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                with contextlib.suppress(*REDIS_ERRORS):
                    await reconcile(self._subscriber, EVENTS_PREFIX, self._wanted)
                continue
            if message is None or message[0] != "message":
                continue
            try:
                channel, text = message[1][prefix:-1], message[2].decode()
            except UnicodeDecodeError:  # only our own processes publish here
                log.warning("redis: unreadable presence event skipped")
                continue
            self.on_event(channel, text)

    async def _renew_entries(self) -> None:
        while True:
            await asyncio.sleep(RENEW_INTERVAL)
            held = list(self._held.items())
            for batch in slot_batches(held, lambda entry: _entries_key(entry[0][0]), RENEW_BATCH, self.cluster):
                try:
                    lost = await self._renew_batch(batch, "XX")
                    lost = [entry for entry in lost if entry[0] in self._held]  # not those that left meanwhile
                    if lost:
                        await self._renew_batch(lost, "ALL")
                        log.warning("presence: wrote back %d entries Redis had lost (restarted, or away too long)", len(lost))
                except REDIS_ERRORS as exc:
                    log.warning("redis: renewing presence failed: %s", exc)
                    break

    async def _renew_batch(
        self, batch: list[tuple[tuple[str, str], str]], mode: str
    ) -> list[tuple[tuple[str, str], str]]:
        """Renew ``batch``; returns the entries Redis no longer had (mode ``XX`` only)."""
        args: list[Any] = [PRESENCE_SECONDS, mode]
        for (channel, connection_id), sub in batch:
            args += [_member(connection_id, sub), channel]
        missing = await self._renew(keys=[*(_entries_key(channel) for (channel, _), _ in batch), *self._index], args=args)
        if self.cluster:
            await self._index_channels([channel for (channel, _), _ in batch])
        return [batch[i - 1] for i in missing]

    async def _index_channels(self, channels: list[str]) -> None:
        """Redis Cluster: list ``channels`` in the index (scored by this host's clock), prune it."""
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(INDEX, dict.fromkeys(channels, now + PRESENCE_SECONDS))
            pipe.zremrangebyscore(INDEX, "-inf", now)
            pipe.expire(INDEX, PRESENCE_SECONDS + 1)
            await pipe.execute()

    # -- nodes ---------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        failing = False
        while True:
            try:
                await self._beat(keys=[NODES, NODE_INFO], args=[NODE_SECONDS, self.node["id"], json.dumps(self.node_info())])
                if failing:
                    log.info("redis: node heartbeat resumed")
                failing = False
            except REDIS_ERRORS as exc:
                if not failing:  # once per outage, not every beat
                    log.warning("redis: node heartbeat failed: %s", exc)
                failing = True
            await asyncio.sleep(NODE_BEAT_INTERVAL)

    # -- reads ---------------------------------------------------------------------------

    @raises_unavailable
    async def clients(self, channel: str, limit: int) -> tuple[dict[str, str], int]:
        count, members = await self._clients(keys=[_entries_key(channel)], args=[limit])
        listed = {}
        for member in members:
            connection_id, _, sub = member.decode("utf-8", "surrogatepass").partition(":")
            listed[connection_id] = sub
        return listed, int(count)

    @raises_unavailable
    async def channels(self, limit: int) -> dict[str, int]:
        if self.cluster:
            return await self._cluster_channels(limit)
        flat = await self._channels(keys=[INDEX], args=[ENTRIES_PREFIX, limit])
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def _cluster_channels(self, limit: int) -> dict[str, int]:
        now = time.time()
        listed = [c.decode() for c in await self.redis.zrangebyscore(INDEX, now, "+inf", start=0, num=limit)]
        if not listed:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip per master
            for channel in listed:
                pipe.zcount(_entries_key(channel), now, "+inf")
            counts = await pipe.execute()
        return {channel: int(n) for channel, n in zip(listed, counts, strict=True) if n}

    @raises_unavailable
    async def nodes(self, limit: int) -> list[dict[str, Any]]:
        mine = self.node_info()  # live, not as of the last heartbeat
        nodes = [mine]
        for info in await self._nodes(keys=[NODES, NODE_INFO], args=[limit]):
            if info is not None and len(nodes) < limit:
                node = json.loads(info)
                if node.get("id") != mine["id"]:
                    nodes.append(node)
        return nodes

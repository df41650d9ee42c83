"""Redis storage: what lets many workers and hosts act as one service.

Keys (all under ``sws:``):

* rate-limit windows — ``limits``' own Redis storage on the same connection pool
  (one ``EVALSHA`` per frame for the sliding window);
* ``sws:conn:{sub}`` — a sorted set of connection leases scored by expiry (Redis
  ``TIME``); each process renews its leases every 10 s, so a worker that dies
  frees its subs within ``LEASE_SECONDS`` instead of locking them out forever;
* ``sws:{rev}:jti`` / ``sws:{rev}:sub`` — the revocation hashes (one hash tag: one Cluster slot for both), with a
  ``PUBLISH sws:revocations`` nudge so every worker re-reads them at once
  (plus a periodic re-read, so a nudge lost during a reconnect is not lost).
  They are a fast copy, not the truth: the revocation file is written first,
  what a worker reads is merged into what it knows, and whatever it knows that
  Redis lacks (Redis restarted empty, flushed, a failover to a replica behind)
  it writes back. Writes only ever strengthen an entry (``_MERGE``), so a worker
  writing back an older entry cannot weaken a newer one;
* ``sws:ch:{<channel>}`` — pub/sub channels (sharded pub/sub on Redis Cluster, in the slot of the channel's
  history keys, so the script that appends also publishes), subscribed once per process; each publication travels as
  ``<offset> <epoch> <message>`` (``0`` and an empty epoch without history), so no worker parses JSON to
  learn where it is; a channel's subscription is confirmed by Redis before a subscriber reads its history;
* ``sws:hm:{<channel>}`` — a channel's history record, a hash of its epoch ``e`` and last offset ``o``, kept
  ``HistoryLimits.meta_ttl`` after its last publication; ``sws:h:{<channel>}`` — its last
  ``SECURE_WS_HISTORY_SIZE`` messages, a list, kept ``SECURE_WS_HISTORY_TTL`` after its last publication
  (a list, not a stream: RPUSH+LTRIM cost Redis 2.3 µs a publication against XADD's 3.9 µs, hold 100
  messages in 14 % less memory, and read back 100 in a fifth of the time — measured on Redis 7 with 100-byte
  messages — and offsets need no stream ids: the list holds offsets ``o-LLEN+1 … o``).
  ``_APPEND`` assigns the offset, appends, trims, refreshes both TTLs and PUBLISHes in one script: one round
  trip, and no subscriber anywhere sees N+1 before N. Only a publication makes a record: reading a channel
  that has none creates nothing (``_READ`` only reads);
* ``sws:hn:{<channel>}`` — the epoch the channel's next record will take, set when a record is made and kept
  ``NEXT_EPOCH_TTL`` (a day) after the last publication: a reader of a channel without a record is told it,
  and the record a publication then makes takes it, so the first live message carries the epoch the reader
  was told; every record made takes the current one and leaves a fresh one, so no two of a channel's
  generations share an epoch. Without it (a channel never published, or not for a day, or Redis lost its
  data) the epoch is ``sha1(seed:day:channel)``, ``seed`` being ``sws:hseed``, one random value per Redis data
  set (lost with the data, so a Redis that lost its data gives every such channel a new epoch), and ``day``
  the day number (so a channel forgotten for a day never takes its old epoch back);
* ``sws:signal`` — pushes to and disconnects of one ``sub``, heard by every process, which acts on the
  connections it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from limits.aio.storage import RedisStorage as LimitsRedisStorage
from redis.exceptions import RedisError

from .. import metrics
from ..auth.revocation import Revocations
from .memory_history import new_epoch
from .redis_pubsub import REDIS_ERRORS, RETRY_MAX, Subscriber, reconcile, unsubscribe_soon
from .redis_url import CLUSTER, connect, parse_redis_url
from .storage import History, HistoryLimits, Position, Storage, StorageUnavailable, redacted_url

log = logging.getLogger("secure_ws.storage")

LEASE_SECONDS = 30
RENEW_INTERVAL = 10.0
REVOCATION_RESYNC_INTERVAL = 5.0
CHANNEL_PREFIX = "sws:ch:{"  # + channel + "}": in the hash slot of the channel's history keys
REVOCATION_CHANNEL = "sws:revocations"
SIGNAL_CHANNEL = "sws:signal"  # [kind, sub, payload] as JSON, to every worker
# One hash tag for both hashes: the scripts that touch the two stay on one Redis Cluster slot.
REV_JTI = "sws:{rev}:jti"
REV_SUB = "sws:{rev}:sub"
# Their names before Cluster support: still read on one Redis or Sentinel, so nothing revoked before an upgrade is
# forgotten (what they hold is written back under the names above).
LEGACY_REV = ("sws:rev:jti", "sws:rev:sub")

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


# KEYS: jti hash, sub hash. ARGV: n_jti, then (jti, until) pairs, then (sub, before, until) triples.
# Values are compared as numbers but stored as the caller's strings: no float is re-formatted (and rounded) in Lua.
_MERGE = """
local function num(s) return tonumber(s) or 0 end
local n = tonumber(ARGV[1])
local i = 2
for _ = 1, n do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if not old or num(old) < num(ARGV[i + 1]) then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  i = i + 2
end
while i <= #ARGV do
  local before, untl = ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  if old then
    local ob, ou = string.match(old, '^([^:]*):(.*)$')
    if ob and num(ob) > num(before) then before = ob end
    if ou and num(ou) > num(untl) then untl = ou end
  end
  redis.call('HSET', KEYS[2], ARGV[i], before .. ':' .. untl)
  i = i + 3
end
return 1
"""

# KEYS: jti hash, sub hash. ARGV: now, n_jti, jtis…, subs…. Deletes only entries still expired, so an entry
# strengthened by a concurrent revoke since it was read is kept.
_PRUNE = """
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
for i = 3, #ARGV do
  local key = (i < 3 + n) and KEYS[1] or KEYS[2]
  local v = redis.call('HGET', key, ARGV[i])
  if v then
    local untl = (key == KEYS[1]) and v or string.match(v, ':(.*)$')
    if (tonumber(untl) or 0) <= now then redis.call('HDEL', key, ARGV[i]) end
  end
end
return 1
"""


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def raises_unavailable(call: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """A public coroutine of :class:`RedisStorage`: Redis's errors leave it as :class:`StorageUnavailable`."""

    @functools.wraps(call)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await call(*args, **kwargs)
        except REDIS_ERRORS as exc:
            raise StorageUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    return wrapped


class _LimitsRedisStorage(LimitsRedisStorage):
    """``limits``' Redis storage on our own client (one Redis, Sentinel's master or the Cluster: the rate limiter
    follows the same failovers), raising only ``limits.errors.StorageError`` (``wrap_exceptions=True``) for all of
    what redis-py may raise, not just ``RedisError``. Its sliding-window keys carry a hash tag of their own, so
    each hit stays one script on one Cluster slot."""

    def __init__(self, client: Any) -> None:
        self._client = client
        super().__init__("async+redis://", implementation="redispy", wrap_exceptions=True)

    def configure_bridge(self) -> None:
        self.bridge.storage = self._client  # type: ignore[attr-defined]
        self.bridge.connection_getter = lambda readonly: self._client  # type: ignore[attr-defined]

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return REDIS_ERRORS


# KEYS: record, list, next epoch. ARGV: head (the message JSON without its closing brace), size, ttl ms, meta ttl
# ms, a fresh epoch (the next one, if a record is made), the pub/sub channel, the next epoch's ttl ms, the
# channel's seeded epoch ('' when the caller has not read the seed). Returns {offset, epoch}, or {-1} when a
# record must be made, no next epoch is kept, and no seeded epoch was given (the caller reads the seed, retries).
_APPEND = """
local epoch = redis.call('HGET', KEYS[1], 'e')
local top
if epoch then
  top = redis.call('HINCRBY', KEYS[1], 'o', 1)
else
  epoch = redis.call('GET', KEYS[3])
  if not epoch then
    if ARGV[8] == '' then return {-1} end
    epoch = ARGV[8]
  end
  top = 1
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 1)
  redis.call('SET', KEYS[3], ARGV[5])
end
redis.call('PEXPIRE', KEYS[3], ARGV[7])
local offset = string.format('%d', top)
local text = ARGV[1] .. ',"offset":' .. offset .. ',"epoch":"' .. epoch .. '"}'
redis.call('RPUSH', KEYS[2], text)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[6], offset .. ' ' .. epoch .. ' ' .. text)
return {top, epoch}
"""

# KEYS: record, list, next epoch. ARGV: the channel's seeded epoch ('' when the caller has not read the seed),
# (unused), since offset ('' for none), since epoch, limit. Returns {offset, epoch, recovered (0/1), messages}, or
# {-1} for a channel with no record, no next epoch, and no seeded epoch given. Writes nothing.
_READ = """
local meta = redis.call('HMGET', KEYS[1], 'e', 'o')
local epoch, top = meta[1], tonumber(meta[2])
if not epoch then
  epoch = redis.call('GET', KEYS[3]) or ARGV[1]
  if epoch == '' then return {-1} end
  local recovered = 1
  if ARGV[3] ~= '' and (ARGV[3] ~= '0' or ARGV[4] ~= epoch) then recovered = 0 end
  return {0, epoch, recovered, {}}
end
local limit = tonumber(ARGV[5])
local held = redis.call('LLEN', KEYS[2])
if ARGV[3] == '' then
  if limit == 0 or held == 0 then return {top, epoch, 1, {}} end
  return {top, epoch, 1, redis.call('LRANGE', KEYS[2], -math.min(limit, held), -1)}
end
local since = tonumber(ARGV[3])
if ARGV[4] ~= epoch or since > top or since < top - held then return {top, epoch, 0, {}} end
if since == top or limit == 0 then return {top, epoch, 1, {}} end
local start = held - (top - since)
return {top, epoch, 1, redis.call('LRANGE', KEYS[2], start, start + limit - 1)}
"""

SUBSCRIBE_TIMEOUT = 2.0  # for Redis to confirm a channel subscription


def _pubsub_name(channel: str) -> str:
    return CHANNEL_PREFIX + channel + "}"


def sharded(script: str, cluster: bool) -> str:
    """``script`` with its PUBLISH calls made SPUBLISH on Redis Cluster: a sharded publication stays within the
    shard of the channel's slot, which a script may publish to only when its keys are in the same slot."""
    return script.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'") if cluster else script


def slot_batches(items: list[T], key: Callable[[T], str], size: int, cluster: bool) -> list[list[T]]:
    """``items`` in batches of at most ``size`` for one multi-key script each; on Redis Cluster, batches of one
    hash slot each, so no script is given keys of two slots."""
    groups = [items]
    if cluster:
        from redis.crc import key_slot

        by_slot: dict[int, list[T]] = {}  # bound: one entry per item
        for item in items:
            by_slot.setdefault(key_slot(key(item).encode("utf-8", "surrogatepass")), []).append(item)
        groups = list(by_slot.values())
    return [group[start : start + size] for group in groups for start in range(0, len(group), size)]


def _record_key(channel: str) -> str:
    return f"sws:hm:{{{channel}}}"


def _list_key(channel: str) -> str:
    return f"sws:h:{{{channel}}}"


def _next_epoch_key(channel: str) -> str:
    return f"sws:hn:{{{channel}}}"


SEED = "sws:hseed"
NEXT_EPOCH_TTL = 86400  # seconds a channel's next epoch is kept after its last publication; also the seeded epoch's period


def seeded_epoch(seed: bytes, channel: str, now: float) -> str:
    """The epoch of a channel with no record and no next epoch kept: the same on every node for a day."""
    day = int(now // NEXT_EPOCH_TTL)
    return hashlib.sha1(b"%s:%d:%s" % (seed, day, channel.encode())).hexdigest()[:16]


def _conn_key(sub: str) -> str:
    return f"sws:conn:{{{sub}}}"


def _parsed(jtis_raw: dict[bytes, bytes], subs_raw: dict[bytes, bytes]) -> Revocations:
    """The two revocation hashes as Redis returned them; unreadable entries skipped (and logged)."""
    jtis: dict[str, float] = {}
    subs: dict[str, tuple[float, float]] = {}
    bad = 0
    for k, v in jtis_raw.items():
        try:
            jtis[k.decode()] = float(v)
        except ValueError:  # UnicodeDecodeError included
            bad += 1
    for k, v in subs_raw.items():
        try:
            before, _, until = v.decode().partition(":")
            subs[k.decode()] = (float(before), float(until))
        except ValueError:
            bad += 1
    if bad:
        log.warning("redis: skipped %d unreadable revocation entries", bad)
    return Revocations(jtis, subs)


def _stronger(known: Revocations, stored: Revocations) -> Revocations:
    """The entries of ``known`` that ``stored`` lacks or holds weaker."""
    subs = {}
    for sub, (before, until) in known.subs.items():
        held = stored.subs.get(sub)
        if held is None or held[0] < before or held[1] < until:
            subs[sub] = (before, until)
    return Revocations({j: u for j, u in known.jtis.items() if stored.jtis.get(j, 0.0) < u}, subs)


class RedisStorage(Storage):
    def __init__(self, url: str, revocation_file: Path, history: HistoryLimits | None = None) -> None:
        super().__init__(revocation_file, history)
        self.url = url
        target = parse_redis_url(url)
        # Redis Cluster: sharded pub/sub (SPUBLISH/SSUBSCRIBE), and scripts given only keys of one hash slot.
        self.cluster = target.kind == CLUSTER
        self.redis: Any = connect(target)
        self.limiter_storage = _LimitsRedisStorage(self.redis)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._merge_script = self.redis.register_script(_MERGE)
        self._prune_script = self.redis.register_script(_PRUNE)
        self._append = self.redis.register_script(sharded(_APPEND, self.cluster))
        self._read_history = self.redis.register_script(_READ)
        self._confirming: dict[str, asyncio.Future[None]] = {}  # pub/sub name → Redis's confirmation, one per channel
        self._leases: dict[str, str] = {}  # slot → sub, for renewal
        self._wanted: set[str] = set()  # pub/sub names of the channels this process has local subscribers for
        # Channel → the latest position this process knows it passed on (from a publication, or a read once
        # subscribed): a later publication past the next offset, or a re-subscription after a reconnect, is filled
        # from history first. Channel → the last position such a fill passed on: a publication arriving at or
        # before it is a duplicate. Bound: one entry each per wanted channel.
        self._last: dict[str, Position] = {}
        self._filled: dict[str, Position] = {}
        self._subscriber = Subscriber(self.redis, self.cluster)  # subscribe confirmations are read too: see subscribe()
        self._tasks: list[asyncio.Task[None]] = []
        self._redis_read = False  # until then, revocations only Redis holds (none in the file) are unknown
        self._redis_checked_at = 0.0

    async def start(self) -> None:
        await super().start()
        try:
            await self._subscriber.subscribe(REVOCATION_CHANNEL, SIGNAL_CHANNEL)
            await self._reload()
        except REDIS_ERRORS as exc:
            log.error(
                "SECURE_WS_STORAGE_URL %s does not answer (%s); /readyz answers 503 and handshakes are "
                "refused (1013) until it does", redacted_url(self.url), exc,
            )
        self._tasks = [
            asyncio.create_task(self._listen(), name="secure-ws redis pubsub"),
            asyncio.create_task(self._renew_leases(), name="secure-ws redis leases"),
            asyncio.create_task(self._resync_revocations(), name="secure-ws redis revocations"),
        ]

    async def close(self) -> None:
        await super().close()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._subscriber.aclose()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def ping(self) -> bool:
        """Redis answers, and so does this process's pub/sub connection (a deaf process is not ready)."""
        try:
            return bool(await metrics.timed("ping", asyncio.wait_for(self.redis.ping(), 2))) and self._subscriber.alive
        except REDIS_ERRORS:
            return False

    async def _publish(self, name: str, data: str | bytes) -> None:
        await (self.redis.spublish(name, data) if self.cluster else self.redis.publish(name, data))

    # -- connection leases ---------------------------------------------------------

    @raises_unavailable
    async def acquire_connection(self, sub: str, connection_id: str, limit: int) -> bool:
        ok = await metrics.timed("connection_slot", self._acquire(keys=[_conn_key(sub)], args=[limit, LEASE_SECONDS, connection_id]))
        if ok:
            self._leases[connection_id] = sub
        return bool(ok)

    @raises_unavailable
    async def release_connection(self, sub: str, connection_id: str) -> None:
        self._leases.pop(connection_id, None)
        await metrics.timed("connection_slot", self.redis.zrem(_conn_key(sub), connection_id))

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(RENEW_INTERVAL)
            leases = list(self._leases.items())
            for batch in slot_batches(leases, lambda lease: _conn_key(lease[1]), 500, self.cluster):
                try:
                    await self._renew(
                        keys=[_conn_key(sub) for _, sub in batch], args=[LEASE_SECONDS, *(slot for slot, _ in batch)]
                    )
                except REDIS_ERRORS as exc:
                    log.warning("redis: renewing connection leases failed: %s", exc)
                    break

    # -- revocations ---------------------------------------------------------------

    @property
    def revocations_problem(self) -> str | None:
        return super().revocations_problem or (None if self._redis_read else "Redis not read since start-up")

    @property
    def revocations_checked_at(self) -> float:
        return min(super().revocations_checked_at, self._redis_checked_at)

    async def _read(self) -> tuple[Revocations, Revocations]:
        """The revocation hashes, and the legacy ones (empty on Cluster)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in (REV_JTI, REV_SUB) if self.cluster else (REV_JTI, REV_SUB, *LEGACY_REV):
                pipe.hgetall(key)
            raw = await metrics.timed("revocations", pipe.execute())
        legacy = _parsed(raw[2], raw[3]) if len(raw) == 4 else Revocations()
        return _parsed(raw[0], raw[1]), legacy

    async def _merge(self, revocations: Revocations) -> None:
        args: list[str | int] = [len(revocations.jtis)]
        for jti, until in revocations.jtis.items():
            args += [jti, repr(until)]
        for sub, (before, until) in revocations.subs.items():
            args += [sub, repr(before), repr(until)]
        await self._merge_script(keys=[REV_JTI, REV_SUB], args=args)

    async def _reload(self) -> None:
        """Read Redis, learn from it, and write back what this worker knows and Redis lacks."""
        read_at = time.time()
        stored, legacy = await self._read()
        live = stored.pruned()
        expired_jtis = stored.jtis.keys() - live.jtis.keys()
        expired_subs = stored.subs.keys() - live.subs.keys()
        if expired_jtis or expired_subs:
            await self._prune_script(
                keys=[REV_JTI, REV_SUB], args=[time.time(), len(expired_jtis), *expired_jtis, *expired_subs]
            )
        self._redis_read = True
        self._redis_checked_at = read_at
        known = self.learn(live.merged(legacy.pruned()) if legacy.jtis or legacy.subs else live)
        lacking = _stronger(known, live)
        if lacking:
            await self._merge(lacking)
            await self._publish(REVOCATION_CHANNEL, b"changed")
            log.warning(
                "revocations: Redis lacked %d that this worker knows (restarted empty, flushed or failed over?); "
                "wrote them back", len(lacking.jtis) + len(lacking.subs),
            )

    async def update_revocations(self, change: Callable[[Revocations], Revocations]) -> Revocations:
        durable = await asyncio.to_thread(self.revocation_file.update, change)  # first: Redis may lose it
        try:
            await self._merge(change(Revocations()))  # only this change: concurrent ops commands are not overwritten
            await self._publish(REVOCATION_CHANNEL, b"changed")
        except REDIS_ERRORS as exc:
            raise StorageUnavailable(
                f"recorded in {self.revocation_file.path}, but SECURE_WS_STORAGE_URL {redacted_url(self.url)} does not "
                f"answer ({exc}); workers reading that file apply it, the others once Redis answers again"
            ) from None
        return self.learn(durable)

    async def reload_revocations(self) -> None:
        try:
            await self._reload()
        except REDIS_ERRORS as exc:
            log.warning("revocations: Redis not re-read on SIGHUP: %s", exc)
        await super().reload_revocations()

    async def _resync_revocations(self) -> None:
        """Safety net for a nudge or an unsubscribe lost while Redis was away, and the repair of an emptied Redis."""
        while True:
            await asyncio.sleep(REVOCATION_RESYNC_INTERVAL)
            with contextlib.suppress(*REDIS_ERRORS):
                await self._reload()
                await self._reconcile()

    # -- channels ------------------------------------------------------------------

    @raises_unavailable
    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed the subscription: from then on every publication reaches this process, so
        a history read made afterwards leaves no gap before the live ones."""
        # Wanted from now on, so that a reconcile in between never unsubscribes it before the confirmation comes.
        name = _pubsub_name(channel)
        self._wanted.add(name)
        waiter = self._confirming.get(name)
        try:
            if waiter is None:
                waiter = self._confirming[name] = asyncio.get_running_loop().create_future()
                await metrics.timed("subscribe", self._subscriber.subscribe(name))
            await asyncio.wait_for(asyncio.shield(waiter), SUBSCRIBE_TIMEOUT)
        except BaseException as exc:
            if self._confirming.get(name) is waiter:
                del self._confirming[name]
            self._wanted.discard(name)  # only called for a channel without local subscribers: none is lost
            if isinstance(exc, TimeoutError):
                raise StorageUnavailable(f"redis: subscription to {channel!r} not confirmed within {SUBSCRIBE_TIMEOUT:g}s") from None
            raise

    async def unsubscribe(self, channel: str) -> None:
        name = _pubsub_name(channel)
        self._wanted.discard(name)
        self._last.pop(channel, None)
        self._filled.pop(channel, None)
        await unsubscribe_soon(self._subscriber, name)

    async def _reconcile(self) -> None:
        await reconcile(self._subscriber, CHANNEL_PREFIX, self._wanted)

    @raises_unavailable
    async def publish(self, channel: str, head: str) -> Position | None:
        limits = self.history_for(channel)
        if limits is None:
            await metrics.timed("publish", self._publish(_pubsub_name(channel), "0  " + head + "}"))
            return None
        keys = [_record_key(channel), _list_key(channel), _next_epoch_key(channel)]
        args: list[str | int] = [head, limits.size, limits.ttl * 1000, limits.meta_ttl * 1000, new_epoch(),
                                 _pubsub_name(channel), NEXT_EPOCH_TTL * 1000, ""]
        answer = await metrics.timed("publish", self._append(keys=keys, args=args))
        if answer[0] == -1:  # the channel's first record in a day (or since Redis lost its data): its seeded epoch
            args[-1] = seeded_epoch(await self._seed(), channel, time.time())
            answer = await metrics.timed("publish", self._append(keys=keys, args=args))
        offset, epoch = answer
        return Position(int(offset), epoch.decode())

    async def _seed(self) -> bytes:
        """``sws:hseed``, made if Redis has none (first use, or it lost its data); read anew each time it is needed,
        so that a Redis that lost its data is noticed."""
        seed = await self.redis.get(SEED)
        if seed is None:
            await self.redis.set(SEED, secrets.token_hex(16), nx=True)
            seed = await self.redis.get(SEED)
        if not isinstance(seed, bytes):  # expired or deleted between the two calls: a later call makes it again
            raise RedisError("history seed vanished")
        return seed

    @raises_unavailable
    async def history(self, channel: str, since: Position | None, limit: int) -> History | None:
        limits = self.history_for(channel)
        if limits is None:
            return None
        keys = [_record_key(channel), _list_key(channel), _next_epoch_key(channel)]
        args = ["", "", "" if since is None else since.offset, "" if since is None else since.epoch, min(limit, limits.size)]
        answer = await self._read_history(keys=keys, args=args)
        if answer[0] == -1:  # no record and no next epoch: the seeded one
            args[0] = seeded_epoch(await self._seed(), channel, time.time())
            answer = await self._read_history(keys=keys, args=args)
        offset, epoch, recovered, texts = answer
        found = History(int(offset), epoch.decode(), [text.decode() for text in texts], bool(recovered))
        name = _pubsub_name(channel)
        if channel not in self._last and name in self._wanted and name not in self._confirming:
            # Subscribed (confirmed) before this read: every later publication reaches this process. Not over a
            # position already passed on: the reader may have run ahead of this read's answer.
            self._last[channel] = Position(found.offset, found.epoch)
        return found

    async def _fill(self, channel: str, since: Position, why: str) -> None:
        """Pass on what ``channel`` published after ``since`` that this process missed (its pub/sub connection
        was re-established, or a publication skipped offsets), from history, in order, before what follows."""
        limits = self.history_limits
        try:
            found = await self.history(channel, since, limits.size if limits is not None else 0)
        except StorageUnavailable as exc:
            log.warning("redis: %s on %r; history not read (%s): its subscribers may see an offset jump", why, channel, exc)
            return
        if found is None or not found.recovered:
            log.warning("redis: %s on %r; the missed publications are no longer in history: its subscribers see the "
                        "offset jump or the new epoch, and recover with recovered:false", why, channel)
            return
        for index, text in enumerate(found.messages, start=since.offset + 1):
            self._last[channel] = self._filled[channel] = Position(index, found.epoch)
            self.on_message(channel, text, index, found.epoch)
        if found.messages:
            log.info("redis: %s on %r; %d missed publications passed on from history", why, channel, len(found.messages))

    async def _publication(self, channel: str, data: bytes) -> None:
        offset, _, rest = data.partition(b" ")
        epoch_bytes, _, text = rest.partition(b" ")
        try:
            position = int(offset)
            decoded = text.decode()
        except ValueError:  # UnicodeDecodeError included; not from a secure_ws of this version
            log.warning("redis: unreadable publication on %r skipped", channel)
            return
        epoch = epoch_bytes.decode("ascii", "replace")
        last = self._last.get(channel) if position else None
        if last is not None and last.epoch == epoch:
            if self._filled and self._duplicate(channel, position, epoch):
                return
            if position > last.offset + 1:
                await self._fill(channel, last, f"offsets {last.offset + 1}…{position - 1} missed")
                if self._duplicate(channel, position, epoch):
                    return
            elif position <= last.offset:  # known from a read that ran ahead of the reader: not a duplicate here
                self.on_message(channel, decoded, position, epoch)
                return
        if position and (last is not None or _pubsub_name(channel) in self._wanted):
            self._last[channel] = Position(position, epoch)
        self.on_message(channel, decoded, position, epoch)

    def _duplicate(self, channel: str, position: int, epoch: str) -> bool:
        """Whether a fill already passed this publication on; the fill's mark goes with the first one past it."""
        filled = self._filled.get(channel)
        if filled is None:
            return False
        if filled.epoch == epoch and position <= filled.offset:
            return True
        del self._filled[channel]
        return False

    @raises_unavailable
    async def signal(self, kind: str, sub: str, payload: str | None = None) -> None:
        await metrics.timed("signal", self._publish(SIGNAL_CHANNEL, json.dumps([kind, sub, payload], ensure_ascii=False)))

    def _signalled(self, data: bytes) -> None:
        try:
            kind, sub, payload = json.loads(data)
        except (ValueError, TypeError):  # UnicodeDecodeError included; only our own processes publish here
            log.warning("redis: unreadable signal skipped")
            return
        self.on_signal(kind, sub, payload)

    async def _listen(self) -> None:
        """One reader per process; on a broken connection, resubscribe and re-read revocations."""
        prefix = len(CHANNEL_PREFIX)
        backoff = 0.1
        while True:
            try:
                if not self._subscriber.subscribed:  # a fresh connection (see Subscriber.renew)
                    await self._subscriber.subscribe(REVOCATION_CHANNEL, SIGNAL_CHANNEL)
                    await self._reconcile()
                message = await self._subscriber.get(timeout=1.0)
                await self._subscriber.check()
                backoff = 0.1
            except REDIS_ERRORS as exc:
                log.warning("redis pub/sub: %s; retrying in %.1fs", exc, backoff)
                await self._subscriber.renew()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._reload()
                    await self._reconcile()
                continue
            if message is None:
                continue
            kind, channel, data = message
            if kind != "message":  # subscribe / unsubscribe confirmations, pongs
                if kind == "subscribe":
                    waiter = self._confirming.pop(channel, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                    last = self._last.get(channel[prefix:-1]) if channel.startswith(CHANNEL_PREFIX) else None
                    if last is not None:  # re-subscribed after a reconnect: what was published meanwhile, first
                        await self._fill(channel[prefix:-1], last, "pub/sub re-established")
                continue
            if channel == REVOCATION_CHANNEL:
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._reload()
            elif channel == SIGNAL_CHANNEL:
                self._signalled(data)
            else:
                await self._publication(channel[prefix:-1], data)

"""Redis storage: what lets many workers and hosts act as one service.

Keys (all under ``sws:``):

* rate-limit windows — ``limits``' own Redis storage on the same connection pool
  (one ``EVALSHA`` per frame for the sliding window);
* ``sws:conn:{sub}`` — a sorted set of connection leases scored by expiry (Redis
  ``TIME``); each process renews its leases every 10 s, so a worker that dies
  frees its subs within ``LEASE_SECONDS`` instead of locking them out forever;
* ``sws:rev:jti`` / ``sws:rev:sub`` — the revocation hashes, with a
  ``PUBLISH sws:revocations`` nudge so every worker re-reads them at once
  (plus a periodic re-read, so a nudge lost during a reconnect is not lost).
  They are a fast copy, not the truth: the revocation file is written first,
  what a worker reads is merged into what it knows, and whatever it knows that
  Redis lacks (Redis restarted empty, flushed, a failover to a replica behind)
  it writes back. Writes only ever strengthen an entry (``_MERGE``), so a worker
  writing back an older entry cannot weaken a newer one;
* ``sws:ch:<channel>`` — pub/sub channels, subscribed once per process; each publication travels as
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

import redis.asyncio as aioredis
from limits.aio.storage import RedisStorage as LimitsRedisStorage
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from .. import metrics
from ..auth.revocation import Revocations
from .memory_history import new_epoch
from .storage import History, HistoryLimits, Position, Storage, StorageUnavailable, redacted_url

log = logging.getLogger("secure_ws.storage")

LEASE_SECONDS = 30
RENEW_INTERVAL = 10.0
REVOCATION_RESYNC_INTERVAL = 5.0
CHANNEL_PREFIX = "sws:ch:"
REVOCATION_CHANNEL = "sws:revocations"
SIGNAL_CHANNEL = "sws:signal"  # [kind, sub, payload] as JSON, to every worker
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


async def unsubscribe_soon(pubsub: PubSub, prefix: str, wanted: set[str], channel: str) -> None:
    """No longer want ``channel``; never raises: if Redis does not answer, :func:`reconcile_subscriptions`
    drops it once Redis answers again."""
    wanted.discard(channel)
    try:
        await pubsub.unsubscribe(prefix + channel)
    except REDIS_ERRORS as exc:
        log.warning("redis: unsubscribe from %r deferred until Redis answers: %s", prefix + channel, exc)


async def reconcile_subscriptions(pubsub: PubSub, prefix: str, wanted: set[str]) -> None:
    """Make Redis's subscriptions under ``prefix`` match ``wanted`` (redis-py resubscribes its own list on
    reconnect, but an unsubscribe that failed while Redis was away is only in ``wanted``)."""
    names = (c.decode() if isinstance(c, bytes) else c for c in pubsub.channels)
    held = {name[len(prefix):] for name in names if name.startswith(prefix)}
    stale = [prefix + c for c in held - wanted]
    missing = [prefix + c for c in wanted - held]
    if stale:
        await pubsub.unsubscribe(*stale)
    if missing:
        await pubsub.subscribe(*missing)


# What redis-py raises when Redis cannot be reached or answer in time; never seen above this module.
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

P = ParamSpec("P")
R = TypeVar("R")


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
    """``limits``' Redis storage raising only ``limits.errors.StorageError`` (``wrap_exceptions=True``), for all
    of what redis-py may raise, not just ``RedisError``."""

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
        self.redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=2, health_check_interval=10, retry_on_timeout=False
        )
        self.limiter_storage = _LimitsRedisStorage(
            "async+" + url, implementation="redispy", connection_pool=self.redis.connection_pool,  # type: ignore[arg-type]
            wrap_exceptions=True,
        )
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._merge_script = self.redis.register_script(_MERGE)
        self._prune_script = self.redis.register_script(_PRUNE)
        self._append = self.redis.register_script(_APPEND)
        self._read_history = self.redis.register_script(_READ)
        self._confirming: dict[str, asyncio.Future[None]] = {}  # channel → Redis's confirmation, one per channel
        self._leases: dict[str, str] = {}  # slot → sub, for renewal
        self._wanted: set[str] = set()  # channels this process has local subscribers for
        self._pubsub = self.redis.pubsub()  # subscribe confirmations are read too: see subscribe()
        self._tasks: list[asyncio.Task[None]] = []
        self._redis_read = False  # until then, revocations only Redis holds (none in the file) are unknown
        self._redis_checked_at = 0.0

    async def start(self) -> None:
        await super().start()
        try:
            await self._pubsub.subscribe(REVOCATION_CHANNEL, SIGNAL_CHANNEL)
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
            await self._pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await metrics.timed("ping", asyncio.wait_for(self.redis.ping(), 2)))
        except REDIS_ERRORS:
            return False

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
            for start in range(0, len(leases), 500):
                batch = leases[start : start + 500]
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

    async def _read(self) -> Revocations:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(REV_JTI)
            pipe.hgetall(REV_SUB)
            jtis_raw, subs_raw = await metrics.timed("revocations", pipe.execute())
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
        stored = await self._read()
        live = stored.pruned()
        expired_jtis = stored.jtis.keys() - live.jtis.keys()
        expired_subs = stored.subs.keys() - live.subs.keys()
        if expired_jtis or expired_subs:
            await self._prune_script(
                keys=[REV_JTI, REV_SUB], args=[time.time(), len(expired_jtis), *expired_jtis, *expired_subs]
            )
        self._redis_read = True
        self._redis_checked_at = read_at
        known = self.learn(live)
        lacking = _stronger(known, live)
        if lacking:
            await self._merge(lacking)
            await self.redis.publish(REVOCATION_CHANNEL, b"changed")
            log.warning(
                "revocations: Redis lacked %d that this worker knows (restarted empty, flushed or failed over?); "
                "wrote them back", len(lacking.jtis) + len(lacking.subs),
            )

    async def update_revocations(self, change: Callable[[Revocations], Revocations]) -> Revocations:
        durable = await asyncio.to_thread(self.revocation_file.update, change)  # first: Redis may lose it
        try:
            await self._merge(change(Revocations()))  # only this change: concurrent ops commands are not overwritten
            await self.redis.publish(REVOCATION_CHANNEL, b"changed")
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
        self._wanted.add(channel)
        waiter = self._confirming.get(channel)
        try:
            if waiter is None:
                waiter = self._confirming[channel] = asyncio.get_running_loop().create_future()
                await metrics.timed("subscribe", self._pubsub.subscribe(CHANNEL_PREFIX + channel))
            await asyncio.wait_for(asyncio.shield(waiter), SUBSCRIBE_TIMEOUT)
        except BaseException as exc:
            if self._confirming.get(channel) is waiter:
                del self._confirming[channel]
            self._wanted.discard(channel)  # only called for a channel without local subscribers: none is lost
            if isinstance(exc, TimeoutError):
                raise StorageUnavailable(f"redis: subscription to {channel!r} not confirmed within {SUBSCRIBE_TIMEOUT:g}s") from None
            raise

    async def unsubscribe(self, channel: str) -> None:
        await unsubscribe_soon(self._pubsub, CHANNEL_PREFIX, self._wanted, channel)

    async def _reconcile(self) -> None:
        await reconcile_subscriptions(self._pubsub, CHANNEL_PREFIX, self._wanted)

    @raises_unavailable
    async def publish(self, channel: str, head: str) -> Position | None:
        limits = self.history_for(channel)
        if limits is None:
            await metrics.timed("publish", self.redis.publish(CHANNEL_PREFIX + channel, "0  " + head + "}"))
            return None
        keys = [_record_key(channel), _list_key(channel), _next_epoch_key(channel)]
        args: list[str | int] = [head, limits.size, limits.ttl * 1000, limits.meta_ttl * 1000, new_epoch(),
                                 CHANNEL_PREFIX + channel, NEXT_EPOCH_TTL * 1000, ""]
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
        return History(int(offset), epoch.decode(), [text.decode() for text in texts], bool(recovered))

    @raises_unavailable
    async def signal(self, kind: str, sub: str, payload: str | None = None) -> None:
        await metrics.timed("signal", self.redis.publish(SIGNAL_CHANNEL, json.dumps([kind, sub, payload], ensure_ascii=False)))

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
                if not self._pubsub.subscribed:
                    await self._pubsub.subscribe(REVOCATION_CHANNEL, SIGNAL_CHANNEL)
                message = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
            except REDIS_ERRORS as exc:
                log.warning("redis pub/sub: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._reload()
                    await self._reconcile()
                continue
            if message is None:
                continue
            if message["type"] != "message":  # subscribe / unsubscribe confirmations (and a pong, which has no channel)
                if message["type"] == "subscribe":
                    waiter = self._confirming.pop(message["channel"].decode()[prefix:], None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                continue
            channel = message["channel"].decode()
            if channel == REVOCATION_CHANNEL:
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._reload()
            elif channel == SIGNAL_CHANNEL:
                self._signalled(message["data"])
            else:
                offset, _, rest = message["data"].partition(b" ")
                epoch, _, text = rest.partition(b" ")
                try:
                    position = int(offset)
                    decoded = text.decode()
                except ValueError:  # UnicodeDecodeError included; not from a secure_ws of this version
                    log.warning("redis: unreadable publication on %r skipped", channel)
                    continue
                self.on_message(channel[prefix:], decoded, position, epoch.decode("ascii", "replace"))

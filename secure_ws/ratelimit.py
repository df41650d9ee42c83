"""Rate limiting with ``limits``: the strategy is chosen by name, the storage comes from :mod:`storage`."""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage
from limits.aio.storage import Storage as LimitsStorage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

STRATEGIES: dict[str, type[RateLimiter]] = {
    "sliding-window": SlidingWindowCounterRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}


log = logging.getLogger("secure_ws.ratelimit")

SWEEP_EVERY = 4096


class LocalStorage(MemoryStorage):
    """``limits``' memory storage with a lean sliding-window counter for one event loop.

    The stock memory storage guards every counter with an ``asyncio.Lock`` and
    starts an expiry task on each hit; on a single event loop nothing can run
    between the read and the write below (there is no ``await`` in them), so
    neither is needed. Each key keeps ``[window, current, previous, expiry]``
    — no per-window key strings — and stale keys are swept every few thousand
    hits. The arithmetic is the one ``limits`` uses, so results are identical.
    Moving and fixed windows use the stock implementation.
    """

    def __init__(self) -> None:
        super().__init__()
        self._windows: dict[str, list] = {}
        self._hits = 0

    def _state(self, key: str, expiry: int, now: float) -> tuple[list | None, int, int, int]:
        window = int(now / expiry)
        state = self._windows.get(key)
        if state is None or state[0] < window - 1:
            return state, window, 0, 0
        if state[0] == window - 1:
            return state, window, 0, state[1]
        return state, window, state[1], state[2]

    @staticmethod
    def _previous_ttl(now: float, expiry: int) -> float:
        return (1 - (((now - expiry) / expiry) % 1)) * expiry

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.take(key, limit, expiry, amount)

    def take(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """The sliding-window hit, synchronously: the hot path of every inbound frame."""
        if amount > limit:
            return False
        now = time.time()
        state, window, current, previous = self._state(key, expiry, now)
        if previous:
            previous_ttl = self._previous_ttl(now, expiry)
            if math.floor(previous * previous_ttl / expiry + current) + amount > limit:
                return False
        elif current + amount > limit:
            return False
        if state is None:
            self._windows[key] = [window, current + amount, previous, expiry]
            self._hits += 1
            if self._hits >= SWEEP_EVERY:
                self._sweep(now)
        else:
            state[0], state[1], state[2] = window, current + amount, previous
        return True

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        now = time.time()
        _, _, current, previous = self._state(key, expiry, now)
        previous_ttl = self._previous_ttl(now, expiry) if previous else 0.0
        return previous, previous_ttl, current, (1 - ((now / expiry) % 1)) * expiry + expiry

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        self._windows.pop(key, None)

    def _sweep(self, now: float) -> None:
        self._hits = 0
        stale = [k for k, (window, _, _, expiry) in self._windows.items() if window < int(now / expiry) - 1]
        for key in stale:
            del self._windows[key]

    async def reset(self) -> int | None:
        self._windows.clear()
        return await super().reset()


class Limiter:
    """All of one setting's limits (``20/second;600/minute``) for many identities.

    Limits are hit in order and the first that refuses stops the rest, as
    Flask-Limiter does. With :class:`LocalStorage` and the sliding window, a hit
    is a plain function call on keys built once per connection (:meth:`keys`);
    other storages and strategies go through ``limits``' strategy objects. If a
    shared storage cannot be reached, limits are enforced per process from
    memory until it answers again: degraded, but never unlimited.
    """

    def __init__(
        self,
        items: tuple[RateLimitItem, ...],
        strategy: str,
        storage: LimitsStorage,
        namespace: str,
        storage_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.items = items
        self.strategy = STRATEGIES[strategy](storage)
        self.namespace = namespace
        self.storage_errors = storage_errors
        self._strategy_name = strategy
        self._fallback: RateLimiter | None = None
        self._local = storage if isinstance(storage, LocalStorage) and strategy == "sliding-window" else None
        self._windows = tuple((item.amount, item.get_expiry()) for item in items)

    def keys(self, identity: str) -> tuple[str, ...]:
        """Storage keys for ``identity``, the same ``limits`` would build on every hit."""
        return tuple(item.key_for(self.namespace, identity) for item in self.items)

    def take(self, keys: tuple[str, ...]) -> int | None:
        """One hit decided without awaiting, when the storage is this process's sliding window:
        -1 if allowed, else the index of the limit that refused. None: the storage is shared, use :meth:`hit`."""
        local = self._local
        if local is None:
            return None
        for index, (amount, expiry) in enumerate(self._windows):
            if not local.take(keys[index], amount, expiry):
                return index
        return -1

    async def retry_ms(self, index: int, identity: str) -> int:
        """After :meth:`take` refused with ``index``: how many ms until a hit would be allowed."""
        return await self._retry_ms(self.strategy, self.items[index], identity)

    async def hit(self, identity: str, keys: tuple[str, ...] | None = None) -> int:
        """One hit for ``identity``: 0 if allowed, else how many ms until it would be."""
        if self._local is not None:
            refused = self.take(keys if keys is not None else self.keys(identity))
            return 0 if refused is None or refused < 0 else await self.retry_ms(refused, identity)
        if not self.storage_errors:
            return await self._hit(self.strategy, identity)
        try:
            retry = await self._hit(self.strategy, identity)
        except self.storage_errors as exc:
            if self._fallback is None:
                log.warning("rate-limit storage unreachable (%s); enforcing per-process limits meanwhile", exc)
                self._fallback = STRATEGIES[self._strategy_name](LocalStorage())
            return await self._hit(self._fallback, identity)
        if self._fallback is not None:
            log.info("rate-limit storage reachable again")
            self._fallback = None
        return retry

    async def _hit(self, strategy: RateLimiter, identity: str) -> int:
        for item in self.items:
            if not await strategy.hit(item, self.namespace, identity):
                return await self._retry_ms(strategy, item, identity)
        return 0

    async def _retry_ms(self, strategy: RateLimiter, item: RateLimitItem, identity: str) -> int:
        stats = await strategy.get_window_stats(item, self.namespace, identity)
        return max(1, math.ceil((stats.reset_time - time.time()) * 1000))

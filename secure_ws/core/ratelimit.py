"""Rate limiting with ``limits``: the strategy is chosen by name, the storage comes from :mod:`storage`."""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItem
from limits.aio.storage import Storage as LimitsStorage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError

from .. import metrics
from ..state.local_window import LocalStorage

STRATEGIES: dict[str, type[RateLimiter]] = {
    "sliding-window": SlidingWindowCounterRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}


log = logging.getLogger("secure_ws.ratelimit")

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
    ) -> None:
        self.items = items
        self.strategy = STRATEGIES[strategy](storage)
        self.namespace = namespace
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
        try:
            retry = await metrics.timed("rate_limit", self._hit(self.strategy, identity))
        except StorageError as exc:  # what a shared storage made with wrap_exceptions=True raises when unreachable
            return await self._hit(self._degraded(exc.storage_error), identity)
        if self._fallback is not None:
            log.info("rate-limit storage reachable again")
            self._fallback = None
        return retry

    async def blocked_ms(self, identity: str) -> int:
        """A look without a hit: 0 if a hit for ``identity`` would be allowed now, else ms until one would."""
        try:
            return await self._blocked_ms(self.strategy, identity)
        except StorageError as exc:
            return await self._blocked_ms(self._degraded(exc.storage_error), identity)

    def _degraded(self, exc: BaseException) -> RateLimiter:
        if self._fallback is None:
            log.warning("rate-limit storage unreachable (%s); enforcing per-process limits meanwhile", exc)
            self._fallback = STRATEGIES[self._strategy_name](LocalStorage())
        return self._fallback

    async def _blocked_ms(self, strategy: RateLimiter, identity: str) -> int:
        for item in self.items:
            if not await strategy.test(item, self.namespace, identity):
                return await self._retry_ms(strategy, item, identity)
        return 0

    async def _hit(self, strategy: RateLimiter, identity: str) -> int:
        for item in self.items:
            if not await strategy.hit(item, self.namespace, identity):
                return await self._retry_ms(strategy, item, identity)
        return 0

    async def _retry_ms(self, strategy: RateLimiter, item: RateLimitItem, identity: str) -> int:
        stats = await strategy.get_window_stats(item, self.namespace, identity)
        return max(1, math.ceil((stats.reset_time - time.time()) * 1000))

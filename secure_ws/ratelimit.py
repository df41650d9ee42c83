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


class Limiter:
    """All of one setting's limits (``20/second;600/minute``) for many keys.

    If the shared storage cannot be reached, limits are enforced per process
    from memory until it answers again: degraded, but never unlimited.
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
        self._fallback: RateLimiter | None = None
        self._strategy_name = strategy

    async def hit(self, key: str) -> int:
        """One hit for ``key``: 0 if allowed, else how many ms until it would be."""
        if not self.storage_errors:
            return await self._hit(self.strategy, key)
        try:
            retry = await self._hit(self.strategy, key)
        except self.storage_errors as exc:
            if self._fallback is None:
                log.warning("rate-limit storage unreachable (%s); enforcing per-process limits meanwhile", exc)
                self._fallback = STRATEGIES[self._strategy_name](MemoryStorage())
            return await self._hit(self._fallback, key)
        if self._fallback is not None:
            log.info("rate-limit storage reachable again")
            self._fallback = None
        return retry

    async def _hit(self, strategy: RateLimiter, key: str) -> int:
        # Limits are hit in order and the first that refuses stops the rest, as Flask-Limiter does.
        for item in self.items:
            if not await strategy.hit(item, self.namespace, key):
                stats = await strategy.get_window_stats(item, self.namespace, key)
                return max(1, math.ceil((stats.reset_time - time.time()) * 1000))
        return 0

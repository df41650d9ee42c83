"""Rate limiting with ``limits``: the strategy is chosen by name, the storage comes from :mod:`storage`."""

from __future__ import annotations

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

STRATEGIES: dict[str, type[RateLimiter]] = {
    "sliding-window": SlidingWindowCounterRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}


class Limiter:
    """All of one setting's limits (``20/second;600/minute``) for many keys."""

    def __init__(self, items: tuple[RateLimitItem, ...], strategy: str, storage: LimitsStorage, namespace: str) -> None:
        self.items = items
        self.strategy = STRATEGIES[strategy](storage)
        self.namespace = namespace

    async def hit(self, key: str) -> int:
        """One hit for ``key``: 0 if allowed, else how many ms until it would be.

        Limits are hit in order and the first that refuses stops the rest, like
        Flask-Limiter and slowapi do with several limits on one route.
        """
        for item in self.items:
            if not await self.strategy.hit(item, self.namespace, key):
                stats = await self.strategy.get_window_stats(item, self.namespace, key)
                return max(1, math.ceil((stats.reset_time - time.time()) * 1000))
        return 0

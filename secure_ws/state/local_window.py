"""This process's sliding windows: ``limits``' memory storage made lean for one event loop.

Bound: one entry per live rate-limit key (``sub`` × limit); keys whose windows have passed are swept
every ``SWEEP_EVERY`` new keys.
"""

from __future__ import annotations

import math
import time

from limits.aio.storage import MemoryStorage

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

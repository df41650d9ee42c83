"""LocalStorage must decide exactly as limits' own MemoryStorage does, hit for hit."""

from __future__ import annotations

import asyncio
import random
from unittest import mock

import pytest
from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from secure_ws.state.local_window import SWEEP_EVERY, LocalStorage


@pytest.mark.parametrize("limit", ["5/second", "3/2second", "20/minute"])
def test_same_decisions_and_stats_as_limits_memory_storage(limit):
    item = parse(limit)
    rng = random.Random(limit)

    async def go():
        reference = SlidingWindowCounterRateLimiter(MemoryStorage())
        ours = SlidingWindowCounterRateLimiter(LocalStorage())
        now = [1_000_000.0]
        with mock.patch("time.time", lambda: now[0]):
            for i in range(3000):
                now[0] += rng.choice([0.001, 0.05, 0.2, 0.5, 1.3, 3.0])
                key = rng.choice("abc")
                assert await reference.hit(item, key) == await ours.hit(item, key), i
                expected = await reference.get_window_stats(item, key)
                got = await ours.get_window_stats(item, key)
                assert got.remaining == expected.remaining, i
                assert got.reset_time == pytest.approx(expected.reset_time), i

    asyncio.run(go())


def test_stale_keys_are_swept():
    item = parse("1/second")

    async def go():
        storage = LocalStorage()
        limiter = SlidingWindowCounterRateLimiter(storage)
        now = [1_000_000.0]
        with mock.patch("time.time", lambda: now[0]):
            for i in range(SWEEP_EVERY + 10):
                now[0] += 0.01
                await limiter.hit(item, f"client-{i}")
            # Keys older than the previous window are gone; only the recent ones remain.
            assert len(storage._windows) < SWEEP_EVERY // 2

    asyncio.run(go())

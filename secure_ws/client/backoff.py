"""How long the client waits between reconnect attempts."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """How long to wait before reconnect attempt number ``attempt`` (0 for the first retry).

    "Full jitter": a uniform draw in ``[0, min(maximum, initial * 2**attempt)]``.
    The ceiling doubles with each failed attempt up to ``maximum``; drawing
    anywhere below it spreads the clients of a restarted server over the whole
    window instead of having them all come back at the same instant.
    """
    ceiling = min(maximum, initial * 2.0 ** min(max(attempt, 0), 64))
    return (rng or random).uniform(0.0, ceiling)

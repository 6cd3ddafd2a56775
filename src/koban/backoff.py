"""Retry delays: pure functions of the attempt number."""

from __future__ import annotations

import random


def exponential(
    attempt: int, *, base: float = 15.0, jitter: float = 0.10, cap: float = 86400.0 * 7
) -> float:
    """Seconds to wait after failed `attempt`: base + 2**attempt, ±`jitter`, at most `cap`.

    >>> 10 <= exponential(1) <= 20
    True
    """
    delay = min(base + 2.0 ** min(attempt, 40), cap)
    if jitter:
        delay *= 1 + random.uniform(-jitter, jitter)
    return max(0.0, min(delay, cap))  # jitter must not push a capped delay past the cap

"""When requests arrive: gamma-distributed gaps at a mean rate, with a burstiness factor.

A gap is Gamma(shape=burstiness, scale=1 / (rate * burstiness)): its mean is 1 / rate whatever the
burstiness, and its variance is 1 / (rate**2 * burstiness). Burstiness 1 is the exponential
distribution (a Poisson process); below 1 requests come in clumps, above 1 more evenly.
"""

from __future__ import annotations

import math
import random


def gaps(rate: float, burstiness: float, rng: random.Random, count: int) -> list[float]:
    """`count` inter-arrival gaps in seconds; all zero at an infinite rate (everything at once)."""
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate ({rate}) and burstiness ({burstiness}) must be > 0")
    if math.isinf(rate):
        return [0.0] * count
    scale = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(count)]


def arrival_times(rate: float, burstiness: float, seed: int, count: int | None = None,
                  duration: float | None = None) -> list[float]:
    """Send times (seconds from the start) of `count` requests, or of every request before `duration`.

    The first request goes at 0; each later one after one gap. With `duration` and an infinite rate
    there is no end, so that combination is refused.
    """
    if (count is None) == (duration is None):
        raise ValueError("give exactly one of count and duration")
    rng = random.Random(seed)
    if count is not None:
        times = [0.0]
        for gap in gaps(rate, burstiness, rng, count - 1):
            times.append(times[-1] + gap)
        return times[:count]
    if math.isinf(rate):
        raise ValueError("an infinite rate needs a request count, not a duration")
    times = [0.0]
    while True:
        following = times[-1] + gaps(rate, burstiness, rng, 1)[0]
        if following >= duration:
            return times
        times.append(following)

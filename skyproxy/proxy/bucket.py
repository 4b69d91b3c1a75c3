"""The one place that reads or writes aiolimiter's private bucket state.

aiolimiter's `AsyncLimiter` is a leaky bucket whose public API answers "does one more
unit fit?" (`has_capacity`) and "wait until it does" (`acquire`). The limits need three
things it does not offer:

- the level, for RateLimit-Remaining, RateLimit-Reset and the exact wait before a unit
  fits (`_level`, valid right after `has_capacity()` leaked it to now);
- taking or returning a unit without a coroutine, and taking one past `max_rate` as a
  reservation for a request that then sleeps its turn (`_level` written);
- when the bucket was last used, to drop idle ones (`_last_check`, which every leak
  stamps with `loop.time()`).

tests/proxy/test_bucket.py drives a real `AsyncLimiter` on a fake clock and fails if any
of these stop meaning what this module assumes. The leak rate is public:
`max_rate / time_period` units per second.
"""

from __future__ import annotations

import math

from aiolimiter import AsyncLimiter

__all__ = ["give_back", "last_used", "level", "seconds_to_empty", "seconds_to_fit", "take_unit", "units_free"]

# Float slack so a level of 4.000000000001 units still reads as 4.
_EPS = 1e-9


def level(bucket: AsyncLimiter) -> float:
    """Units in the bucket as of its last leak (`has_capacity()` leaks it to now)."""
    return float(bucket._level)


def take_unit(bucket: AsyncLimiter) -> int:
    """Adds one unit, past `max_rate` if need be; returns the whole units still free.

    The level must be freshly leaked, as `acquire` has it when it adds its unit.
    """
    bucket._level += 1
    return math.floor(bucket.max_rate - bucket._level + _EPS)


def give_back(bucket: AsyncLimiter) -> None:
    """Returns one unit. Exact for a leaky bucket: leak to now, then take it off."""
    bucket.has_capacity()
    bucket._level = max(bucket._level - 1, 0.0)


def units_free(bucket: AsyncLimiter) -> int:
    """Whole units that fit now, never below 0 (the level must be freshly leaked)."""
    return max(0, math.floor(bucket.max_rate - bucket._level + _EPS))


def seconds_to_empty(bucket: AsyncLimiter) -> int:
    """Whole seconds until the bucket is empty (the level must be freshly leaked)."""
    return max(0, math.ceil(bucket._level / (bucket.max_rate / bucket.time_period) - _EPS))


def seconds_to_fit(bucket: AsyncLimiter) -> float:
    """Leaks to now; then the seconds until one more unit fits, <= 0 when it fits now."""
    bucket.has_capacity()
    return float((bucket._level + 1 - bucket.max_rate) / (bucket.max_rate / bucket.time_period))


def last_used(bucket: AsyncLimiter) -> float:
    """The `loop.time()` of the bucket's last leak, which every use performs."""
    return float(bucket._last_check)

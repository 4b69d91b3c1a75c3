"""Leaky buckets with aiolimiter's arithmetic, in state the garbage collector never walks.

A leaky bucket, as aiolimiter's `AsyncLimiter` keeps it, is a level and the time it was
last leaked. The level drains at `max_rate / time_period` units per second, never below
zero, and one more unit fits while `level + 1 <= max_rate`. Every use first leaks the
bucket to now. This module does the same float operations in the same order, so every
answer (fits or not, the wait, the level) is aiolimiter's; tests/proxy/test_leaky.py
checks that against a real `AsyncLimiter`.

- `Bucket` is one bucket as an object, for the few per-environment quotas.
- `UserBuckets` holds the buckets of one rule's users, each a single `complex`
  (level + last use * 1j), in plain dicts keyed by user. complex is the one built-in
  pair of floats the collector does not track, and a dict whose keys and values are
  all untracked stays untracked itself. So a million users add nothing to what a
  collection walks, and nothing to the time it stalls the event loop. (A tuple is
  tracked until a collection has looked at it, and storing one tracks its dict again.)

Idle buckets are dropped a generation at a time. A user's bucket lives in the
generation of its last use: using it moves it to the current one, and a new generation
starts every half period, or sooner once the current one holds _GENERATION_SIZE
buckets. Once a generation's last use is a whole period old, every bucket in it has
drained (a user's level never exceeds `max_rate`, which drains in a period), so a
fresh bucket is equivalent. Inserting a new user first
drops up to two such buckets (`popitem`, O(1)), and `evict_idle` drops every such
generation at once. A bucket is therefore dropped between one and one and a half
periods after its last use. The hard cap instead drops buckets even undrained, the
least recently used generation first, a 64th of the cap at a time, so that a flood of
new users costs amortised O(1) each. (Within a generation a use updates the bucket in
place: moving it to the end would make the dict grow and resize, which stalls too.)
"""

from __future__ import annotations

import math
from itertools import islice

from skyproxy.config import Rate

__all__ = ["Bucket", "UserBuckets"]

# Float slack so a level of 4.000000000001 units still reads as 4.
_EPS = 1e-9
# How many drained buckets inserting a new user may drop.
_EVICT_PER_INSERT = 2
# Buckets per generation at most: a dict this size resizes, and is freed, in about a
# millisecond, where one of a million entries would stall the loop a hundred times as
# long, and leave its freed tables behind in the heap.
_GENERATION_SIZE = 1 << 16
# The hard cap drops this fraction of itself at a time (at least what is over).
_CAP_BATCH_DIVISOR = 64


class _Shape:
    """A bucket's size and pace, and the numbers derived from a level."""

    __slots__ = ("limit_text", "max_rate", "period", "rate")

    def __init__(self, rate: Rate) -> None:
        self.max_rate = rate.count
        self.limit_text = str(rate.count)  # RateLimit-Limit, written on every limited answer
        self.period = rate.period
        self.rate = rate.count / rate.period  # units drained per second

    def fits(self, level: float) -> bool:
        return level + 1 <= self.max_rate

    def seconds_to_fit(self, level: float) -> float:
        """Seconds until one more unit fits; <= 0 when it fits now."""
        return (level + 1 - self.max_rate) / self.rate

    def units_left(self, level: float) -> int:
        """Whole units that fit; below 0 while units past `max_rate` are reserved."""
        return math.floor(self.max_rate - level + _EPS)

    def units_free(self, level: float) -> int:
        return max(0, self.units_left(level))

    def seconds_to_empty(self, level: float) -> int:
        return max(0, math.ceil(level / self.rate - _EPS))

    def leaked(self, level: float, last: float, now: float) -> float:
        """The level at `now`, as aiolimiter's `_leak` computes it."""
        if level:
            level = max(level - (now - last) * self.rate, 0)
        return level


class Bucket(_Shape):
    """One leaky bucket; its level may go past `max_rate` by units reserved ahead."""

    __slots__ = ("last", "level")

    def __init__(self, rate: Rate) -> None:
        super().__init__(rate)
        self.level = 0.0
        self.last = 0.0

    def leak(self, now: float) -> float:
        """Leaks to `now`; returns the level."""
        self.level = level = self.leaked(self.level, self.last, now)
        self.last = now
        return level

    def take(self) -> float:
        """Adds one unit (after `leak`), past `max_rate` if need be; returns the level."""
        self.level += 1
        return self.level

    def give_back(self, now: float) -> None:
        """Returns one unit: exact for a leaky bucket, leak to now, then take it off."""
        self.level = max(self.leak(now) - 1, 0.0)


class _Generation:
    """The buckets last used since `started`, in order of first use within it."""

    __slots__ = ("newest", "started", "states")

    def __init__(self, now: float) -> None:
        self.states: dict[str, complex] = {}
        self.started = now
        self.newest = now  # the last use of any bucket in it


class UserBuckets(_Shape):
    """The per-user buckets of one (environment, rule, rate).

    `leak`, then `take` in the same synchronous step, as the limits do: `take` assumes
    the user's bucket is where `leak` just put it.
    """

    __slots__ = ("cap", "generations")

    def __init__(self, rate: Rate, cap: int | None) -> None:
        super().__init__(rate)
        self.cap = cap
        self.generations: list[_Generation] = []

    def __len__(self) -> int:
        return sum(len(generation.states) for generation in self.generations)

    def __contains__(self, user: str) -> bool:
        return any(user in generation.states for generation in self.generations)

    def leak(self, user: str, now: float) -> float:
        """Leaks the user's bucket to `now` (creating it empty if new); returns its level."""
        states = self._current(now).states
        state = states.get(user)
        if state is None:
            state = self._older(user)
            if state is None:
                self._make_room(now)
                states[user] = complex(0.0, now)
                return 0.0
        level = self.leaked(state.real, state.imag, now)
        states[user] = complex(level, now)
        return level

    def take(self, user: str) -> float:
        """Adds one unit to the bucket `leak` just leaked; returns the level."""
        states = self.generations[-1].states
        state = states[user] = states[user] + 1
        return state.real

    def level(self, user: str, now: float) -> float:
        """Leaks the user's bucket to `now` and returns its level; 0.0 if it was dropped."""
        return self.leak(user, now) if user in self else 0.0

    def give_back(self, user: str, now: float) -> None:
        """Returns one unit, unless the bucket was dropped meanwhile (the cap)."""
        if user in self:
            level = self.leak(user, now)
            self.generations[-1].states[user] = complex(max(level - 1, 0.0), now)

    def evict(self, now: float) -> int:
        """Drops every generation last used a whole period ago; returns how many buckets."""
        generations = self.generations
        dropped = 0
        while generations and now - generations[0].newest >= self.period:
            dropped += len(generations.pop(0).states)
        return dropped

    def _current(self, now: float) -> _Generation:
        generations = self.generations
        if (
            not generations
            or now - generations[-1].started >= self.period / 2
            or len(generations[-1].states) >= _GENERATION_SIZE
        ):
            generations.append(_Generation(now))
        current = generations[-1]
        current.newest = now
        return current

    def _older(self, user: str) -> complex | None:
        """Takes the user's bucket out of an older generation, newest first."""
        generations = self.generations
        for i in range(len(generations) - 2, -1, -1):
            state = generations[i].states.pop(user, None)
            if state is not None:
                return state
        return None

    def _make_room(self, now: float) -> None:
        """Before a new user: drop a few drained buckets, and enforce the cap."""
        generations = self.generations
        budget = _EVICT_PER_INSERT
        while budget and len(generations) > 1 and now - generations[0].newest >= self.period:
            states = generations[0].states
            while budget and states:
                states.popitem()  # O(1); which one does not matter, all have drained
                budget -= 1
            if not states:
                del generations[0]
        if self.cap is not None:
            over = len(self) + 1 - self.cap
            if over > 0:
                self._drop_least_recent(max(over, self.cap // _CAP_BATCH_DIVISOR))

    def _drop_least_recent(self, count: int) -> None:
        # From the front of the oldest generations: their buckets were used least
        # recently. Deleting from a dict's front leaves holes that the next scan from
        # the front walks again, hence batches rather than one at a time.
        generations = self.generations
        for generation in list(generations):
            states = generation.states
            for user in list(islice(states, count)):
                del states[user]
                count -= 1
            if not states and generation is not generations[-1]:
                generations.remove(generation)
            if not count:
                return

"""Per-user and per-environment rate limits: leaky buckets behind one `check`.

The buckets are leaky.py's, with aiolimiter's arithmetic and its clock, the running
loop's `time()`. A rule's per-user rate gives one bucket per (environment, rule, user),
kept as flat state the garbage collector never walks (the user header is client input,
so their number is the client's choice); its per-environment rate gives one `Bucket`
per (environment, rule), shared by every user of that environment.

`check` runs on every limited request, in three phases:

1. Per-user buckets are looked at, never waited on: each is leaked to now, and if any
   matching rule has no room for one more unit, the answer is 429 `rate_limited` at
   once, and nothing has been consumed anywhere.
2. Environment buckets are decided without consuming either. The wait is known exactly
   from the level (a leaky bucket drains at a fixed pace), so a request whose wait
   would exceed the rule's `max_wait` gets 429 `environment_rate_limited` at once
   instead of after sleeping `max_wait` for nothing. With `max_wait = 0` that is "no
   capacity, no wait". Because this is decided before anything is consumed, an
   environment rejection costs the user nothing: no unit is taken, so none needs a
   refund.
3. Everything is consumed in one synchronous step: a unit in each per-user bucket and
   each environment bucket. An environment bucket may go above its `max_rate` by the
   reservations of requests still waiting, at most `max_wait` seconds' worth; each
   waiting request sleeps until its own unit has drained, so bursts leave at the
   account's pace, first come first served. A request cancelled while it waits (the
   client went away) gives all of its units back.

Idle per-user buckets are dropped (see leaky.py): inserting a new user first drops a
couple of drained ones, `evict_idle()` sweeps them all for a periodic task, and
`max_buckets_per_rule` is a hard cap that drops the least recently used buckets even
when they have not drained.

A reload builds a new `Limits` with `previous=`: buckets whose (environment, rule name,
rate) is unchanged are carried over as the same objects, levels included; the others
start empty, and those of removed rules or environments are dropped.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import NamedTuple

from multidict import istr

from skyproxy.config import EnvironmentSettings, Rate, RateRule
from skyproxy.proxy.leaky import Bucket, UserBuckets

__all__ = ["DEFAULT_MAX_BUCKETS_PER_RULE", "Limits", "Verdict"]

# Hard cap on the per-user buckets of one (environment, rule). A bucket costs about
# 130 bytes with its key, so this bounds one rule at roughly 130 MB even under a flood of
# distinct user ids that idle eviction alone cannot shed (all active within a period).
DEFAULT_MAX_BUCKETS_PER_RULE = 1_000_000

# Float slack so a wait of 2.000000000001 seconds still reads as 2.
_EPS = 1e-9

# istr: the verdict's headers go into a CIMultiDict, which takes an istr key as it is and
# would otherwise fold each str key again on every request.
LIMIT = istr("RateLimit-Limit")
REMAINING = istr("RateLimit-Remaining")
RESET = istr("RateLimit-Reset")
RETRY_AFTER = istr("Retry-After")


class Verdict(NamedTuple):
    """The answer for one limited request.

    Immutable as a frozen dataclass would be, but built on every limited request, and a
    frozen dataclass sets each field through `object.__setattr__`: ten times the cost.
    """

    allowed: bool
    code: str | None  # None | "rate_limited" | "environment_rate_limited"
    message: str | None
    retry_after: int | None  # whole seconds >= 1 when rejected
    scope: str | None  # "user" | "environment" when rejected
    rule: str  # the rule that rejected, or whose bucket the headers describe
    headers: Mapping[str, str]  # RateLimit-Limit/Remaining/Reset (+ Retry-After when rejected)


def _seconds(wait: float) -> int:
    """A wait as a Retry-After value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait - _EPS))


def _when(reached: str, retry_after: int, limit: str, reset: int) -> str:
    """A 429's message: the two waits its headers carry, each named, as they differ.

    A leaky bucket frees one unit at a time, so the next request fits long before the
    whole quota is back (RateLimit-Reset, as the IETF RateLimit draft defines it).
    """
    return (
        f"{reached} The next request fits in {retry_after} s (Retry-After); "
        f"all {limit} are available again in {reset} s (RateLimit-Reset)."
    )


class _Rule:
    """One effective rule of one environment, with its buckets and prebuilt texts."""

    __slots__ = (
        "alone",
        "env",
        "env_limit",
        "env_message",
        "max_wait",
        "name",
        "user_limit",
        "user_message",
        "users",
    )

    def __init__(self, rule: RateRule, users: UserBuckets | None, env: Bucket | None) -> None:
        self.name = rule.name
        self.users = users
        self.env = env
        self.max_wait = rule.max_wait
        self.alone: tuple[_Rule, ...] = (self,)
        self.user_limit = ""
        self.user_message = ""
        if rule.per_user is not None:
            self.user_limit = str(rule.per_user.count)
            self.user_message = f"Your generation limit ({rule.per_user.label}) has been reached."
        self.env_limit = ""
        self.env_message = ""
        if rule.per_environment is not None:
            self.env_limit = str(rule.per_environment.count)
            self.env_message = (
                f"The environment's request quota ({rule.per_environment.label}) has been reached."
            )


class _Routes:
    """Which rules apply to a (method, path) in one environment, precomputed.

    Exact paths are one dict lookup per method, already holding every rule that
    matches them (prefix rules included, in rule order). Other paths are tried
    against the prefix rules only, one `str.startswith(tuple)` per rule.
    """

    __slots__ = ("exact", "prefixed")

    def __init__(self, rules: list[tuple[RateRule, _Rule]]) -> None:
        self.exact: dict[str, dict[str, tuple[_Rule, ...]]] = {}
        self.prefixed: dict[str, tuple[tuple[tuple[str, ...], _Rule], ...]] = {}
        methods = {method for rule, _ in rules for method in rule.methods}
        for method in methods:
            mine = [(rule, entry) for rule, entry in rules if method in rule.methods]
            paths = {p for rule, _ in mine for p in rule.paths if not p.endswith("*")}
            self.exact[method] = {
                path: tuple(entry for rule, entry in mine if rule.matches(method, path)) for path in paths
            }
            prefixed = tuple(
                (prefixes, entry)
                for rule, entry in mine
                if (prefixes := tuple(p[:-1] for p in rule.paths if p.endswith("*")))
            )
            if prefixed:
                self.prefixed[method] = prefixed

    def match(self, method: str, path: str) -> tuple[_Rule, ...]:
        by_path = self.exact.get(method)
        if by_path is None:
            return ()
        found = by_path.get(path)
        if found is not None:
            return found
        prefixed = self.prefixed.get(method)
        if prefixed is None:
            return ()
        found = ()
        for prefixes, entry in prefixed:
            if path.startswith(prefixes):
                found = found + entry.alone if found else entry.alone
        return found


class Limits:
    """Every environment's rate limits; one instance per config generation."""

    def __init__(
        self,
        environments: Mapping[str, EnvironmentSettings],
        previous: Limits | None = None,
        *,
        max_buckets_per_rule: int | None = DEFAULT_MAX_BUCKETS_PER_RULE,
    ) -> None:
        if max_buckets_per_rule is not None and max_buckets_per_rule < 1:
            raise ValueError("max_buckets_per_rule must be at least 1 (or None)")
        # Keyed by (environment, rule name, occurrence of that name, rate): what a
        # reload compares. The occurrence keeps two rules that share a name apart.
        self._users: dict[tuple[str, str, int, Rate], UserBuckets] = {}
        self._envs: dict[tuple[str, str, int, Rate], Bucket] = {}
        self._routes: dict[str, _Routes] = {}
        old_users = previous._users if previous is not None else {}
        old_envs = previous._envs if previous is not None else {}
        for env_name, env in environments.items():
            entries: list[tuple[RateRule, _Rule]] = []
            seen: dict[str, int] = {}
            for rule in env.rules:
                if rule.per_user is None and rule.per_environment is None:
                    continue  # matches, but limits nothing
                occurrence = seen[rule.name] = seen.get(rule.name, -1) + 1
                users = None
                if rule.per_user is not None:
                    key = (env_name, rule.name, occurrence, rule.per_user)
                    users = old_users.get(key)
                    if users is None:
                        users = UserBuckets(rule.per_user, max_buckets_per_rule)
                    users.cap = max_buckets_per_rule
                    self._users[key] = users
                env_bucket = None
                if rule.per_environment is not None:
                    rate = rule.per_environment
                    key = (env_name, rule.name, occurrence, rate)
                    env_bucket = old_envs.get(key)
                    if env_bucket is None:
                        env_bucket = Bucket(rate)
                    self._envs[key] = env_bucket
                entries.append((rule, _Rule(rule, users, env_bucket)))
            if entries:
                self._routes[env_name] = _Routes(entries)

    def is_limited(self, environment: str, method: str, path: str) -> bool:
        """Whether any rule applies to this request. Cheap, and changes no state."""
        routes = self._routes.get(environment)
        return routes is not None and bool(routes.match(method, path))

    async def check(self, environment: str, method: str, path: str, user: str) -> Verdict | None:
        """Take this request's units, or say why not. None: the route is not limited.

        Never waits on a per-user limit; waits on environment limits up to the rule's
        `max_wait` when that is enough to get capacity.
        """
        routes = self._routes.get(environment)
        if routes is None:
            return None
        rules = routes.match(method, path)
        if not rules:
            return None
        loop = asyncio.get_running_loop()
        now = loop.time()

        # 1. Per-user: look, consume nothing. The longest wait decides Retry-After.
        blocked: _Rule | None = None
        blocked_wait = blocked_level = 0.0
        for rule in rules:
            users = rule.users
            if users is not None:
                level = users.leak(user, now)
                if not users.fits(level):
                    wait = users.seconds_to_fit(level)
                    if blocked is None or wait > blocked_wait:
                        blocked, blocked_wait, blocked_level = rule, wait, level
        if blocked is not None:
            return self._user_rejection(blocked, blocked_wait, blocked_level)

        # 2. Environment: decide, consume nothing. Waiting is fine up to max_wait.
        delay = 0.0
        for rule in rules:
            env = rule.env
            if env is not None:
                wait = env.seconds_to_fit(env.leak(now))
                if wait > rule.max_wait:
                    over = wait - rule.max_wait
                    if blocked is None or over > blocked_wait:
                        blocked, blocked_wait = rule, over
                elif wait > delay:
                    delay = wait
        if blocked is not None:
            return self._environment_rejection(blocked, blocked_wait)

        # 3. Consume everything at once; pick the bucket the headers describe.
        shown: UserBuckets | Bucket | None = None
        shown_rule = rules[0]
        shown_level = 0.0
        shown_left = 0
        for rule in rules:
            env = rule.env
            if env is not None:
                env.take()
            users = rule.users
            if users is not None:
                level = users.take(user)
                left = users.units_left(level)
                if shown is None or left < shown_left:
                    shown, shown_rule, shown_level, shown_left = users, rule, level, left
        if shown is None:  # no per-user rate here: describe the environment quota
            for rule in rules:
                env = rule.env
                if env is not None:
                    left = env.units_free(env.level)
                    if shown is None or left < shown_left:
                        shown, shown_rule, shown_level, shown_left = env, rule, env.level, left
        assert shown is not None  # every rule has a per-user or environment rate

        if delay > 0:
            await self._wait_turn(rules, user, delay)
            now = loop.time()  # leak over the wait, for fresh headers
            shown_level = shown.level(user, now) if isinstance(shown, UserBuckets) else shown.leak(now)

        return Verdict(
            True,
            None,
            None,
            None,
            None,
            shown_rule.name,
            {
                LIMIT: shown.limit_text,
                REMAINING: str(shown.units_free(shown_level)),
                RESET: str(shown.seconds_to_empty(shown_level)),
            },
        )

    async def _wait_turn(self, rules: tuple[_Rule, ...], user: str, delay: float) -> None:
        """Sleep until this request's environment units drain; refund all if cancelled."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            now = loop.time()
            for rule in rules:
                if rule.env is not None:
                    rule.env.give_back(now)
                if rule.users is not None:
                    rule.users.give_back(user, now)
            raise

    @staticmethod
    def _user_rejection(rule: _Rule, wait: float, level: float) -> Verdict:
        assert rule.users is not None
        seconds = _seconds(wait)
        reset = rule.users.seconds_to_empty(level)
        return Verdict(
            allowed=False,
            code="rate_limited",
            message=_when(rule.user_message, seconds, rule.user_limit, reset),
            retry_after=seconds,
            scope="user",
            rule=rule.name,
            headers={
                LIMIT: rule.user_limit,
                REMAINING: "0",
                RESET: str(reset),
                RETRY_AFTER: str(seconds),
            },
        )

    @staticmethod
    def _environment_rejection(rule: _Rule, wait: float) -> Verdict:
        assert rule.env is not None
        seconds = _seconds(wait)
        reset = rule.env.seconds_to_empty(rule.env.level)
        return Verdict(
            allowed=False,
            code="environment_rate_limited",
            message=_when(rule.env_message, seconds, rule.env_limit, reset),
            retry_after=seconds,
            scope="environment",
            rule=rule.name,
            headers={
                LIMIT: rule.env_limit,
                REMAINING: "0",
                RESET: str(reset),
                RETRY_AFTER: str(seconds),
            },
        )

    def evict_idle(self, now: float | None = None) -> int:
        """Drop the per-user buckets idle for a whole period (see leaky.py); returns how many.

        `now` defaults to the running loop's clock, the one the buckets use.
        """
        if now is None:
            now = asyncio.get_running_loop().time()
        return sum(users.evict(now) for users in self._users.values())

    def bucket_count(self) -> int:
        """Buckets held: per-user buckets plus one per environment-limited rule."""
        return sum(len(users) for users in self._users.values()) + len(self._envs)

"""Rate limits shared by replicas: `Limits`' answers, with the buckets on a `RateBackend`.

Used instead of `Limits` when the config has `[cluster]`. A request's buckets (one per
user and one per environment of every matching rule) are decided in one atomic call, so
the same three phases hold across replicas: a user without room is refused at once,
an environment may reserve a slot up to the rule's `max_wait`, and otherwise every bucket
takes its unit. A reserved slot is waited for with one sleep of the exact delay the
backend returned, never by asking again; a request cancelled during that sleep gives its
units back.

`ClusterUnavailable` passes through to the handler under `on_error = "closed"`; under
`"open"` the request is allowed unchecked and carries no RateLimit headers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import NamedTuple

from skyproxy.cluster.backend import Bucket, RateBackend, RateDecision, RatePlan
from skyproxy.config import EnvironmentSettings, RateRule
from skyproxy.proxy.limits import LIMIT, REMAINING, RESET, RETRY_AFTER, Verdict

__all__ = ["SharedLimits"]

_EPS = 1e-9
_UNCHECKED: Mapping[str, str] = {}


def _seconds(wait: float) -> int:
    """A wait as a Retry-After value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait - _EPS))


def _user_message(rule: RateRule) -> str:
    assert rule.per_user is not None
    return f"Your generation limit ({rule.per_user.label}) has been reached."


def _environment_message(rule: RateRule) -> str:
    assert rule.per_environment is not None
    return f"The environment's request quota ({rule.per_environment.label}) has been reached."


def _when(reached: str, retry_after: int, limit: str, reset: int) -> str:
    """`Limits`' 429 message, word for word (tests/cluster/test_cluster_shared_limits.py)."""
    return (
        f"{reached} The next request fits in {retry_after} s (Retry-After); "
        f"all {limit} are available again in {reset} s (RateLimit-Reset)."
    )


class _Plan(NamedTuple):
    """The buckets of one set of matching rules, in the backend's order, and what the
    verdict needs of each."""

    rates: RatePlan
    owners: tuple[RateRule, ...]  # the rule of each bucket
    first: str  # the first matching rule: an unchecked verdict names it
    # The buckets the headers may describe, as `Limits` picks them: the user buckets,
    # or the environment's when no rule is per user.
    shown: tuple[int, ...]


class _Routes:
    """One environment's plans: by method and exact path, precomputed; other paths by
    the rules they match."""

    __slots__ = ("_backend", "_by_rules", "_environment", "exact", "rules")

    def __init__(self, environment: str, rules: tuple[RateRule, ...], backend: RateBackend) -> None:
        self.rules = rules
        self._environment = environment
        self._backend = backend
        self._by_rules: dict[tuple[int, ...], _Plan] = {}
        self.exact: dict[str, dict[str, _Plan]] = {}
        for method in {m for rule in rules for m in rule.methods}:
            paths = {p for rule in rules if method in rule.methods for p in rule.paths if not p.endswith("*")}
            planned = {path: self._plan(method, path) for path in paths}
            self.exact[method] = {path: plan for path, plan in planned.items() if plan is not None}

    def match(self, method: str, path: str) -> _Plan | None:
        by_path = self.exact.get(method)
        if by_path is not None:
            found = by_path.get(path)
            if found is not None:
                return found
        return self._plan(method, path)

    def _plan(self, method: str, path: str) -> _Plan | None:
        matched = tuple(i for i, rule in enumerate(self.rules) if rule.matches(method, path))
        if not matched:
            return None
        plan = self._by_rules.get(matched)
        if plan is None:
            plan = self._by_rules[matched] = self._build([self.rules[i] for i in matched])
        return plan

    def _build(self, rules: list[RateRule]) -> _Plan:
        pairs = [(bucket, rule) for rule in rules for bucket in _buckets(self._environment, rule)]
        rates = self._backend.plan([bucket for bucket, _ in pairs])
        # The plan's order: the user buckets first, then the environment's, each in rule order.
        owners = tuple(rule for b, rule in pairs if b.user is not None)
        users = tuple(range(len(owners)))
        owners += tuple(rule for b, rule in pairs if b.user is None)
        return _Plan(rates, owners, rules[0].name, users or tuple(range(len(owners))))


class SharedLimits:
    """Every environment's rate limits, on a shared backend; one per config generation."""

    def __init__(self, environments: Mapping[str, EnvironmentSettings], backend: RateBackend) -> None:
        self._backend = backend
        self._routes: dict[str, _Routes] = {}
        for name, env in environments.items():
            rules = tuple(r for r in env.rules if r.per_user is not None or r.per_environment is not None)
            if rules:
                self._routes[name] = _Routes(name, rules, backend)

    def is_limited(self, environment: str, method: str, path: str) -> bool:
        routes = self._routes.get(environment)
        return routes is not None and routes.match(method, path) is not None

    def evict_idle(self, now: float | None = None) -> int:
        """Nothing to sweep: a bucket's key expires in Redis once it has drained."""
        return 0

    def bucket_count(self) -> int:
        return 0

    async def check(self, environment: str, method: str, path: str, user: str) -> Verdict | None:
        """Takes this request's units, or says why not. None: the route is not limited."""
        routes = self._routes.get(environment)
        plan = None if routes is None else routes.match(method, path)
        if plan is None:
            return None
        rates = plan.rates
        decision = await self._backend.check_plan(rates, user)
        if decision.unchecked:
            return Verdict(True, None, None, None, None, plan.first, _UNCHECKED)
        buckets = rates.buckets
        if not decision.allowed:
            refused = decision.refused_by
            assert refused is not None
            return _refusal(decision, refused, buckets[refused], plan.owners[refused])
        after = decision.delay
        if after > 0:
            try:
                await asyncio.sleep(after)
            except asyncio.CancelledError:
                await self._backend.refund(
                    [b._replace(user=user) if b.user is not None else b for b in buckets]
                )
                raise
        # The bucket with the fewest units left; the first of them in rule order.
        shown, fewest = -1, 0
        for i in plan.shown:
            left = decision.remaining(i, buckets[i], after)
            if shown < 0 or left < fewest:
                shown, fewest = i, left
        bucket = buckets[shown]
        headers: Mapping[str, str] = {
            LIMIT: str(bucket.max_rate),
            REMAINING: str(fewest),
            RESET: str(decision.reset(shown, bucket, after)),
        }
        return Verdict(True, None, None, None, None, plan.owners[shown].name, headers)


def _buckets(environment: str, rule: RateRule) -> list[Bucket]:
    """A rule's user bucket (for any user) and environment bucket, those it has."""
    found = []
    if rule.per_user is not None:
        found.append(Bucket(environment, rule.name, "", rule.per_user.count, rule.per_user.period))
    rate = rule.per_environment
    if rate is not None:
        found.append(Bucket(environment, rule.name, None, rate.count, rate.period, rule.max_wait))
    return found


def _refusal(decision: RateDecision, index: int, bucket: Bucket, rule: RateRule) -> Verdict:
    seconds = _seconds(decision.retry_after)
    user = bucket.user is not None
    limit = str(bucket.max_rate)
    reset = decision.reset(index, bucket)
    reached = _user_message(rule) if user else _environment_message(rule)
    return Verdict(
        allowed=False,
        code="rate_limited" if user else "environment_rate_limited",
        message=_when(reached, seconds, limit, reset),
        retry_after=seconds,
        scope="user" if user else "environment",
        rule=rule.name,
        headers={
            LIMIT: limit,
            REMAINING: "0",
            RESET: str(reset),
            RETRY_AFTER: str(seconds),
        },
    )

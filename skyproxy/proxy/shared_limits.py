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

from skyproxy.cluster.backend import Bucket, RateBackend, RateDecision
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


class SharedLimits:
    """Every environment's rate limits, on a shared backend; one per config generation."""

    def __init__(self, environments: Mapping[str, EnvironmentSettings], backend: RateBackend) -> None:
        self._backend = backend
        # Per environment, each limiting rule with its environment bucket, which is the
        # same for every request; a user's bucket is built per request.
        self._rules = {
            name: tuple(
                (rule, _environment_bucket(name, rule))
                for rule in env.rules
                if rule.per_user is not None or rule.per_environment is not None
            )
            for name, env in environments.items()
        }

    def is_limited(self, environment: str, method: str, path: str) -> bool:
        return any(rule.matches(method, path) for rule, _ in self._rules.get(environment, ()))

    def evict_idle(self, now: float | None = None) -> int:
        """Nothing to sweep: a bucket's key expires in Redis once it has drained."""
        return 0

    def bucket_count(self) -> int:
        return 0

    async def check(self, environment: str, method: str, path: str, user: str) -> Verdict | None:
        """Takes this request's units, or says why not. None: the route is not limited."""
        buckets: list[Bucket] = []
        owners: list[RateRule] = []
        for rule, shared in self._rules.get(environment, ()):
            if not rule.matches(method, path):
                continue
            per_user = rule.per_user
            if per_user is not None:
                buckets.append(Bucket(environment, rule.name, user, per_user.count, per_user.period))
                owners.append(rule)
            if shared is not None:
                buckets.append(shared)
                owners.append(rule)
        if not buckets:
            return None
        decision = await self._backend.check(buckets)
        if decision.unchecked:
            return Verdict(True, None, None, None, None, owners[0].name, _UNCHECKED)
        if not decision.allowed:
            refused = decision.refused_by
            assert refused is not None
            return _refusal(decision, refused, buckets[refused], owners[refused])
        after = decision.delay
        if after > 0:
            try:
                await asyncio.sleep(after)
            except asyncio.CancelledError:
                await self._backend.refund(buckets)
                raise
        shown, remaining = _shown(decision, buckets, after)
        bucket = buckets[shown]
        headers: Mapping[str, str] = {
            LIMIT: str(bucket.max_rate),
            REMAINING: str(remaining),
            RESET: str(decision.reset(shown, bucket, after)),
        }
        return Verdict(True, None, None, None, None, owners[shown].name, headers)


def _environment_bucket(environment: str, rule: RateRule) -> Bucket | None:
    rate = rule.per_environment
    if rate is None:
        return None
    return Bucket(environment, rule.name, None, rate.count, rate.period, rule.max_wait)


def _shown(decision: RateDecision, buckets: list[Bucket], after: float) -> tuple[int, int]:
    """The bucket the headers describe, as `Limits` picks it, and its units left: the user
    bucket with the fewest units left, or the environment bucket with the fewest when no
    rule is per user."""
    users_only = any(b.user is not None for b in buckets)
    shown, fewest = -1, 0
    for i, bucket in enumerate(buckets):
        if users_only and bucket.user is None:
            continue
        left = decision.remaining(i, bucket, after)
        if shown < 0 or left < fewest:
            shown, fewest = i, left
    return shown, fewest


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

"""What the proxy asks of shared state, one small interface per concern.

The single-node path keeps its local code; a Redis implementation of each protocol
(rates.py, inflight.py, budgets.py, webhooks.py) makes the same answers exact across
replicas. The values here are plain data, so either side can build them.

On the request path (`RateBackend.check`, `InFlightBackend.acquire`,
`BudgetBackend.reserve`) an unavailable Redis raises `ClusterUnavailable` under
`on_error = "closed"`, and under `"open"` answers "allowed" with `unchecked = True`, so the
caller serves (and may count it). Calls that finish an exchange (refund, release, settle,
and their `_soon` forms, queued for a caller that cannot await) never raise: a failure
is counted, and the lease or reservation expires on its own.
Webhook calls always raise: an event must not be taken as stored when it was not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = [
    "Bucket",
    "BudgetBackend",
    "BudgetDecision",
    "BudgetScope",
    "Claim",
    "InFlightBackend",
    "InFlightDecision",
    "Lease",
    "Outlook",
    "RateBackend",
    "RateDecision",
    "RatePlan",
    "Reservation",
    "Slot",
    "Usage",
    "WebhookClaims",
    "WebhookRoutes",
]

# Float slack so a level of 4.000000000001 units still reads as 4.
_EPS = 1e-9


# -- rates ------------------------------------------------------------------------------
# Built for every limited request: tuples, since a frozen dataclass sets each field
# through `object.__setattr__`.
class Bucket(NamedTuple):
    """One leaky bucket a request takes a unit from: a user's, or the environment's (user None)."""

    environment: str
    rule: str
    user: str | None
    max_rate: int
    period: float  # seconds
    max_wait: float = 0.0  # environment buckets: how long a request may wait for its slot

    @property
    def per_second(self) -> float:
        return self.max_rate / self.period


class RateDecision(NamedTuple):
    """The answer for the buckets of one request, in the order they were given."""

    allowed: bool
    refused_by: int | None  # index of the bucket that refused
    retry_after: float  # seconds until it fits (an environment bucket: beyond its max_wait)
    delay: float  # seconds to sleep once before forwarding: the reserved environment slot
    levels: tuple[float, ...]  # each bucket's level (after this request's unit when allowed)
    unchecked: bool = False  # Redis unavailable under on_error = "open": nothing was checked

    def remaining(self, index: int, bucket: Bucket, after: float = 0.0) -> int:
        """Whole units free in a bucket, `after` seconds from the decision."""
        level = max(0.0, self.levels[index] - after * bucket.per_second)
        return max(0, math.floor(bucket.max_rate - level + _EPS))

    def reset(self, index: int, bucket: Bucket, after: float = 0.0) -> int:
        """Whole seconds until a bucket is empty, `after` seconds from the decision."""
        level = max(0.0, self.levels[index] - after * bucket.per_second)
        return max(0, math.ceil(level / bucket.per_second - _EPS))


class RatePlan(NamedTuple):
    """The buckets one set of rules takes from, for any user, with the backend's encoding
    of the check less the user: built once per config generation, not per request."""

    buckets: tuple[Bucket, ...]  # the user buckets first (their user is ""), then the environment's
    # items, what comes before the user buckets' keys, each key up to the user id, what comes after
    encoded: tuple[int, bytes, tuple[bytes, ...], bytes]


class RateBackend(Protocol):
    async def check(self, buckets: Sequence[Bucket]) -> RateDecision:
        """User buckets refuse at once; environment buckets may reserve up to `max_wait`.

        Either every bucket takes a unit or none does.
        """
        ...

    def plan(self, buckets: Sequence[Bucket]) -> RatePlan:
        """`buckets` (the users' ones for any user) ready for `check_plan`."""
        ...

    async def check_plan(self, plan: RatePlan, user: str) -> RateDecision:
        """`check` of the plan's buckets, the user buckets being `user`'s; the decision's
        indices are the plan's."""
        ...

    async def refund(self, buckets: Sequence[Bucket]) -> None:
        """Gives back the units of an allowed request cancelled while it waited its delay."""
        ...


# -- in flight --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Slot:
    """One `max_in_flight` cap: at most `cap` requests of a user in flight on a rule."""

    environment: str
    rule: str
    user: str
    cap: int


@dataclass(frozen=True, slots=True)
class Lease:
    """Slots held by one request, released together."""

    id: str
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InFlightDecision:
    allowed: bool
    lease: Lease | None  # None when refused, or when unchecked
    refused_by: int | None  # index of the slot at its cap
    in_flight: int  # how many that slot holds
    unchecked: bool = False


class InFlightBackend(Protocol):
    async def acquire(self, slots: Sequence[Slot]) -> InFlightDecision:
        """Takes a place under every cap, or under none."""
        ...

    async def release(self, lease: Lease | None) -> None: ...

    def release_soon(self, lease: Lease) -> None:
        """`release` without waiting, for a caller that cannot await; sent in order."""
        ...


# -- budgets ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BudgetScope:
    """One budget's subject in one calendar period, as the caller computed it."""

    budget: str
    subject: str  # the user, the client or the environment
    period: str  # the period's label, such as "2026-06-01" for a day
    limit_usd: float
    resets_at: float  # Unix time the period ends; the keys expire soon after


@dataclass(frozen=True, slots=True)
class Reservation:
    """An estimate held against budgets until the cost is known."""

    id: str
    scopes: tuple[BudgetScope, ...]
    estimate_usd: float


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    admitted: bool
    reservation: Reservation | None  # None when refused, or when unchecked
    refused_by: int | None  # index of the scope that refused
    spent_usd: float = 0.0  # of the refusing scope
    reserved_usd: float = 0.0
    unchecked: bool = False
    spent_by_scope: tuple[float, ...] = ()  # when admitted: each scope's spend before it


@dataclass(frozen=True, slots=True)
class Usage:
    spent_usd: float
    reserved_usd: float


class BudgetBackend(Protocol):
    async def reserve(self, scopes: Sequence[BudgetScope], estimate_usd: float) -> BudgetDecision:
        """Holds `estimate_usd` in every scope, or refuses when spent + reserved + it > limit."""
        ...

    async def settle(self, reservation: Reservation, cost_usd: float) -> bool:
        """Replaces the reservation by the actual cost; False if it could not be recorded."""
        ...

    async def release(self, reservation: Reservation) -> bool:
        """Drops the reservation: nothing was spent."""
        ...

    async def add(self, scopes: Sequence[BudgetScope], usd: float) -> bool:
        """Adds to spent (negative: takes off), as when a terminal cost corrects an estimate."""
        ...

    def settle_soon(self, reservation: Reservation, cost_usd: float) -> None:
        """`settle` without waiting; sent after every call queued before it."""
        ...

    def add_soon(self, scopes: Sequence[BudgetScope], usd: float) -> None:
        """`add` without waiting, in order with `settle_soon`."""
        ...

    def prediction_soon(
        self,
        prediction_id: str,
        final: bool,
        scopes: Sequence[BudgetScope],
        usd: float,
        keep_until: float,
        *,
        where_estimated: bool = False,
    ) -> None:
        """A prediction's estimate, or its final cost replacing whatever was counted for it
        before, by any replica (`where_estimated`: in the estimate's budgets, not `scopes`);
        queued in order with `settle_soon`."""
        ...

    async def usage(self, scope: BudgetScope) -> Usage: ...


# -- webhooks ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery this replica holds until it finishes, reschedules, or its lease runs out."""

    event_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Outlook:
    depth: int  # deliveries queued, claimed or not
    next_due_in: float | None  # seconds until the next one may be claimed (0: now)
    oldest_age: float | None  # seconds since the oldest was queued


class WebhookClaims(Protocol):
    lease_s: float  # how long a claim lasts unless renewed

    async def first_seen(self, key: str, ttl_s: float) -> bool:
        """True for the first replica to see `key` within `ttl_s`; False for a duplicate."""
        ...

    async def accept(self, key: str, ttl_s: float, event_id: str, payload: bytes | None) -> bool:
        """`first_seen` and `enqueue` as one step; a None payload is only marked seen."""
        ...

    async def outlook(self) -> Outlook: ...

    async def enqueue(self, event_id: str, payload: bytes, delay_s: float = 0.0) -> bool:
        """Queues a delivery; False if that event id is already queued."""
        ...

    async def claim_due(self, limit: int) -> list[Claim]:
        """Claims up to `limit` due deliveries for this replica, each for one lease."""
        ...

    async def renew(self, event_id: str) -> bool:
        """Extends a claim still held; False when it was lost to another replica."""
        ...

    async def reschedule(self, event_id: str, delay_s: float, payload: bytes | None = None) -> bool:
        """Gives a claim back, due again after `delay_s`, optionally with a new payload."""
        ...

    async def finish(self, event_id: str) -> bool:
        """Removes a delivered (or dead) event; False when the claim was lost."""
        ...

    async def depth(self) -> int:
        """Deliveries queued, claimed or not."""
        ...


class WebhookRoutes(Protocol):
    async def put_route(self, route_id: str, route: bytes, ttl_s: float) -> None: ...

    async def get_route(self, route_id: str) -> bytes | None: ...

"""Concurrency caps: at most `max_in_flight` requests in flight per user on a rule.

`enter()` takes a slot on every capped rule that matches, all or none, and returns a
`Slots` to release when the exchange ends, however it ends; the handler releases it in
a `finally`, so completion, a client disconnect (cancellation), a timeout and an
upstream error all give the slot back. Counts live per (environment, rule name, user)
and survive a reload; a user's entry is dropped when its count falls to zero, so memory
follows the requests in flight, not the users ever seen.

With [cluster], `SharedInFlight` takes the place of `InFlight`: the counts live on Redis
under leases (`skyproxy.cluster.inflight`), so a cap holds across replicas, and a slot
held by a replica that died is free again once its lease runs out. Its `enter()` is a
coroutine; it raises `ClusterUnavailable` under `on_error = "closed"` when Redis does
not answer, and under `"open"` admits without a slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from skyproxy.cluster.backend import InFlightBackend, Lease, Slot
from skyproxy.config import EnvironmentSettings, RateRule

__all__ = ["InFlight", "LeasedSlots", "SharedInFlight", "Slots", "TooMany"]

_Key = tuple[str, str, str]  # (environment, rule name, user)


@dataclass(frozen=True, slots=True)
class TooMany:
    """The refusal: this rule's cap is reached for this user."""

    rule: str
    limit: int
    retry_after: int = 1

    @property
    def message(self) -> str:
        return f"At most {self.limit} requests may be in flight at once (rule {self.rule}); retry shortly."


class Slots:
    """Slots held by one request; `release()` gives them back, once."""

    __slots__ = ("_counts", "_keys")

    def __init__(self, counts: dict[_Key, int], keys: list[_Key]) -> None:
        self._counts = counts
        self._keys = keys

    def release(self) -> None:
        keys, self._keys = self._keys, []
        counts = self._counts
        for key in keys:
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]


NO_SLOTS = Slots({}, [])


class LeasedSlots(Slots):
    """Slots held on Redis under one lease; `release()` queues its release, once."""

    __slots__ = ("_backend", "_lease")

    def __init__(self, backend: InFlightBackend, lease: Lease) -> None:
        super().__init__({}, [])
        self._backend = backend
        self._lease: Lease | None = lease

    def release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._backend.release_soon(lease)


class _Cap:
    __slots__ = ("limit", "rule")

    def __init__(self, rule: RateRule, limit: int) -> None:
        self.rule = rule
        self.limit = limit


class InFlight:
    """Every environment's in-flight caps; the counts are shared across config generations."""

    def __init__(
        self, environments: Mapping[str, EnvironmentSettings], previous: InFlight | None = None
    ) -> None:
        # The counts carry over, so requests admitted before a reload still count after it
        # and release into the same table.
        self.counts: dict[_Key, int] = previous.counts if previous is not None else {}
        self._caps = _caps_of(environments)

    def is_capped(self, environment: str) -> bool:
        return environment in self._caps

    def enter(self, environment: str, method: str, path: str, user: str) -> Slots | TooMany:
        """Slots on every matching capped rule, or the first rule whose cap is reached."""
        caps = self._caps.get(environment)
        if caps is None:
            return NO_SLOTS
        counts = self.counts
        keys: list[_Key] = []
        for cap in caps:
            if cap.rule.matches(method, path):
                key = (environment, cap.rule.name, user)
                if counts.get(key, 0) >= cap.limit:
                    return TooMany(cap.rule.name, cap.limit)
                keys.append(key)
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        return Slots(counts, keys) if keys else NO_SLOTS

    def in_flight(self) -> int:
        return sum(self.counts.values())


class SharedInFlight:
    """The same caps, counted on Redis for every replica; one per config generation."""

    def __init__(self, environments: Mapping[str, EnvironmentSettings], backend: InFlightBackend) -> None:
        self._backend = backend
        self._caps = _caps_of(environments)

    def is_capped(self, environment: str) -> bool:
        return environment in self._caps

    async def enter(self, environment: str, method: str, path: str, user: str) -> Slots | TooMany:
        """`InFlight.enter()` across replicas: a place under every matching cap, or none."""
        matching = [cap for cap in self._caps.get(environment, ()) if cap.rule.matches(method, path)]
        if not matching:
            return NO_SLOTS
        slots = [Slot(environment, cap.rule.name, user, cap.limit) for cap in matching]
        decision = await self._backend.acquire(slots)
        if not decision.allowed:
            assert decision.refused_by is not None
            full = matching[decision.refused_by]
            return TooMany(full.rule.name, full.limit)
        if decision.lease is None:  # unchecked: Redis unavailable under on_error = "open"
            return NO_SLOTS
        return LeasedSlots(self._backend, decision.lease)


def _caps_of(environments: Mapping[str, EnvironmentSettings]) -> dict[str, tuple[_Cap, ...]]:
    found: dict[str, tuple[_Cap, ...]] = {}
    for name, env in environments.items():
        caps = tuple(_Cap(rule, rule.max_in_flight) for rule in env.rules if rule.max_in_flight is not None)
        if caps:
            found[name] = caps
    return found

"""Shared spend budgets: spent and reserved per (budget, subject, period), in micro-dollars.

Each reservation is held under a lease (`lease_s`, longer than any create exchange). A
reservation whose replica died before settling it counts as spent at its estimate once
the lease runs out, as that create's audit line does; a settle that comes later still
replaces the estimate by the cost. Keys expire a little after their period ends.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Sequence

from skyproxy.cluster.backend import BudgetDecision, BudgetScope, Reservation, Usage
from skyproxy.cluster.batch import Batch
from skyproxy.cluster.connection import RedisConnection, ScriptArg
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.cluster.scripts import (
    BUDGET_ADD,
    BUDGET_PREDICTION,
    BUDGET_RESERVE,
    BUDGET_SETTLE,
    BUDGET_USAGE,
)

__all__ = ["DEFAULT_LEASE_S", "MICRO_USD", "RedisBudgets"]

DEFAULT_LEASE_S = 600.0
MICRO_USD = 1_000_000  # integer micro-dollars, so sums are exact
EXPIRY_GRACE_S = 60.0  # keys outlive their period a little, for replicas whose clocks lag


def _micro(usd: float) -> int:
    return round(usd * MICRO_USD)


class RedisBudgets:
    """`BudgetBackend` on Redis."""

    def __init__(self, connection: RedisConnection, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        self._connection = connection
        self._lease_ms = max(1, round(lease_s * 1000))
        self._reserve = connection.script(BUDGET_RESERVE)
        self._settle = connection.script(BUDGET_SETTLE)
        self._add = connection.script(BUDGET_ADD)
        self._usage = connection.script(BUDGET_USAGE)
        self._prediction = connection.script(BUDGET_PREDICTION)
        self._later = Batch(connection)

    @property
    def queued(self) -> Batch:
        """Spend, settles and releases not yet sent."""
        return self._later

    def start(self) -> None:
        self._later.start()

    async def stop(self) -> None:
        await self._later.stop()

    def keys(self, scope: BudgetScope) -> list[str]:
        """The state, reservations, lease expiries and expired reservations of one scope."""
        key = self._connection.key
        base = ("budget", scope.budget, scope.subject, scope.period)
        return [key(*base), key(*base, "res"), key(*base, "exp"), key(*base, "conv")]

    def _all_keys(self, scopes: Sequence[BudgetScope]) -> list[str]:
        return [key for scope in scopes for key in self.keys(scope)]

    async def reserve(self, scopes: Sequence[BudgetScope], estimate_usd: float) -> BudgetDecision:
        reservation = Reservation(os.urandom(12).hex(), tuple(scopes), estimate_usd)
        if not scopes:
            return BudgetDecision(True, reservation, None)
        args: list[ScriptArg] = [reservation.id, _micro(estimate_usd), self._lease_ms]
        for scope in scopes:
            args += (_micro(scope.limit_usd), math.ceil(scope.resets_at + EXPIRY_GRACE_S))
        keys = self._all_keys(scopes)
        tried = not self._connection.down
        try:
            raw = await self._connection.run(self._reserve, keys, args)
        except ClusterUnavailable:
            if tried:  # a timeout, say: the script may have run, and its reservation be held
                self.settle_soon(reservation, 0.0)
            if self._connection.fails_open:
                return BudgetDecision(True, None, None, unchecked=True)
            raise
        except asyncio.CancelledError:  # the client left: its answer may never be read
            self.settle_soon(reservation, 0.0)
            raise
        if raw[0] == 1:
            spent = tuple(int(amount) / MICRO_USD for amount in raw[4:])
            return BudgetDecision(True, reservation, None, spent_by_scope=spent)
        return BudgetDecision(False, None, int(raw[1]) - 1, int(raw[2]) / MICRO_USD, int(raw[3]) / MICRO_USD)

    async def settle(self, reservation: Reservation, cost_usd: float) -> bool:
        if not reservation.scopes:
            return True
        keys = self._all_keys(reservation.scopes)
        args: list[ScriptArg] = [reservation.id, _micro(cost_usd)]
        try:
            applied = await self._connection.run(self._settle, keys, args)
        except ClusterUnavailable:
            return False  # counted; the lease will count the estimate instead
        return int(applied) == len(reservation.scopes)

    async def release(self, reservation: Reservation) -> bool:
        return await self.settle(reservation, 0.0)

    def settle_soon(self, reservation: Reservation, cost_usd: float) -> None:
        """`settle` for a caller that cannot await: queued, and sent after what was queued before."""
        if reservation.scopes:
            args: list[ScriptArg] = [reservation.id, _micro(cost_usd)]
            self._later.put(self._settle, self._all_keys(reservation.scopes), args)

    def add_soon(self, scopes: Sequence[BudgetScope], usd: float) -> None:
        """`add` for a caller that cannot await, in order with `settle_soon`."""
        if scopes:
            self._later.put(self._add, self._add_keys(scopes), _add_args(scopes, usd))

    async def add(self, scopes: Sequence[BudgetScope], usd: float) -> bool:
        if not scopes:
            return True
        try:
            await self._connection.run(self._add, self._add_keys(scopes), _add_args(scopes, usd))
        except ClusterUnavailable:
            return False
        return True

    def _add_keys(self, scopes: Sequence[BudgetScope]) -> list[str]:
        """The scopes' keys, then the hash of additions made, in the first scope's name."""
        first = scopes[0]
        adds = self._connection.key("budget", first.budget, first.subject, first.period, "adds")
        return [*self._all_keys(scopes), adds]

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
        """Counts a prediction's estimate, or its final cost in place of what was counted
        for it before (on any replica); queued like `add_soon`. `keep_until`: the Unix
        time after which no line of it can count any more (the longest period's end).
        `where_estimated`: the final cost counts where the estimate did, if one did."""
        keys = [self._connection.key("budget-prediction", prediction_id)]
        keys += [self.keys(scope)[0] for scope in scopes]
        kind = "estimate" if not final else "final-where-estimated" if where_estimated else "final"
        args: list[ScriptArg] = [
            kind,
            _micro(usd),
            math.ceil(keep_until + EXPIRY_GRACE_S),
            *(math.ceil(s.resets_at + EXPIRY_GRACE_S) for s in scopes),
        ]
        self._later.put(self._prediction, keys, args)

    async def usage(self, scope: BudgetScope) -> Usage:
        keys = self.keys(scope)
        spent, reserved = await self._connection.run(self._usage, keys, [])
        return Usage(int(spent) / MICRO_USD, int(reserved) / MICRO_USD)


def _add_args(scopes: Sequence[BudgetScope], usd: float) -> list[ScriptArg]:
    """The amount, each scope's expiry, the additions' hash's (its scope's), and an id:
    sent twice, the addition counts once."""
    expiries = [math.ceil(s.resets_at + EXPIRY_GRACE_S) for s in scopes]
    return [_micro(usd), *expiries, expiries[0], os.urandom(12).hex()]
